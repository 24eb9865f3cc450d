"""The per-appliance daemon: control socket, HA state, and the supervisor tick.

Threads: the control server (one thread per request), the tick loop, a
watchdog that measures how long this process was stalled, at most one
*worker* for a slow action (takeover, step-down, failOver), and the threads
owned by the heartbeat, log shipping, status endpoint and the replication
side. Every change of mode happens under ``self._lock``; slow actions run in
the worker beside the loop, and the loop reports them as "busy" meanwhile.

After a restart the daemon never comes back primary: an appliance that
rebooted must never take the primary role or mount the volume by itself. It
resumes as secondary only where its saved state and metadata prove that safe
(the rule is in mirrord/restart.py), else it comes back ``standalone``.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mirrord import __version__, app, atomicfile, config
from mirrord import backup as archive
from mirrord.app import AppEnv, Monitor
from mirrord.config import Endpoints, Settings
from mirrord.control import ControlServer
from mirrord.errors import BadInput, HandshakeRefused, MirrordError, Refused
from mirrord.halog import HALog, offset_of_last
from mirrord.httpstatus import StatusServer
from mirrord.logship import LogReceiver, LogShipper
from mirrord.modes import Event, Mode, transition
from mirrord.net import arp, floatip
from mirrord.net.addresses import local_addresses
from mirrord.net.heartbeat import Heartbeat
from mirrord.net.links import any_link_up
from mirrord.net.witness import Witness
from mirrord.paths import Home
from mirrord.replication import extents, generations, keepcopy, link, volume
from mirrord.replication.generations import Generations, Kind, Plan
from mirrord.replication.group import PrimaryGroup, SecondaryGroup, worst
from mirrord.replication.meta import DiskState, VolumeMeta, update_together, why_not_primary
from mirrord.replication.primary import PrimarySide, plan_sentence
from mirrord.replication.secondary import SecondarySide
from mirrord.restart import Restart, after_restart
from mirrord.supervisor import Action, Facts, decide
from mirrord.trace import write_trace

WATCHDOG_PERIOD = 0.02
SETTLE_AFTER_STALL = 0.1
#: Settings both appliances must agree on (compared over the heartbeats).
SHARED_SETTINGS = ("primary_ip", "secondary_ip", "primary_sync_ip", "secondary_sync_ip", "floating_ip",
                   "ping_interval", "volumes")


def tick_period(ping_interval: float) -> float:
    return min(0.2, ping_interval / 5)


class Watchdog:
    """Measures stalls of this whole process (a freeze, a hung machine), never of one lock.

    A thread that takes no lock wakes every 20 ms and records the longest gap
    between two wake-ups; the supervisor reads and resets it each tick.
    """

    def __init__(self) -> None:
        self._worst = 0.0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def take(self) -> float:
        """The longest stall since the last call, including one still going on.

        After a freeze the tick may run before the watchdog thread does: the
        time since the watchdog's last wake-up is a stall too.
        """
        ongoing = time.monotonic() - self._last - WATCHDOG_PERIOD
        worst, self._worst = max(self._worst, ongoing), 0.0
        return max(0.0, worst)

    def _run(self) -> None:
        while not self._stop.wait(WATCHDOG_PERIOD):
            now = time.monotonic()
            self._worst = max(self._worst, now - self._last - WATCHDOG_PERIOD)
            self._last = now


@dataclass(frozen=True)
class _Before:
    """What ran before a startHA: put back if it fails after its checks (decision 36)."""

    mode: Mode
    settings: Settings | None
    side: str | None
    ends: Endpoints | None
    metas: list[VolumeMeta]
    #: the companions' settings, endpoints and secret, if they ran (idle, inconsistent)
    companions: tuple[Settings | None, Endpoints | None, bytes | None] | None


class Daemon:
    def __init__(self, home: Home, resume: bool = True) -> None:
        self.home = home
        home.ensure()
        self.log = HALog(home, "mirrord-daemon")
        self.mode = Mode.STANDALONE
        self.side: str | None = None  # configured side: which appliance of the settings this is
        self.ends: Endpoints | None = None
        self.settings: Settings | None = config.load(home)
        self.primary: PrimaryGroup | None = None
        self.secondary: SecondaryGroup | None = None
        #: every volume's metadata (group.py); the first (r0, the lead) also holds the pair's term
        #: and the generations the heartbeats compare
        self.metas: list[VolumeMeta] = []
        self.heartbeat: Heartbeat | None = None
        self.witness: Witness | None = None
        self.shipper: LogShipper | None = None
        self.log_receiver: LogReceiver | None = None
        self.secret: bytes | None = None
        self.my_mac = ""
        self.outdate_request = False
        self._outdate_seen: float | None = None   # time.monotonic() the peer's outdate request was first seen
        self._links_back: float | None = -math.inf  # time.monotonic() our links came back; None while down
        self.mismatch: list[str] = []
        self.last_takeover: dict[str, Any] = {}
        self.app_monitor: Monitor | None = None
        self.app_restarts = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._busy: str | None = None
        self._leaving = False  # a teardown runs: the heartbeats say "standalone" (left HA, not dead)
        #: a startHA's settings and metadata while it listens for the peer, before they are this node's
        self._starting: tuple[Settings, list[VolumeMeta]] | None = None
        self._last_sentence = ""
        self._watchdog = Watchdog()
        self._previous_mode = (atomicfile.read_json(home.state_file) or {}).get("mode")
        self._restart = self._after_restart() if resume else Restart(
            False, "Daemon started for a command (startHA): that command decides the role.")
        self._save_state()  # standalone until a resume succeeds: a failed one is not retried by a crash loop
        self.control = ControlServer(home, self.handle)
        self.status_server = StatusServer("0.0.0.0", int(os.environ.get("MIRRORD_STATUS_PORT", config.STATUS_PORT)),
                                          lambda: self.status()[1])

    # -- lifecycle ------------------------------------------------------------
    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        arp.preload()  # scapy's import cost must never land inside a takeover
        self._watchdog.start()
        self.log.log(f"mirrord {__version__} daemon started (pid {os.getpid()}), mode {self.mode}.")
        # Before any command is accepted: a startHA must never race the clean-up or the resume.
        self._release_leftovers()
        self.log.log(self._restart.sentence)
        if self._restart.resume_secondary:
            self._resume_secondary()
        self.control.start()
        try:
            self.status_server.start()
        except MirrordError as exc:
            self.log.log(f"Status endpoint not started: {exc}")
        try:
            while not self._stop.wait(tick_period(self.settings.ping_interval if self.settings else 1.0)):
                self.tick()
        finally:
            with self._lock:
                if self.mode is Mode.PRIMARY and self.primary is not None and self.primary.in_sync:
                    # systemctl stop or a reboot of the primary: hand the service over
                    # (like failOver) rather than leave the pair without a primary.
                    try:
                        self._hand_over()
                    except MirrordError as exc:
                        self.log.log(f"Could not hand over before stopping: {exc}")
                if self.mode is not Mode.STANDALONE:
                    self._teardown("daemon stopping")
            self._watchdog.stop()
            self.status_server.stop()
            self.control.stop()
            self.log.log("Daemon stopped.")

    def tick(self) -> str:
        """One HA loop iteration; returns the sentence describing what it did."""
        stall = self._watchdog.take()
        if self.settings is not None and stall >= self.settings.ping_interval:
            # Let the other threads catch up first (the data path reading the peer's
            # goodbye, the heartbeat queue): the facts must describe now, not the stall.
            time.sleep(SETTLE_AFTER_STALL)
        with self._lock:
            if self.primary is not None and (shared := self.primary.share_fate()):
                self.log.log(shared)
            facts = self._facts(stall)
            decision = decide(facts)
            self._act(decision.action, decision.sentence)
            if decision.sentence != self._last_sentence and not decision.sentence.startswith("Busy:"):
                self.log.log(decision.sentence)
                self._last_sentence = decision.sentence
            self._compare_settings()
            return decision.sentence

    # -- restart ----------------------------------------------------------------
    @property
    def meta(self) -> VolumeMeta | None:
        """The lead volume's metadata: the pair's term (epoch) and the generations heartbeats carry."""
        return self.metas[0] if self.metas else None

    def _disk_state(self) -> DiskState | None:
        """This appliance's disks as one: the worst of the volumes' states."""
        return worst(m.disk_state for m in self.metas) if self.metas else None

    def _after_restart(self) -> Restart:
        states = [(atomicfile.read_json(self.home.meta_file(v.volume)) or {}).get("disk_state")
                  for v in (self.settings.volumes() if self.settings else [])]
        state: str | None = None
        if states and None not in states:
            try:
                state = str(worst(DiskState(s) for s in states))
            except ValueError:
                state = None
        return after_restart(self._previous_mode, self.settings is not None, state)

    def _release_leftovers(self) -> None:
        """A predecessor killed as primary (kill -9, OOM) leaves its floating IP and mounts behind: a
        restarted appliance must hold neither, or two appliances answer for the address. Only what
        mirrord itself set up is touched (a mount counts if it sits on a loop over our FUSE file)."""
        settings = self.settings
        if settings is None or self._previous_mode != "primary":
            return
        try:
            if floatip.remove(settings.floating_ip):
                self.log.log(f"Released the floating IP {settings.floating_ip} a previous daemon left behind.")
            for one in settings.volumes():
                device = self.home.device(one.volume)
                loops = volume.loops_backed_by(device)
                if one.mount is not None and volume.mount_source(one.mount) in loops:
                    volume.unmount(one.mount, lazy=True)
                    self.log.log(f"Unmounted {one.mount}, which a previous daemon left mounted.")
                for loop in loops:
                    volume.detach_loop(loop)
                    self.log.log(f"Detached {loop}, which a previous daemon left attached.")
                if volume.mount_source(device) is not None:
                    volume.unmount(device, lazy=True)
                    self.log.log(f"Unmounted {device}, whose server (a previous daemon) is gone.")
        except (MirrordError, OSError) as exc:
            self.log.log(f"Could not release what a previous daemon left behind: {exc}")

    def _resume_secondary(self) -> None:
        assert self.settings is not None
        try:
            message, _ = self._start_ha(self._options(self.settings), secondary_only=True)
            self.log.log(f"Resumed after a restart: {message}")
        except MirrordError as exc:
            self.log.log(f"Could not resume as secondary after the restart: {exc} This appliance is standalone; "
                         "run startHA.")

    # -- facts ------------------------------------------------------------------
    def _peer_view(self) -> tuple[float, float, dict[str, Any] | None]:
        if self.heartbeat is None:
            return math.inf, math.inf, None
        silent_sync = self.heartbeat.silent_for("sync")
        silent_public = self.heartbeat.silent_for("public")
        fresher = "sync" if silent_sync <= silent_public else "public"
        return silent_sync, silent_public, self.heartbeat.peer_state(fresher)

    def _peer_answers(self, settings: Settings) -> bool:
        """Heard within pingInterval (alive, even if what it said cannot be read)."""
        return min(self._peer_view()[:2]) < settings.ping_interval

    def _answering_peer(self, settings: Settings) -> dict[str, Any] | None:
        """What the peer's last heartbeat said, if it answers."""
        peer = self._peer_view()[2]
        return peer if isinstance(peer, dict) and self._peer_answers(settings) else None

    def _peer_copy(self, settings: Settings, mine: Generations) -> Plan | None:
        """How this copy relates to the peer's, from the identifiers its heartbeats carry (the lead
        volume's: a group's volumes start, sync and write alone together); None when the peer does
        not answer or says nothing usable."""
        peer = self._answering_peer(settings)
        if peer is None or peer.get("gen") is None:
            return None
        try:
            return generations.relation(mine, Generations.from_json(peer["gen"]))
        except ValueError:
            return None

    def _split_brain(self, peer: dict[str, Any] | None, heard: bool) -> bool:
        """Two primaries that hear each other (a partition healed) never connect for a handshake: they
        compare generations from the heartbeats, so a split brain is recorded and logged on both at
        once. Otherwise the handshake decides (a heartbeat may be a moment older than the identifiers
        it just agreed on). Only a sync clears it."""
        if self.meta is None or self.settings is None or not heard or not isinstance(peer, dict) \
                or self.mode is not Mode.PRIMARY or peer.get("mode") != "primary":
            return bool(self.meta and self.meta.split_brain)
        try:
            theirs = Generations.from_json(peer.get("gen"))
        except ValueError:
            return bool(self.meta.split_brain)
        plan = generations.relation(self.meta.gen, theirs)
        if plan.kind in (Kind.SPLIT_BRAIN, Kind.UNRELATED):
            sentence = plan_sentence(plan)
            if self.meta.split_brain != sentence:
                self.meta.split_brain = sentence
                self.meta.save(self.home, self.settings.volume)
                self.log.log(sentence)
        return bool(self.meta.split_brain)

    def _facts(self, stall: float) -> Facts:
        silent_sync, silent_public, peer = self._peer_view()
        ping = self.settings.ping_interval if self.settings else 1.0
        wants_outdate = bool((peer or {}).get("outdate_request"))
        if not wants_outdate:
            self._outdate_seen = None
        elif self._outdate_seen is None:  # when this request was first seen (see request_predates_link)
            self._outdate_seen = time.monotonic()
        split_brain = self._split_brain(peer, min(silent_sync, silent_public) < ping)
        links_up = any_link_up([self.ends.my_sync, self.ends.my_public]) if self.ends else True
        if not links_up:
            self._links_back = None
        elif self._links_back is None:  # when our links came back (see Facts.links_up_for)
            self._links_back = time.monotonic()
        common = dict(
            mode=self.mode, ping_interval=ping, silent_sync=silent_sync, silent_public=silent_public,
            peer_mode=(peer or {}).get("mode"), peer_disk=(peer or {}).get("disk"),
            peer_wants_outdate=wants_outdate,
            epoch=self.meta.epoch if self.meta else 0, peer_epoch=int((peer or {}).get("epoch") or 0),
            clock_gap=stall, busy=self._busy, split_brain=split_brain,
            witness_ok=None if self.witness is None else self.witness.ok,
            my_links_up=links_up,
            links_up_for=0.0 if self._links_back is None else time.monotonic() - self._links_back,
        )
        if self.primary is not None:
            return Facts(disk_state=DiskState.UP_TO_DATE, peer_connected=self.primary.link_up(),
                         sync_percent=self.primary.sync_percent,
                         io_suspended=self.primary.io_suspended(), link_synced=self.primary.in_sync,
                         verifying=self.primary.verifying(),
                         app_healthy=self.app_monitor.healthy if self.app_monitor else None,
                         app_restarts=self.app_restarts,
                         restart_limit=self.settings.restart_limit if self.settings else 3, **common)
        if self.secondary is not None:
            group = self.secondary
            return Facts(disk_state=group.disk_state, peer_connected=group.connected(),
                         sync_percent=group.sync_percent, sync_started=group.sync_started, synced=group.synced,
                         request_predates_link=self._outdate_seen is not None and group.since > self._outdate_seen,
                         **common)
        return Facts(disk_state=self._disk_state() or DiskState.UP_TO_DATE, **common)

    def _describe(self) -> dict[str, Any]:
        """What our heartbeats tell the peer; during a startHA, the settings and disks it starts with."""
        settings, metas = self._starting or (self.settings, self.metas)
        disk = worst(m.disk_state for m in metas) if metas else None
        meta = metas[0] if metas else None
        shared = {k: v for k, v in (settings.to_json() if settings else {}).items() if k in SHARED_SETTINGS}
        if settings is not None:
            shared["volumes"] = len(settings.disks)  # the number of --disk, which must match
        mode = Mode.STANDALONE if self._leaving else self.mode
        serving = mode is Mode.PRIMARY and self.primary is not None and self._busy is None
        return {"mode": str(mode), "serving": serving, "disk": str(disk) if disk else None, "mac": self.my_mac,
                "epoch": meta.epoch if meta else 0,
                "gen": meta.gen.to_json() if meta else None,
                "outdate_request": self.outdate_request, "settings": shared, "version": __version__,
                "busy": self._busy}

    def _compare_settings(self) -> None:
        if self.heartbeat is None or self.settings is None:
            return
        peer = self._peer_view()[2] or {}
        theirs = peer.get("settings") or {}
        mine = self._describe()["settings"]
        mismatch = sorted(k for k in SHARED_SETTINGS if k in theirs and theirs.get(k) != mine.get(k))
        if mismatch != self.mismatch:
            self.mismatch = mismatch
            if mismatch:
                detail = ", ".join(f"{k} here {mine.get(k)} / peer {theirs.get(k)}" for k in mismatch)
                self.log.log(f"Settings differ from the peer's: {detail}. Run configureHA on both appliances.")
            else:
                self.log.log("Settings agree with the peer's.")

    # -- actions ------------------------------------------------------------------
    def _act(self, action: Action, sentence: str) -> None:
        if action is Action.NONE:
            return
        if action is Action.SYNC_INTERRUPTED:
            self._set_mode(transition(self.mode, Event.SYNC_INTERRUPTED))
        elif action is Action.SYNC_DONE:
            self._set_mode(transition(self.mode, Event.SYNC_DONE))
        elif action is Action.OUTDATE_SELF:
            assert self.secondary is not None
            self.secondary.outdate()  # every volume: the group's state is what the primary waits for
        elif action is Action.REQUEST_OUTDATE:
            self.outdate_request = True
        elif action is Action.RESUME_DEGRADED:
            assert self.primary is not None
            self.primary.resume(degraded=True)
            self.outdate_request = False
        elif action is Action.RESUME_MIRRORED:
            assert self.primary is not None
            if self.primary.release_held():
                self.outdate_request = False
            else:
                self.log.log("The link to the secondary went again before the held writes were released: "
                             "they stay held until the next decision.")
        elif action is Action.TAKEOVER:
            self._start_worker("taking over", lambda: self._promote(Event.TAKEOVER, sentence))
        elif action is Action.STEP_DOWN:
            self._start_worker("stepping down", lambda: self._step_down(sentence))
        elif action is Action.RESTART_APP:
            self._start_worker("restarting the application", self._restart_app)
        elif action is Action.HAND_OVER:
            self._start_worker("failing over to the peer", lambda: self._hand_over(app_failed=True))

    def _start_worker(self, what: str, job: Callable[[], None]) -> None:
        if self._busy is not None:
            return
        self._busy = what

        def run() -> None:
            try:
                job()
            except Exception as exc:  # a failed action is logged; the loop decides again next tick
                self.log.log(f"{what.capitalize()} failed: {exc}")
            finally:
                with self._lock:
                    self._busy = None

        threading.Thread(target=run, name=what, daemon=True).start()

    def _promote(self, event: Event, why: str) -> None:
        """Secondary -> primary: stop receiving, claim the address, expose and mount, start the app."""
        started = time.monotonic()
        with self._lock:
            settings, ends = self.settings, self.ends
            assert settings is not None and ends is not None and self.metas
            transition(self.mode, event)  # refuses an inconsistent appliance before anything is touched
            state = self._disk_state()
            if state is not DiskState.UP_TO_DATE:
                raise Refused(f"This disk is {state}: not promoting it.")
            iface = arp.iface_for(ends.my_public)
            holder = arp.address_in_use(settings.floating_ip.ip, iface, timeout=min(0.1, settings.ping_interval / 2))
            peer_mac = (self._peer_view()[2] or {}).get("mac")
            if holder is not None and holder != peer_mac:
                raise Refused(f"The floating IP {settings.floating_ip.ip} is answered by {holder}, which is not the "
                              "peer appliance: refusing to take over an address another host uses.")
            if self.secondary is not None:
                # The state checked above may have changed since: a verify's out_of_sync, or a
                # primary back from a freeze whose resync began. From stop_following on nothing
                # changes it, so checked again it holds for the takeover.
                self.secondary.stop_following()
                state = self._disk_state()
                if state is not DiskState.UP_TO_DATE:
                    self._follow_again(settings, ends)
                    raise Refused(f"This disk became {state} while the takeover began: not promoting it.")
                self.secondary.stop()  # from here on nothing is acknowledged to the old primary
                self.secondary = None
            floatip.add(settings.floating_ip, ends.my_public)
            threading.Thread(target=arp.announce, args=(settings.floating_ip.ip, iface), daemon=True).start()
            ip_at = time.monotonic()
            self._new_term()
            group = self._primary_group(settings, ends)
            try:
                group.start()
            except MirrordError:
                # Keep nothing half-claimed: a secondary that cannot serve must not hold the address.
                floatip.remove(settings.floating_ip)
                self._set_mode(transition(self.mode, Event.STEP_DOWN))
                raise
            self.primary = group
            self._copies_are_the_primarys()
            self._set_mode(transition(self.mode, event))
            self._start_app(settings, check=False)
            self.last_takeover = {"reason": why, "ip_seconds": round(ip_at - started, 3),
                                  "serving_seconds": round(time.monotonic() - started, 3)}
            self.log.log(f"Now primary ({event}): floating IP {settings.floating_ip} held after "
                         f"{ip_at - started:.3f} s, serving after {time.monotonic() - started:.3f} s.")
        self._write_trace()

    def _step_down(self, why: str) -> None:
        """Primary -> standalone at once: fail held I/O, stop the app, release everything."""
        with self._lock:
            settings = self.settings
            assert settings is not None
            if self.primary is not None:
                self.primary.resume(degraded=False)  # nothing more is acknowledged here
            self._stop_app(settings, str(self.mode))
            if floatip.remove(settings.floating_ip):
                self.log.log(f"Released floating IP {settings.floating_ip}.")
            if self.primary is not None:
                self.primary.release_filesystems(force=True)
                self.primary.stop()
                self.primary = None
            self._mark_outdated()
            self._stop_companions()
            self._set_mode(transition(self.mode, Event.STEP_DOWN))
            self.log.log(f"Stepped down: this appliance is standalone ({why}). Its disk is Outdated; run startHA "
                         "to make it the secondary of the new primary.")
        self._write_trace()

    def _new_term(self) -> None:
        """Becoming primary: a term higher than any this appliance has served or heard of."""
        assert self.meta is not None and self.settings is not None
        peer = self._peer_view()[2] or {}
        self.meta.update(self.home, self.settings.volume,
                         epoch=max(self.meta.epoch, int(peer.get("epoch") or 0)) + 1)

    def _copies_are_the_primarys(self, forced: bool = False) -> None:
        """Serving now: the copies are the primary's (no longer following: VolumeMeta.following) and
        UpToDate. Only once the primary runs: a start that fails must leave a copy
        that may lack acknowledged writes marked so (the session 8 review)."""
        assert self.settings is not None
        if forced:
            why = ("Inconsistent (blocks the primary's verify found different are served as they are)"
                   if any(m.disk_state is DiskState.INCONSISTENT for m in self.metas)
                   else "Outdated" if any(m.disk_state is DiskState.OUTDATED for m in self.metas)
                   else "last the secondary's copy, or crashed as primary")
            self.log.log(f"startHA --force: serving this appliance's copy of "
                         f"{', '.join(map(str, self.settings.disks))} although it was {why}; writes the other "
                         "appliance acknowledged without it are not in it. Should the other appliance come back "
                         "with such writes, the pair reports a split brain.")
        # UpToDate also when the answering peer's identifiers let an Outdated copy serve: it is the
        # serving copy now, and a later start must not ask for --force because of a stale mark.
        changes: dict[str, Any] = {"following": False, "disk_state": DiskState.UP_TO_DATE}
        try:
            update_together(self.home, [(meta, one.volume, changes)
                                        for meta, one in zip(self.metas, self.settings.volumes())])
        except OSError as exc:  # serving goes on: the marks left only ask for --force once more
            self.log.log(f"Could not record that this appliance's copies are the primary's ({exc}); a later startHA "
                         "making it primary will ask for --force.")

    def _mark_outdated(self) -> None:
        if self.settings is not None:
            update_together(self.home, [(meta, one.volume, {"disk_state": DiskState.OUTDATED})
                                        for meta, one in zip(self.metas, self.settings.volumes())])

    def _primary_group(self, settings: Settings, ends: Endpoints) -> PrimaryGroup:
        return PrimaryGroup([PrimarySide(self.home, one, self.log, config.check_disk(one.disk), ends,
                                         self._on_failover_request, self.secret, meta)
                             for one, meta in zip(settings.volumes(), self.metas)])

    def _on_failover_request(self) -> None:
        with self._lock:
            self._start_worker("failing over to the peer", self._hand_over)

    def _on_promote(self) -> None:
        with self._lock:
            self._start_worker("taking over (failOver)", lambda: self._promote(
                Event.FAILOVER_PROMOTE, "the primary handed over (failOver)"))

    def _hand_over(self, app_failed: bool = False) -> None:
        """failOver, primary's part: stop the app, release the IP, flush through the mirror, go idle."""
        with self._lock:
            settings, primary = self.settings, self.primary
            if primary is None or settings is None:
                raise Refused("This appliance is not the primary.")
            transition(self.mode, Event.FAILOVER_DEMOTE)
            if not primary.in_sync:
                raise Refused("The secondary is not connected and in sync: a failOver now would lose data. "
                              "Wait until HAstatus shows it UpToDate.")
            # A verify's compare pass resends what it finds only when it ends: a secondary
            # promoted meanwhile would serve blocks known to differ (decision 42).
            with primary.exclusive("mirrord verify is comparing the two disks: blocks it finds different on the "
                                   "secondary are resent only after it ends, so the secondary cannot take over now. "
                                   "Run failOver when the verify is done and HAstatus shows the secondary UpToDate."):
                self._stop_app(settings, "primary", check=not app_failed)
                floatip.remove(settings.floating_ip)
                try:
                    primary.hand_over()
                except MirrordError as exc:
                    # Stay the primary we were: address back, application back, then say why.
                    primary.remount()
                    floatip.add(settings.floating_ip, primary.lead.ends.my_public)
                    self._start_app(settings, check=False)
                    raise Refused(f"failOver refused, this appliance stays primary: {exc}") from exc
                primary.stop()
                self.primary = None
                self._mark_outdated()
                self._set_mode(transition(self.mode, Event.FAILOVER_DEMOTE))
                self.log.log("failOver: this appliance is idle; the peer is taking over. Run startHA here to make it "
                             "the new secondary.")

    def _write_trace(self) -> None:
        if self.ends is None:
            return
        try:
            path = write_trace(self.home, str(self.ends.my_public), str(self.ends.peer_public),
                               status=self.status()[1])
            self.log.log(f"Wrote {path}.")
        except (OSError, MirrordError) as exc:
            self.log.log(f"Could not write trace.zip: {exc}")

    def _set_mode(self, mode: Mode) -> None:
        if mode is not self.mode:
            self.log.log(f"Mode {self.mode} -> {mode}.")
        self.mode = mode
        self._save_state()

    def _save_state(self) -> None:
        atomicfile.write_json(self.home.state_file, {"mode": str(self.mode), "side": self.side})

    # -- commands ---------------------------------------------------------------
    def handle(self, command: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        handlers: dict[str, Callable[..., tuple[str, dict[str, Any]]]] = {
            "status": self.status,
            "start_ha": self.start_ha,
            "stop_ha": self.stop_ha,
            "configure_ha": self.configure_ha,
            "fail_over": self.fail_over,
            "trace": self.trace,
            "shutdown": self.shutdown,
            "debug_corrupt_next": self.debug_corrupt_next,
            "backup": self.backup,
            "restore": self.restore,
            "verify": self.verify,
        }
        if command not in handlers:
            raise BadInput(f"Unknown control command {command!r}.")
        if command != "status":
            self.log.log(f"Command {command} received.")
        try:
            return handlers[command](**args)
        except MirrordError as exc:
            if command != "status":
                self.log.log(f"Command {command} {'refused' if exc.exit_code == 3 else 'failed'}: {exc}")
            raise

    def status(self) -> tuple[str, dict[str, Any]]:
        with self._lock:
            settings = self.settings
            peer_connected = False
            sync_percent = 100.0
            shown = self._shown_metas()
            metas = shown or []
            disk_state = "Unknown" if shown is None else str(worst(m.disk_state for m in metas) if metas
                                                             else DiskState.UP_TO_DATE)
            replication: dict[str, Any] = {}
            peer_error = ""
            serving = False
            volumes: list[dict[str, Any]] = [
                {"name": one.volume, "disk": str(one.disk), "mount": str(one.mount) if one.mount else None,
                 "state": str(meta.disk_state)} for one, meta in zip(settings.volumes() if settings else [], metas)]
            if self.primary is not None:
                peer_connected = self.primary.connected()
                sync_percent = self.primary.sync_percent if peer_connected else 0.0
                peer_error = self.primary.last_error
                lead = self.primary.lead.server
                if lead is not None:
                    replication = lead.stats().as_dict()
                    serving = self.mode is Mode.PRIMARY and not self.primary.failed_io() \
                        and not self.primary.io_suspended() \
                        and all(one.mount is None or volume.is_mounted(one.mount) for one in settings.volumes())
                volumes = self.primary.volumes_status()
            elif self.secondary is not None:
                peer_connected = self.secondary.connected()
                sync_percent = self.secondary.sync_percent
                peer_error = self.secondary.last_error
                replication = self.secondary.receiver_stats()
                volumes = self.secondary.volumes_status()
            held = floatip.held(settings.floating_ip) if settings is not None else False
            data = {
                "mode": str(self.mode),
                "role": self.side and (str(self.mode) if self.mode in (Mode.PRIMARY, Mode.SECONDARY) else None),
                "side": self.side,
                "version": __version__,
                "serving": serving,
                "degraded": self.mode is Mode.PRIMARY and not peer_connected,
                "peer_connected": peer_connected,
                "floating_ip_held": held,
                "disk": {"state": disk_state, "sync_percent": round(sync_percent, 2),
                         "path": str(settings.disk) if settings else None,
                         "following": any(m.may_be_behind if self.mode is Mode.STANDALONE else m.following
                                          for m in metas)},
                "volumes": volumes,
                "replication": replication,
                "heartbeat": self.heartbeat.snapshot() if self.heartbeat else {},
                "witness_ok": None if self.witness is None else self.witness.ok,
                "settings_mismatch": self.mismatch,
                "peer_error": peer_error,
                "last_takeover": self.last_takeover,
                "split_brain": next((m.split_brain for m in metas if m.split_brain), None),
                "resync": dict(self.primary.lead.resync) if self.primary is not None else {},
                "app": {"monitored": self.app_monitor is not None,
                        "healthy": self.app_monitor.healthy if self.app_monitor else None,
                        "restarts": self.app_restarts},
                "busy": self._busy,
                "summary": self._last_sentence,
                "settings": settings.to_json() if settings else None,
            }
        summary = self._last_sentence or f"Mode {self.mode}."
        if data["split_brain"] and data["split_brain"] != peer_error:  # HAstatus's text shows a refusal once
            summary = f"{summary} {data['split_brain']}"
        return summary, data

    def _shown_metas(self) -> list[VolumeMeta] | None:
        """What HAstatus reports: the running session's metadata or, on a daemon started standalone, what
        the saved settings' disks hold (an operator asking why startHA refused must see it); None if
        that is unreadable (startHA then says what is wrong with it)."""
        if self.metas or self.settings is None:
            return self.metas
        try:
            return [VolumeMeta.load(self.home, one.volume) for one in self.settings.volumes()]
        except (OSError, ValueError, KeyError):
            return None

    def _peer_mode_now(self, settings: Settings, wait: float) -> str | None:
        """What the peer says it is, listening to its heartbeats for at most ``wait`` seconds."""
        assert self.heartbeat is not None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            peer = self._answering_peer(settings)
            if peer is not None:
                return str(peer.get("mode"))
            time.sleep(0.02)
        return None

    def start_ha(self, discard_my_data: bool = False, force: bool = False,
                 **options: Any) -> tuple[str, dict[str, Any]]:
        return self._start_ha(options, secondary_only=False, discard_my_data=discard_my_data, force=force)

    def _start_ha(self, options: dict[str, Any], secondary_only: bool,
                  discard_my_data: bool = False, force: bool = False) -> tuple[str, dict[str, Any]]:
        """``secondary_only``: a resume after a restart, which must never make this appliance primary.

        Every check comes before the first change, so a refused startHA changes nothing. The
        checks that need the peer's word listen with this start's heartbeats; if one refuses,
        those stop and the companions of the mode this appliance stays in (idle, inconsistent)
        run again as before. A start that fails after the checks is put back the same way, with
        the settings it had before; ha.json is written only once the start succeeded.
        """
        settings = config.parse(options)
        with self._lock:
            side = config.check_local(settings, local_addresses())
            secret = config.read_secret(settings.secret_file)
            if self.mode in (Mode.PRIMARY, Mode.SECONDARY):
                transition(self.mode, Event.START_SECONDARY if side == "secondary" else Event.START_PRIMARY)
            volumes = settings.volumes()
            sizes = [config.check_disk(one.disk) for one in volumes]
            for one in volumes:
                volume.ensure_unused(one.disk)
            metas = [VolumeMeta.load(self.home, one.volume) for one in volumes]
            if discard_my_data and not any(m.split_brain for m in metas):
                raise Refused("There is no split brain to resolve: this appliance has not found one with its peer "
                              "(HAstatus shows it when it has); run startHA without --discard-my-data.")
            ends = settings.endpoints(side)
            before = _Before(self.mode, self.settings, self.side, self.ends, self.metas,
                             (self.settings, self.ends, self.secret) if self.heartbeat is not None else None)
            self._stop_companions()
            self._starting = (settings, metas)
            try:
                self._start_companions(settings, ends, secret)
                role = self._role(settings, side, secondary_only, discard_my_data)
                next_mode = transition(self.mode, Event.START_PRIMARY if role == "primary" else Event.START_SECONDARY)
                if role == "primary":
                    busy = (self._answering_peer(settings) or {}).get("busy")
                    if busy:  # taking over, say: its identifiers and its mode are about to change
                        raise Refused(f"The peer is busy ({busy}), so what it holds is about to change: run "
                                      "startHA again once HAstatus there shows it settled.")
                    peer_copy = self._peer_copy(settings, metas[0].gen)
                    refusal = why_not_primary(worst(m.disk_state for m in metas), any(m.may_be_behind for m in metas),
                                              force, peer_copy, all(m.verify_found for m in metas
                                                                    if m.disk_state is DiskState.INCONSISTENT))
                    if refusal:
                        raise Refused(refusal)
                    diverged = peer_copy is not None and peer_copy.kind in (Kind.SPLIT_BRAIN, Kind.UNRELATED)
                    if force and self._peer_answers(settings) and not diverged:
                        mode = (self._answering_peer(settings) or {}).get("mode", "running")
                        raise Refused(f"startHA --force is for an appliance whose peer is lost for good, but "
                                      f"{ends.peer_public} answers ({mode}): start HA there first, and this "
                                      "appliance becomes its secondary.")
                elif force:
                    raise Refused("startHA --force makes this appliance primary with its own copy, but it becomes "
                                  "the secondary here (the peer is primary, or these settings name it the "
                                  "secondary): run startHA without --force.")
            except MirrordError:
                self._starting = None
                self._restore_companions(before.companions)
                raise
            # Checked: from here on this appliance changes. A step that fails (a port another process
            # holds, a disk that cannot be mounted) puts back what ran before (decision 36).
            saved: list[Path] = []
            try:
                # First: a session whose settings cannot be saved would resume with others after a restart.
                self._save_settings(settings)
                if self.secondary is not None:  # inconsistent: start over as a fresh secondary
                    self.secondary.stop()
                    self.secondary = None
                for meta, one, size in zip(metas, volumes, sizes):
                    recovered = meta.recover(self.home, one.volume, size)
                    if recovered:
                        self.log.log(f"{one.volume}: {recovered}" if len(volumes) > 1 else recovered)
                    meta.save(self.home, one.volume)
                self.settings, self.side, self.ends, self.metas = settings, side, ends, metas
                self._starting = None
                if role == "primary":
                    self._new_term()
                    primary = self._primary_group(settings, ends)
                    primary.start()
                    try:
                        floatip.add(settings.floating_ip, ends.my_public)
                        arp.announce(settings.floating_ip.ip, arp.iface_for(ends.my_public), count=1)
                        self._start_app(settings)
                    except MirrordError:
                        floatip.remove(settings.floating_ip)
                        primary.stop()
                        raise
                    self.primary = primary
                    self._copies_are_the_primarys(forced=force)
                else:
                    if discard_my_data:
                        saved = [self._keep_copy(one, size) for one, size in zip(volumes, sizes)]
                    self.secondary = self._start_secondary(settings, ends, metas, discard_my_data)
            except Exception as exc:  # whatever broke, the appliance must not keep half of this start
                self._roll_back(before, exc)
                raise
            self._set_mode(next_mode)
            disks = ", ".join(str(d) for d in settings.disks)
            if role == "primary":
                message = (f"HA started: this appliance ({ends.my_public}) is the primary; the floating IP "
                           f"{settings.floating_ip} is here and writes to {disks} are mirrored to "
                           f"{ends.peer_sync} once the secondary connects.")
            else:
                message = (f"HA started: this appliance ({ends.my_public}) is the secondary; waiting for the "
                           f"primary {ends.peer_sync} to sync {disks}.")
                if saved:
                    message += (f" Its own changes since the split brain will be overwritten; its copy of the disk "
                                f"was saved to {', '.join(map(str, saved))} first.")
            self.log.log(message)
            return message, self.status()[1]

    def _role(self, settings: Settings, side: str, secondary_only: bool, discard_my_data: bool) -> str:
        """The role this startHA gives: the configured primary becomes primary only if the peer is not
        primary already (after a takeover, the old primary's startHA makes it the new secondary)."""
        if secondary_only:
            return "secondary"
        role = side
        if side == "primary" or self.mode is Mode.IDLE:
            peer_mode = self._peer_mode_now(settings, wait=1.5 * settings.ping_interval)
            role = "secondary" if peer_mode == "primary" else "primary"
            if peer_mode is not None:
                self._check_peer_version(role)
            if self.mode is Mode.IDLE and role == "primary":
                raise Refused("This appliance is idle after a failOver and the peer is not primary: it "
                              "cannot become primary again by itself. Run stopHA here, then startHA.")
        if discard_my_data and role == "primary":
            raise Refused("--discard-my-data makes this appliance the secondary of the peer's data, but the "
                          "peer is not primary: run startHA on the appliance whose data to keep first.")
        return role

    def _keep_copy(self, settings: Settings, size: int) -> Path:
        """--discard-my-data: nothing of this appliance's data is overwritten before a copy exists."""
        self.log.log(f"Saving a copy of {settings.disk} before discarding this appliance's changes.")
        saved = keepcopy.save_copy(self.home, settings.volume, settings.disk, size)
        self.log.log(f"Saved this appliance's copy of {settings.disk} to {saved}.")
        return saved

    def _follow_again(self, settings: Settings, ends: Endpoints) -> None:
        """A secondary that stopped following for a takeover that did not happen follows anew."""
        assert self.secondary is not None
        self.secondary.stop()
        self.secondary = None
        try:
            self.secondary = self._start_secondary(settings, ends, self.metas)
        except MirrordError as exc:  # the mode still says secondary, which only stopHA ends now
            self.log.log(f"Could not wait for the primary again after a takeover was refused ({exc}): nothing "
                         "receives its writes here; run stopHA, then startHA.")

    def _start_secondary(self, settings: Settings, ends: Endpoints, metas: list[VolumeMeta],
                         discard_my_data: bool = False) -> SecondaryGroup:
        volumes = settings.volumes()
        # Before the primary can reach us: from now on it may go on without us at any moment.
        update_together(self.home, [(meta, one.volume, {"following": True}) for meta, one in zip(metas, volumes)
                                    if not meta.following])
        group = SecondaryGroup([
            SecondarySide(self.home, one, self.log, config.check_disk(one.disk), meta, ends, self._on_promote,
                          self.secret, discard_my_data=discard_my_data)
            for one, meta in zip(volumes, metas)])
        try:
            group.start()
        except OSError as exc:
            ports = ",".join(str(one.sync_port) for one in volumes)
            raise MirrordError(f"Cannot listen on {ends.my_sync}:{ports}: {exc.strerror}.") from exc
        return group

    def _roll_back(self, before: _Before, exc: Exception) -> None:
        """A startHA that failed after its checks (the primary or secondary side it began stopped
        itself): the settings, companions and, on an inconsistent appliance, the side waiting for the
        primary run again as before. The metadata stays as the attempt left it: it describes the disk,
        which the attempt may have written (mkfs, a new generation)."""
        self._starting = None
        self._put_back_settings(before.settings)
        self.settings, self.side, self.ends = before.settings, before.side, before.ends
        self.metas = [VolumeMeta.load(self.home, one.volume) for one in before.settings.volumes()] \
            if before.metas and before.settings is not None else before.metas
        self._restore_companions(before.companions)
        self.log.log(f"startHA failed after its checks ({exc}); this appliance stays {self.mode}, with the "
                     "settings it had before.")
        if before.mode is Mode.INCONSISTENT and before.settings is not None and before.ends is not None:
            try:
                self.secondary = self._start_secondary(before.settings, before.ends, self.metas)
            except (MirrordError, OSError) as again:
                self.log.log(f"Could not wait for the primary again with the previous settings: {again} "
                             "Run startHA.")

    def _save_settings(self, settings: Settings) -> None:
        """ha.json before a command changes anything with them: if it cannot be written, nothing runs."""
        try:
            config.save(self.home, settings)
        except OSError as exc:
            raise MirrordError(f"Cannot save the HA settings to {self.home.settings_file}: "
                               f"{exc.strerror or exc}. Nothing was changed; free space or fix the file system "
                               "and run the command again.") from exc

    def _put_back_settings(self, settings: Settings | None) -> None:
        """A command that failed after _save_settings: ha.json names what runs again."""
        try:
            if settings is None:
                self.home.settings_file.unlink(missing_ok=True)
            else:
                config.save(self.home, settings)
        except OSError as exc:
            self.log.log(f"Could not put the previous HA settings back in {self.home.settings_file}: "
                         f"{exc.strerror or exc}. It holds the settings of the command that failed; a restart "
                         "would resume with those.")

    def _check_peer_version(self, role: str) -> None:
        """A peer heard to run another release is refused now, not later by the handshake."""
        theirs = (self._peer_view()[2] or {}).get("version")
        try:
            if role == "secondary":
                link.check_version(theirs, __version__)
            else:
                link.check_version(__version__, theirs if isinstance(theirs, str) else "unknown")
        except HandshakeRefused as exc:
            raise Refused(str(exc)) from exc

    def _start_companions(self, settings: Settings, ends: Endpoints, secret: bytes | None) -> None:
        """Heartbeats, log shipping and the witness: what runs whatever the role.

        ``secret`` is read by the command that starts them, before it changed anything
        (config.read_secret), never here: a bad file must not leave the node silent.
        """
        self.secret = secret
        if self.secret is None:
            self.log.log("No --secret-file: heartbeats and log shipping are not authenticated.")
        self.my_mac = arp.mac_of(arp.iface_for(ends.my_public))
        self.heartbeat = Heartbeat({"sync": (ends.my_sync, ends.peer_sync), "public": (ends.my_public, ends.peer_public)},
                                   config.HEARTBEAT_PORT, interval=tick_period(settings.ping_interval),
                                   secret=self.secret, describe=self._describe)
        self.heartbeat.start()
        self.log_receiver = LogReceiver(self.home, (str(ends.my_public), config.LOGSHIP_PORT), str(ends.peer_public),
                                        self.secret)
        self.log_receiver.start()
        # Ship this HA session's log from the startHA command that began it, so the peer's
        # trace.zip holds all of it (the command line is written before the daemon runs).
        self.shipper = LogShipper(self.home, (str(ends.peer_public), config.LOGSHIP_PORT), str(ends.my_public),
                                  self.secret, start_at=offset_of_last(self.home, b": Command: startHA"))
        self.shipper.start()
        self._start_witness(settings)

    def _start_witness(self, settings: Settings) -> None:
        if settings.witness_ip is not None:
            self.witness = Witness(settings.witness_ip, interval=settings.ping_interval / 2,
                                   max_age=settings.ping_interval)
            self.witness.start()

    def _restore_companions(self, before: tuple[Settings | None, Endpoints | None, bytes | None] | None) -> None:
        """After a refusal or a failed start: the companions that ran before (or none) run again, so the
        peer keeps hearing us."""
        self._stop_companions()
        if before is None:
            self.secret = None
            return
        settings, ends, secret = before
        assert settings is not None and ends is not None
        try:
            self._start_companions(settings, ends, secret)
        except MirrordError as exc:
            self._stop_companions()
            self.log.log(f"Could not restart the heartbeats with the previous settings: {exc}")

    def _stop_companions(self) -> None:
        for part in (self.heartbeat, self.shipper, self.log_receiver, self.witness):
            if part is not None:
                part.stop()
        self.heartbeat = self.shipper = self.log_receiver = self.witness = None
        self.outdate_request = False

    def _in_ha(self) -> bool:
        """Anything of an HA session still runs here, whatever the mode says (a stopHA that failed halfway)."""
        return any(part is not None for part in (self.primary, self.secondary, self.heartbeat, self.shipper,
                                                 self.log_receiver, self.witness))

    def stop_ha(self) -> tuple[str, dict[str, Any]]:
        with self._lock:
            was = self.mode
            if was is Mode.STANDALONE and not self._in_ha():
                return "HA was not running; this appliance is standalone.", self.status()[1]
            try:
                self._teardown("stopHA")
            except MirrordError as exc:
                raise MirrordError(f"stopHA could not finish: {exc} This appliance is still {was}; free what the "
                                   "message names, then run stopHA again.") from exc
            self._set_mode(Mode.STANDALONE)
            message = f"HA stopped: this appliance was {was} and is now standalone."
            self.log.log(message)
            return message, self.status()[1]

    def _teardown(self, why: str) -> None:
        """Leave HA in order: tell the peer first, so it neither takes over nor waits for us.

        Everything still running is stopped, whatever the mode says; if a step fails (a busy
        mount point) the rest stays as it is and the mode unchanged, so the same command can
        be run again once the cause is gone. The caller sets the mode after a success.
        """
        settings, was = self.settings, self.mode
        self._leaving = True  # what our last heartbeats say: "left HA", not "died"
        try:
            if self.secondary is not None:
                self.secondary.leave()  # Outdated, and nothing the primary says is recorded after it
            if self.heartbeat is not None:
                self.heartbeat.send_once()
            if self.primary is not None and settings is not None:
                self.primary.release_alone()  # the operator ended the pair; the peer was told
                self._stop_app(settings, str(was))
                if floatip.remove(settings.floating_ip):
                    self.log.log(f"Released floating IP {settings.floating_ip} ({why}).")
                self.primary.stop()
                self.primary = None
            if self.secondary is not None:
                self.secondary.stop()
                self.secondary = None
            self._stop_companions()
            self.side = None
        finally:
            self._leaving = False

    #: configureHA: what changes in place on a primary (the rest restarts the secondary's side
    #: or needs stopHA/startHA on the primary, which would interrupt the application).
    PRIMARY_LIVE = frozenset({"ping_interval", "start_script", "stop_script", "restart_limit", "floating_ip",
                              "witness_ip", "secret_file", "resync_rate"})

    def configure_ha(self, **changes: Any) -> tuple[str, dict[str, Any]]:
        """Every check (values, files, the secret, what may change in this mode) comes before any change."""
        with self._lock:
            if self.mode is Mode.STANDALONE or self.settings is None or self.side is None:
                raise Refused("HA is not running on this appliance; configureHA changes a running pair. "
                              "Use startHA first.")
            old_settings = self.settings
            new = config.merge(old_settings, changes)
            old = old_settings.to_json()
            changed = sorted(k for k, v in new.to_json().items() if v != old.get(k))
            if not changed:
                return "configureHA: nothing to change; the settings are already these.", self.status()[1]
            if self.mode is Mode.PRIMARY:
                fixed = sorted(set(changed) - self.PRIMARY_LIVE)
                if fixed:
                    raise Refused(f"Changing {', '.join(fixed)} on the primary would interrupt the application: "
                                  "failOver first and change it while this appliance is secondary, or run stopHA "
                                  "and startHA.")
                config.check_scripts(new)  # its disk and mount point are in use, and cannot change here
            else:
                side = config.check_local(new, local_addresses())
                if side != self.side:
                    raise Refused(f"With these addresses this appliance would become the configured {side}; "
                                  "swapping roles needs stopHA and startHA on both appliances.")
                if self.mode is not Mode.IDLE:
                    for one in new.volumes():
                        volume.ensure_unused(one.disk)
            if config.read_secret(new.secret_file) != self.secret:
                # The peer keeps the old secret until its own configureHA: meanwhile each would reject
                # the other's heartbeats, and a secondary that hears nothing takes over (docs/decisions.md 35).
                raise Refused("configureHA cannot change the shared secret of a running pair: the two appliances "
                              "would reject each other's heartbeats until both had it, and the secondary would take "
                              "over. Run stopHA on both appliances, then startHA with the new --secret-file on "
                              "both.")
            self._save_settings(new)
            try:
                if self.mode is Mode.PRIMARY:
                    self._configure_primary(old_settings, new, changed)
                else:
                    self._configure_standby(old_settings, new)
            except Exception:
                self._put_back_settings(self.settings)  # what runs now: the old ones (see the two above)
                raise
            message = f"configureHA: changed {', '.join(changed)}. Run the same configureHA on the other appliance."
            self.log.log(message)
            return message, self.status()[1]

    def _configure_primary(self, old: Settings, new: Settings, changed: list[str]) -> None:
        assert self.primary is not None and self.ends is not None
        if new.floating_ip != old.floating_ip:
            iface = arp.iface_for(self.ends.my_public)
            holder = arp.address_in_use(new.floating_ip.ip, iface, timeout=0.2)
            if holder is not None:
                raise Refused(f"The new floating IP {new.floating_ip.ip} is already answered by {holder}; "
                              "choose a free address.")
            floatip.add(new.floating_ip, self.ends.my_public)
            try:
                floatip.remove(old.floating_ip)
                arp.announce(new.floating_ip.ip, iface, count=1)
            except MirrordError:
                # The settings stay the old ones, so must the address: stopHA and failOver release
                # only the configured one, and a primary would keep the other for good.
                floatip.add(old.floating_ip, self.ends.my_public)
                floatip.remove(new.floating_ip)
                raise
            self.log.log(f"Moved the floating IP from {old.floating_ip} to {new.floating_ip}.")
        self.settings = new
        if "witness_ip" in changed:
            # Only the witness: the heartbeats never pause, or the secondary could hear silence.
            if self.witness is not None:
                self.witness.stop()
                self.witness = None
            self._start_witness(new)
        if self.heartbeat is not None:
            self.heartbeat.set_interval(tick_period(new.ping_interval))
        self.primary.set_settings(new.volumes(), self.secret)

    def _configure_standby(self, old: Settings, new: Settings) -> None:
        """A secondary (or inconsistent) appliance takes any change by restarting its side; an idle one
        only takes the settings (it stays idle until startHA). If the new settings cannot start, the
        old ones run again and the error is reported."""
        assert self.side is not None
        if self.mode is Mode.IDLE:
            before = (old, self.ends, self.secret)
            ends = new.endpoints(self.side)
            self._stop_companions()
            try:
                self._start_companions(new, ends, self.secret)
            except MirrordError:
                self._restore_companions(before)
                raise
            self.settings, self.ends = new, ends
            return
        self._teardown("configureHA")
        self._set_mode(transition(self.mode, Event.STOP))
        try:
            self.start_ha(**self._options(new))
        except MirrordError as exc:
            try:
                self.start_ha(**self._options(old))
            except MirrordError as again:
                raise MirrordError(f"configureHA failed: {exc} Starting again with the previous settings failed "
                                   f"too: {again} This appliance is standalone: run startHA.") from exc
            raise type(exc)(f"configureHA failed and this appliance runs with its previous settings again: "
                            f"{exc}") from exc

    @staticmethod
    def _options(settings: Settings) -> dict[str, Any]:
        """Settings as the options of a startHA that would give them."""
        return {k: v for k, v in settings.to_json().items() if k in config.FIELDS and v is not None}

    def fail_over(self) -> tuple[str, dict[str, Any]]:
        with self._lock:
            ping = self.settings.ping_interval if self.settings else 1.0
            deadline = time.monotonic() + max(30.0, 10 * ping)
            if self.mode is Mode.PRIMARY:
                self._hand_over()
                peer = str(self.ends.peer_public) if self.ends else "the peer"
            else:
                if self.mode is not Mode.SECONDARY or self.secondary is None:
                    transition(self.mode, Event.FAILOVER_PROMOTE)  # raises with the reason
                    raise Refused(f"failOver is not possible while {self.mode}.")
                self.secondary.request_failover()
                peer = ""
        if peer:
            # Done when the new primary says it serves (its heartbeats), so the next command an
            # operator types (reading a file on it, say) finds the filesystem mounted.
            while time.monotonic() < deadline:
                state = self._peer_view()[2] or {}
                if state.get("mode") == "primary" and state.get("serving"):
                    return (f"failOver: this appliance is idle; {peer} is now the primary and serving.",
                            self.status()[1])
                time.sleep(0.05)
            raise MirrordError(f"failOver: this appliance is idle and handed over, but {peer} has not said it "
                               "serves yet; see HAstatus and ha.log on both appliances.")
        while time.monotonic() < deadline:
            with self._lock:
                if self.mode is Mode.PRIMARY and self._busy is None:
                    return "failOver: this appliance is now the primary.", self.status()[1]
            time.sleep(0.05)
        raise MirrordError("failOver: the primary did not hand over in time; see ha.log on both appliances.")

    def trace(self) -> tuple[str, dict[str, Any]]:
        ends = self.ends or self._saved_ends()
        my_ip = str(ends.my_public) if ends else "local"
        peer_ip = str(ends.peer_public) if ends else None
        path = write_trace(self.home, my_ip, peer_ip, status=self.status()[1])
        return f"Wrote {path}.", {"path": str(path)}

    def _saved_ends(self) -> Endpoints | None:
        """Which appliance of the saved settings (ha.json) this is, when HA does not run here (standalone,
        or a restarted daemon): the peer's shipped logs are on disk all the same."""
        if self.settings is None:
            return None
        try:
            return self.settings.endpoints(self.settings.side_of(local_addresses()))
        except BadInput:  # moved to other addresses since: only its own logs
            return None

    def verify(self) -> tuple[str, dict[str, Any]]:
        """mirrord verify: compare both disks while serving; resend what differs."""
        with self._lock:
            primary = self.primary
            if self.mode is not Mode.PRIMARY or primary is None:
                raise Refused(f"This appliance is {self.mode}: run mirrord verify on the primary.")
        # Not under the lock: a verify reads the whole disk, and status must answer meanwhile.
        compared, differed = primary.verify()
        if differed:
            message = (f"Verified {compared} bytes against the secondary: {differed} bytes differed there; they "
                       "are marked out of sync and being resent, and the secondary is Inconsistent until that is "
                       "done (HAstatus shows the resync).")
        else:
            message = f"Verified {compared} bytes against the secondary: the two disks are identical."
        self.log.log(message)
        return message, {"bytes_compared": compared, "bytes_differed": differed}

    def debug_corrupt_next(self, count: int) -> tuple[str, dict[str, Any]]:
        """Fault injection for tests: flip a bit in the payload of the next frames after their CRC."""
        with self._lock:
            if self.primary is None or self.primary.lead.server is None:
                raise Refused("Frame corruption can only be injected on the primary.")
            self.primary.lead.server.debug_corrupt_next(int(count))  # volume r0's link
            message = f"Fault injection: the next {int(count)} frame(s) to the secondary will be corrupted."
            self.log.log(message)
            return message, {}

    def backup(self, path: str) -> tuple[str, dict[str, Any]]:
        """A consistent copy of the disk and the settings while serving (see mirrord/backup.py)."""
        with archive.exclusive():
            with self._lock:
                settings = self.settings
                if settings is None:
                    raise Refused("This appliance has no HA settings (ha.json): nothing to back up; run startHA first.")
                if settings.extra_disks:
                    raise Refused(f"This pair mirrors {len(settings.disks)} volumes; mirrord backup copies a pair "
                                  "of one volume. Back up each filesystem with your own tools (fsfreeze keeps each "
                                  "consistent).")
                if self.mode is Mode.PRIMARY and self.primary is not None:
                    if settings.mount is None or not volume.is_mounted(settings.mount):
                        raise Refused("This primary has no mounted filesystem to freeze (--mount), so a copy of a disk "
                                      "the application writes cannot be consistent; back up a standalone appliance.")
                    freeze, how, size = settings.mount, "fsfreeze", self.primary.lead.disk_size
                    state, following = DiskState.UP_TO_DATE, False  # a serving primary's disk
                elif self.mode is Mode.STANDALONE:
                    meta = VolumeMeta.load(self.home, settings.volume)
                    state, following = meta.disk_state, meta.may_be_behind
                    if state is DiskState.INCONSISTENT:
                        why = ("the primary's online verify found blocks on it that differ, not resent yet"
                               if meta.verify_found else "a sync into it was cut short, so it holds parts of two "
                               "versions and no usable copy")
                        raise Refused(f"This disk is {state}: {why}. Back up the appliance that was primary.")
                    size = config.check_disk(settings.disk)
                    volume.ensure_unused(settings.disk)
                    freeze, how = None, "unused disk"
                else:
                    raise Refused(f"This appliance is {self.mode}: run the backup on the primary (or on a standalone "
                                  "appliance).")
            # Not under the lock: a long copy must never hold up the supervisor.
            manifest = archive.write_backup(Path(path), settings.disk, size, settings.to_json(), freeze, how)
        message = (f"Backup of {settings.disk} ({size} bytes) and the HA settings written to {path} "
                   f"(consistent by {how}; writes waited {manifest['frozen_seconds']:.1f} s).")
        if state is DiskState.OUTDATED:
            message += (" Warning: this disk is Outdated: it lacks the writes the other appliance served since "
                        "this one stopped following it; back up that appliance for the newest data.")
        elif following:
            message += (" Warning: this disk was last the secondary's copy, or this appliance crashed as primary: "
                        "the other appliance may have acknowledged writes after this one last heard it; back up "
                        "that appliance for the newest data.")
        self.log.log(message)
        return message, manifest

    def restore(self, path: str, disk: str | None = None) -> tuple[str, dict[str, Any]]:
        """Only with HA stopped: every checksum is verified before the disk is written."""
        with archive.exclusive(), self._lock:
            if self.mode is not Mode.STANDALONE:
                raise Refused(f"HA is running on this appliance ({self.mode}): stop HA on both appliances first "
                              "(stopHA), then restore.")
            manifest, saved = archive.read_backup(Path(path))
            if disk is not None:
                saved["disk"] = disk
            settings = config.parse({k: v for k, v in saved.items() if k in config.FIELDS and v is not None})
            size = config.check_disk(settings.disk)
            if size < manifest["disk_size"]:
                raise BadInput(f"--disk {settings.disk} has {size} bytes, less than the backup's {manifest['disk_size']}; "
                               "nothing was restored.")
            volume.ensure_unused(settings.disk)
            # Inconsistent before the first restored byte lands: a restore cut short holds neither the
            # old data (which its generation names) nor the backup's, and must never be synced from.
            meta = VolumeMeta.load(self.home, settings.volume)
            meta.update(self.home, settings.volume, disk_state=DiskState.INCONSISTENT)
            try:
                archive.restore_disk(Path(path), manifest, settings.disk)
            except (MirrordError, OSError) as exc:
                raise MirrordError(f"The restore of {settings.disk} stopped part way: {exc} The disk is marked "
                                   "Inconsistent (it holds neither its old data nor the backup's); run mirrord "
                                   "restore again.") from exc
            config.save(self.home, settings)
            self.settings = settings
            # The restored disk is new data whose only tie to the peer is the generation this
            # appliance held before: the secondary gets a full (checksum) sync from it, never
            # a refusal as unrelated data, and no stale bitmap or activity log is replayed.
            meta.gen = generations.restored(meta.gen, generations.new_uuid())
            meta.disk_state, meta.primary_open, meta.bitmap_trusted, meta.split_brain, meta.following = \
                DiskState.UP_TO_DATE, False, True, "", False
            meta.save(self.home, settings.volume)
            extents.bitmap_file(self.home, settings.volume).unlink(missing_ok=True)
            extents.forget_activity_log(self.home, settings.volume)
            message = (f"Restored {settings.disk} and the HA settings from {path} (backup of "
                       f"{manifest.get('created')}, mirrord {manifest.get('mirrord_version')}). Run startHA on the "
                       "primary first, then on the secondary (which gets a full sync).")
            self.log.log(message)
            return message, manifest

    def shutdown(self) -> tuple[str, dict[str, Any]]:
        self._stop.set()
        return "Daemon stopping.", {}

    def _app_env(self, settings: Settings, mode: str) -> AppEnv:
        mounts = [str(one.mount) for one in settings.volumes() if one.mount is not None]
        return AppEnv(mode, str(settings.mount or ""), str(settings.floating_ip.ip), ":".join(mounts))

    def _start_app(self, settings: Settings, check: bool = True) -> None:
        """Start the application; an OCF agent also gets a monitor whose answer is the app-health fact."""
        script = settings.start_script
        if script is None:
            return
        code, output = app.run(script, "start", self._app_env(settings, "primary"))
        self.log.log(f"Ran {script} start: {app.describe(code)}{': ' + output if code else ''}.")
        if check:
            app.check(code, script, "start", output)
        if self.app_monitor is None and app.is_ocf_agent(script):
            self.app_monitor = Monitor(script, self._app_env(settings, "primary"),
                                       interval=max(1.0, 2 * settings.ping_interval))
            self.app_monitor.start()

    def _stop_app(self, settings: Settings, mode: str, check: bool = False) -> None:
        if self.app_monitor is not None:
            self.app_monitor.stop()
            self.app_monitor = None
        self.app_restarts = 0
        script = settings.stop_script
        if script is None:
            return
        code, output = app.run(script, "stop", self._app_env(settings, mode))
        self.log.log(f"Ran {script} stop: {app.describe(code)}{': ' + output if code else ''}.")
        if check:
            app.check(code, script, "stop", output)

    def _restart_app(self) -> None:
        with self._lock:
            settings, monitor = self.settings, self.app_monitor
            assert settings is not None and monitor is not None and settings.start_script is not None
            self.app_restarts += 1
            if settings.stop_script is not None:
                app.run(settings.stop_script, "stop", self._app_env(settings, "primary"))
            code, output = app.run(settings.start_script, "start", self._app_env(settings, "primary"))
            monitor.reset()
            self.log.log(f"Restarted the application ({self.app_restarts} of {settings.restart_limit}): "
                         f"{app.describe(code)}{': ' + output if code else ''}.")


def main(home: Home | None = None, resume: bool = True) -> None:
    Daemon(home or Home.from_env(), resume).run()
