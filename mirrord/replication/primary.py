"""The primary's side of a volume: expose the disk, mount it, keep the secondary in sync.

The C server (:class:`PrimaryServer`) does every per-write job; this class
only starts and stops it, builds the loop device and filesystem on top, and
runs one *connector* thread that (re)connects to the secondary, performs the
handshake, hands the data socket to C and reports sync progress over the
control connection. Nothing here runs per write.

It also keeps this copy's generation identifiers (generations.py) as a
primary must: a new data generation when it starts serving without its peer,
the sync identifier when a sync starts, history when it completes; and it
persists the C server's dirty bitmap on every clean stop, so a later start
(or a step-down followed by a rejoin) knows exactly which blocks differ.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from typing import Any, Callable

from mirrord import __version__, atomicfile
from mirrord.config import Endpoints, Settings
from mirrord.errors import HandshakeRefused, MirrordError, NativeError, PeerError, Refused, SplitBrain
from mirrord.halog import HALog
from mirrord.paths import Home
from mirrord.replication import extents, generations, link, volume
from mirrord.replication.generations import FRESH_OR_UNRELATED, Kind, Plan, Side
from mirrord.replication.meta import VolumeMeta
from mirrord.replication.native import PrimaryServer

RETRY_SECONDS = 0.5
#: The data path's sync chunk (ext/server.c SYNC_CHUNK): a dirty run this long is sent in full chunks.
SYNC_CHUNK = 1 << 20
#: After a split brain or unrelated data the answer cannot change until an operator acts
#: (startHA --discard-my-data on the other appliance): retry slowly, log once.
CONFLICT_RETRY_SECONDS = 3.0
PROGRESS_SECONDS = 0.2
#: A running verify saves newly found differences at most this often: each save copies the whole bitmap.
SAVE_DIFFERENCES_SECONDS = 1.0
RESOLVE_COMMAND = "stopHA, then startHA --discard-my-data"


def plan_sentence(plan: Plan) -> str:
    """The one sentence both ha.log and HAstatus show for a refused connection."""
    return generations.describe(plan, command=RESOLVE_COMMAND)


@dataclass
class KeptDifferences:
    """How much of a running verify's differences the bitmap file holds, and since when."""

    bytes: int = 0
    at: float = -math.inf

    def due(self, differed: int, now: float, final: bool = False) -> bool:
        """Save now? The first differences at once (the secondary is told with them), more at
        most every SAVE_DIFFERENCES_SECONDS while the pass runs, and all of them at its end."""
        return differed > self.bytes and (final or not self.bytes or now - self.at >= SAVE_DIFFERENCES_SECONDS)


@dataclass
class PeerView:
    connected: bool = False
    sync_percent: float = 0.0
    sync_done: bool = False
    #: the data path's peer_failures when that sync finished: names the connection that caught up
    synced_link: int = -1
    last_error: str = ""


class PrimarySide:
    def __init__(self, home: Home, settings: Settings, log: HALog, disk_size: int, ends: Endpoints,
                 on_failover_request: Callable[[], None], secret: bytes | None, meta: VolumeMeta) -> None:
        self.secret = secret
        self.meta = meta
        self.home = home
        self.settings = settings
        self.log = log
        self.disk_size = disk_size
        self.ends = ends
        self.on_failover_request = on_failover_request
        self._control: socket.socket | None = None
        self._send_lock = threading.Lock()
        #: _watch's "the sync is done" (stats read to peer.sync_done set) against a verify starting its
        #: repair: otherwise a pass that ended just before the repair began reads as the repair's end
        self._sync_lock = threading.Lock()
        self.device_file: Path = home.device(settings.volume)
        self.server: PrimaryServer | None = None
        self.loop_device: str | None = None
        self.peer = PeerView()
        #: the last sync's plan and counters (HAstatus "resync")
        self.resync: dict[str, Any] = {}
        self._stop = threading.Event()
        self._connector: threading.Thread | None = None
        #: a duplicate of the data socket while a session runs: shutting it down drops the link
        self._guard: socket.socket | None = None
        self._guard_lock = threading.Lock()
        #: data connections handed to C so far: tells a volume group one link from the next
        self.sessions = 0
        #: a verify (command thread) and a clean stop (daemon thread) both write the bitmap file
        self._bitmap_lock = threading.Lock()

    # -- exposing the disk -------------------------------------------------
    def start(self) -> None:
        volume.ensure_unused(self.settings.disk)
        self.home.dev_dir.mkdir(parents=True, exist_ok=True)
        self.device_file.touch(exist_ok=True)
        self.server = PrimaryServer(str(self.settings.disk), str(self.device_file), self.disk_size,
                                    peer_timeout_ms=int(max(1.0, 2 * self.settings.ping_interval) * 1000),
                                    activity_log=str(self.home.activity_log(self.settings.volume)))
        self.apply_resync_rate()
        # Fencing: losing the secondary holds writes until the supervisor decides (see supervisor.py).
        self.server.set_fencing(True)
        self._load_bitmap()
        # Serving without the peer: a new data generation, and a crash from here on is a
        # crash as primary (the bitmap file goes stale with the first write).
        self.meta.gen = generations.start_writing_alone(self.meta.gen, generations.new_uuid())
        self.meta.primary_open = True
        self.meta.save(self.home, self.settings.volume)
        try:
            self.server.start()
        except MirrordError:
            self.meta.primary_open = False  # nothing was served: the bitmap file is still current
            self.meta.save(self.home, self.settings.volume)
            raise
        self.log.log(f"Exposed {self.settings.disk} ({self.disk_size} bytes) as {self.device_file}.")
        try:
            if self.settings.mount is not None:
                self._mount()
        except MirrordError:
            self.stop()
            raise
        self._connector = threading.Thread(target=self._connect_forever, name="connector", daemon=True)
        self._connector.start()

    def remount(self) -> None:
        """Undo a partial release (a failOver that could not finish)."""
        if self.settings.mount is not None and not volume.is_mounted(self.settings.mount):
            self._mount()

    def _mount(self) -> None:
        assert self.settings.mount is not None
        if self.loop_device is None:
            self.loop_device = volume.attach_loop(self.device_file)
        if self.settings.mkfs:
            if volume.has_filesystem(self.loop_device):
                self.log.log(f"Kept the existing filesystem on {self.settings.disk}: --mkfs only formats an empty disk.")
            else:
                volume.make_filesystem(self.loop_device, self.settings.mkfs)
                self.log.log(f"Created an {self.settings.mkfs} filesystem on {self.settings.disk}.")
        volume.mount(self.loop_device, self.settings.mount)
        self.log.log(f"Mounted {self.loop_device} on {self.settings.mount}.")

    def release_filesystem(self, force: bool = False) -> None:
        """Unmount and detach the loop device: every write the filesystem had is on the disk(s) after it.

        ``force`` (stepping down): if the filesystem is busy or broken, detach it lazily
        rather than keep it; its I/O already fails, so nothing more can be acknowledged.
        """
        if self.settings.mount is not None and volume.is_mounted(self.settings.mount):
            try:
                volume.unmount(self.settings.mount)
            except MirrordError:
                if not force:
                    raise
                volume.unmount(self.settings.mount, lazy=True)
            self.log.log(f"Unmounted {self.settings.mount}.")
        if self.loop_device is not None:
            volume.detach_loop(self.loop_device)
            self.loop_device = None

    def hand_over(self) -> None:
        """failOver, primary's part: flush everything through the mirror, then tell the secondary to promote."""
        assert self.server is not None
        if not (self.peer.connected and self.peer.sync_done):
            raise Refused("The secondary is not connected and in sync: a failOver now would lose data. "
                          "Wait until HAstatus shows it UpToDate.")
        self.release_filesystem()
        with self._send_lock:
            if self._control is None:
                raise MirrordError("The control connection to the secondary broke during failOver; this "
                                   "appliance stays primary without its filesystem mounted: run stopHA, then startHA.")
            link.send(self._control, {"type": "promote"})
        self.log.log(f"Asked {self.ends.peer_sync} to take over: every write is on its disk.")

    def drop_link(self) -> bool:
        """Break the data connection the ordinary way (the C side loses its peer, with fencing) and
        let the connector reconnect; False if there was none. For a volume group's fate sharing."""
        with self._guard_lock:
            if self._guard is None:
                return False
            guard, self._guard = self._guard, None  # once per session; the session closes it
            try:
                guard.shutdown(socket.SHUT_RDWR)
            except OSError:
                return False
            return True

    def apply_resync_rate(self) -> None:
        """--resync-rate as the data path's ceiling (MiB/s; 0: none), also on a running sync."""
        assert self.server is not None
        self.server.set_sync_rate(int(self.settings.resync_rate * (1 << 20)))

    def verify(self) -> tuple[int, int]:
        """Online verify (docs/protocol.md, VERIFY): (bytes compared, bytes that differed on the secondary).

        Runs while serving. Differences are marked dirty, saved in the bitmap
        file and resent when the pass ends; from the first one the secondary is
        Inconsistent until that resync is done (decision 42).
        """
        # One server throughout: a stopHA meanwhile sets self.server to None.
        server = self.server
        assert server is not None
        if not (self.peer.connected and self.peer.sync_done) or server.stats().sync_active:
            raise Refused("The secondary is not connected and in sync: verify compares two copies that should be "
                          "identical. Wait until HAstatus shows the secondary UpToDate.")
        server.start_verify(0)
        # Bounded: a verify reads the disk on both sides; 20 MiB/s is far below either.
        deadline = time.monotonic() + 60 + self.disk_size / (20 << 20)
        kept, timed_out = KeptDifferences(), False
        while (stats := server.stats()).sync_active:
            self._keep_differences(server, kept, stats.verify_diff_bytes)
            if time.monotonic() > deadline:
                server.stop_sync()  # returns once the pass stopped: the next look ends the loop
                timed_out = True
            else:
                time.sleep(0.05)
        self._keep_differences(server, kept, stats.verify_diff_bytes, final=True)
        if not (stats.sync_done or timed_out):
            raise PeerError(f"The verify stopped at {stats.sync_offset} of {self.disk_size} bytes: "
                            f"{stats.last_error or 'the secondary went away'}. Differences found so far are "
                            "marked and resent when it reconnects.")
        if stats.verify_diff_bytes:
            # One step for the progress reporter (_watch): it must never read the verify's
            # finished pass as a finished sync once the repair has begun.
            with self._sync_lock:
                server.start_sync(0, dirty_only=True)
                self.peer.sync_done = False
        if timed_out:
            found = (f"the {stats.verify_diff_bytes} bytes that differed until then are being resent"
                     if stats.verify_diff_bytes else "nothing differed until then")
            raise MirrordError(f"The verify did not finish in time (at {stats.sync_offset} of {self.disk_size} "
                               f"bytes) and was stopped; {found}. Run mirrord verify again.")
        return stats.bytes_verified, stats.verify_diff_bytes

    def _keep_differences(self, server: PrimaryServer, kept: KeptDifferences, differed: int,
                          final: bool = False) -> None:
        """Differences found: make them survive a crash of either appliance before anything repairs them.

        Until now only the C server's memory knows them, and their extents need
        not be in the activity log: a crash of this primary would forget them
        and the next resync would skip them. The secondary holds blocks known to
        be wrong from the first one on, and a pass can take hours: it must not
        be promoted as if its copy were whole (decision 42).
        """
        now = time.monotonic()
        if not kept.due(differed, now, final):
            return
        if not kept.bytes:
            self._tell_secondary({"type": "out_of_sync", "bytes": differed})
        kept.bytes, kept.at = differed, now
        try:
            self._persist_bitmap(server)
        except OSError as exc:
            # The repair runs all the same: not resending them would be worse than a crash forgetting them.
            self.log.log(f"Could not save the differences the verify found ({exc}): they are resent, but a crash "
                         "of this appliance before that is done would forget them.")

    def _tell_secondary(self, message: dict[str, Any]) -> None:
        """Best effort: without a working control connection the link is lost, and fencing makes
        the secondary Outdated (or this primary step down) before anything more is acknowledged."""
        with self._send_lock:
            if self._control is None:
                return
            try:
                link.send(self._control, message)
            except PeerError:
                return  # the connector notices the broken connection on its own

    def stop(self) -> None:
        # Unmount while the peer is still attached: the filesystem's last writes
        # (journal, superblock) must be mirrored like any other.
        self.release_filesystem()
        self._stop.set()
        if self._connector is not None:
            self._connector.join(timeout=10)
        if self.server is not None:
            try:
                self.server.stop()
            except NativeError as exc:
                if getattr(exc, "errno", None) != errno.EIO:
                    raise  # still serving (EBUSY): a later stop tries again
                # Stopped, but writes may be missing from this disk: primary_open stays set,
                # so the next start treats this stop as a crash of the primary.
                self.server = None
                self.log.log(f"Stopped exposing {self.settings.disk}, but not cleanly: {exc}. The next start "
                             "treats it as a crash of this primary; check the disk before you start HA again.")
                return
            self._save_bitmap()
            self.server = None
            self.log.log(f"Stopped exposing {self.settings.disk}.")

    # -- the persisted dirty bitmap -----------------------------------------
    def _load_bitmap(self) -> None:
        assert self.server is not None
        try:
            data = extents.bitmap_file(self.home, self.settings.volume).read_bytes()
        except FileNotFoundError:
            return
        try:
            self.server.load_dirty_bitmap(data)
        except MirrordError as exc:  # another disk size: the file describes another disk
            self.meta.bitmap_trusted = False
            self.log.log(f"Ignored the saved dirty bitmap ({exc}); the next sync is a full one.")

    def _save_bitmap(self) -> None:
        """Clean stop: the bitmap file first, then the meta file that says it is current."""
        assert self.server is not None
        with self._bitmap_lock:
            self._write_bitmap_file(self.server)
            self.meta.primary_open = False
            self.meta.save(self.home, self.settings.volume)

    def _persist_bitmap(self, server: PrimaryServer) -> None:
        """The live bitmap to the file while serving, with primary_open still set: after a crash,
        recover() adds the activity log's extents to it, so the blocks it holds now are resynced.

        Bits that are cleared later (synced) stay set in the file until the next save: a crash
        resends them once more, never less than differs. After a clean stop the file is final.
        """
        with self._bitmap_lock:
            if self.meta.primary_open:
                self._write_bitmap_file(server)

    def _write_bitmap_file(self, server: PrimaryServer) -> None:
        atomicfile.write_bytes(extents.bitmap_file(self.home, self.settings.volume), server.dirty_bitmap())

    def start_writing_alone(self) -> None:
        """The supervisor lets this primary acknowledge writes its lost secondary does not get."""
        if not self.meta.gen.bitmap:
            self.meta.gen = generations.start_writing_alone(self.meta.gen, generations.new_uuid())
            self.meta.save(self.home, self.settings.volume)

    # -- the replication link ----------------------------------------------
    def _connect_forever(self) -> None:
        reported = ""  # one line per outage and reason in ha.log, not one per retry
        while not self._stop.is_set():
            pause = RETRY_SECONDS
            try:
                self._session()
                reported = ""
            except SplitBrain as exc:
                self.peer.last_error = str(exc)
                if str(exc) != reported:
                    self.log.log(f"Secondary {self.ends.peer_sync} refused: {exc}")
                    reported = str(exc)
                pause = CONFLICT_RETRY_SECONDS
            except (PeerError, OSError) as exc:
                reason = str(exc)
                was_connected = self.peer.connected
                self.peer.last_error = reason
                # A new reason is logged (e.g. "connection refused" then the secondary's refusal).
                if was_connected or reason != reported:
                    self.log.log(f"Secondary {self.ends.peer_sync} not replicating: {reason}")
                    reported = reason
            self.peer.connected = False
            self._stop.wait(pause)

    def _dial(self) -> socket.socket:
        s = socket.create_connection((str(self.ends.peer_sync), self.settings.sync_port),
                                     timeout=max(1.0, self.settings.ping_interval),
                                     source_address=(str(self.ends.my_sync), 0))
        link.tune(s, user_timeout_ms=int(max(1.0, 2 * self.settings.ping_interval) * 1000))
        return s

    def _session(self) -> None:
        assert self.server is not None
        control = self._dial()
        try:
            mine = secrets.token_hex(16)
            hello = link.hello(node=str(self.ends.my_sync), role="primary", volume=self.settings.volume,
                               disk_size=self.disk_size, version=__version__, settings=self.settings.to_json())
            me = Side(gen=self.meta.gen, primary=True, bitmap_trusted=self.meta.bitmap_trusted)
            sync_uuid = generations.next_sync_uuid(self.meta.gen)
            link.send(control, {**hello, "nonce": mine, "state": link.state(me), "sync_uuid": sync_uuid})
            reply = self._expect(control, "challenge")
            theirs = str(reply.get("nonce"))
            if not link.proof_ok(self.secret, "secondary", reply.get("proof"), mine, theirs):
                reason = "the secondary does not know the shared secret (check --secret-file on both appliances)"
                link.send(control, {"type": "refuse", "reason": reason})
                raise HandshakeRefused(reason)
            link.send(control, {"type": "auth", "proof": link.proof(self.secret, "primary", theirs, mine)})
            reply, plan, extra = self._agree(control, me)
            # Every block this sync must send is in the bitmap before the identifiers say the
            # bitmap counts from the sync identifier: the data connection may fail right after
            # the secondary adopts it, and the next connect then resumes from this bitmap.
            self._mark_for_sync(plan, extra)
            compares = self._compares(plan)
            if plan.kind is not Kind.IN_SYNC:
                self.meta.gen = generations.begin_sync_source(
                    self.meta.gen, generations.sync_uuid_for(plan, self.meta.gen, sync_uuid))
                self.meta.checksum_sync = self.meta.gen.bitmap if compares else ""
                if plan.kind is Kind.FULL:
                    self.meta.bitmap_trusted = True
            self.meta.split_brain = ""
            self.meta.save(self.home, self.settings.volume)
            data = self._dial()
            token = str(reply["session"])
            link.send(data, {"type": "data", "session": token, "proof": link.proof(self.secret, "data", token)})
            if link.recv(data)["type"] != "ok":
                data.close()
                raise PeerError("the secondary did not accept the data connection")
            data.setblocking(True)
            # Keep a handle on the data socket: if the control connection fails, shutting
            # the data socket down makes the C side lose its peer the ordinary way, with
            # fencing (held writes), never a silent switch to local-only writes.
            guard = socket.socket(fileno=os.dup(data.fileno()))
            with self._guard_lock:
                self._guard = guard
            self.sessions += 1
            self.server.attach_peer(data.detach())
            kind = "checksum" if compares else self._sync_kind(plan)
            if kind == "full" and plan.kind is Kind.BITMAP:  # over the threshold: copy it all, in one pass
                self.server.mark_dirty(0, self.disk_size)
            self.server.start_sync(0, dirty_only=True, checksum=kind == "checksum")
            self.peer = PeerView(connected=True)
            self._control = control
            total = self.server.stats().sync_total
            self.resync = {"kind": kind, "plan": str(plan.kind),
                           "rule": plan.rule, "why": plan.why, "dirty_bytes_at_start": total,
                           "extra_bytes": sum(length for _, length in extra), "bytes_sent": 0, "done": False}
            what = {"full": f"full sync of {total} bytes",
                    "checksum": f"checksum sync of {total} bytes (compared, only what differs is copied)",
                    "bitmap": f"bitmap resync of {total} bytes the secondary lacks"}[kind]
            why = f" ({plan.why})" if plan.why else ""
            resolves = " to resolve the split brain" if plan.resolves else ""
            self.log.log(f"Connected to secondary {self.ends.peer_sync}; {what}{resolves}{why} started while serving.")
            try:
                self._watch(control)
            finally:
                with self._guard_lock:
                    self._guard = None
                    try:
                        guard.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass  # already shut down (drop_link)
                    guard.close()
        finally:
            with self._send_lock:
                self._control = None
            control.close()

    def _mark_for_sync(self, plan: Plan, extra: list[extents.Range]) -> None:
        """Every sync is a bitmap sync (DRBD's way): our bitmap holds what the secondary lacks
        since the generation it holds (or since the sync that was cut short); add the blocks it
        changed on its own, and for a full sync every block, so one cut short leaves only the
        rest dirty."""
        assert self.server is not None
        if plan.kind is Kind.FULL:
            self.server.mark_dirty(0, self.disk_size)
        for offset, length in extra:
            self.server.mark_dirty(offset, length)

    def _agree(self, control: socket.socket, me: Side) -> tuple[dict[str, Any], Plan, list[extents.Range]]:
        """The secondary's state and both sides' plan: the same one, or the connection is refused."""
        reply = link.recv(control)
        if reply["type"] not in ("welcome", "refuse"):
            raise PeerError(f"expected 'welcome' from the secondary, got {reply['type']!r}")
        if reply["type"] == "refuse" and "state" not in reply:
            raise HandshakeRefused(f"the secondary refused: {reply.get('reason')}")
        peer, extra = link.parse_state(reply.get("state"), primary=False, disk_size=self.disk_size)
        plan = generations.compare(me, peer)
        if plan.refused:
            sentence = plan_sentence(plan)
            if reply["type"] == "welcome":
                link.send(control, {"type": "refuse", "reason": sentence})
            if self.meta.split_brain != sentence:
                self.meta.split_brain = sentence
                self.meta.save(self.home, self.settings.volume)
            raise SplitBrain(sentence)
        if reply["type"] == "refuse":
            raise HandshakeRefused(f"the secondary refused: {reply.get('reason')}")
        theirs = reply.get("plan")
        mine = plan.mirrored()
        if not isinstance(theirs, dict) or theirs.get("kind") != str(mine.kind) or theirs.get("source") != mine.source:
            reason = f"the secondary computed another sync plan ({theirs!r}, here {plan.kind}/{plan.source})"
            link.send(control, {"type": "refuse", "reason": reason})
            raise PeerError(reason)
        return reply, plan, extra

    def _compares(self, plan: Plan) -> bool:
        """Does this plan's sync compare checksums before it copies?

        A full sync between disks of a common history (the bitmap could not
        be trusted, or it did not reach back far enough) does: most blocks are
        usually equal. So does every full sync with --checksum-sync, and a
        bitmap resync that goes on with such a sync (the target is at its
        identifier, r70, or never noted its start, r71: our bitmap identifier
        is still the one it started under): its bitmap holds every block that
        sync marked, most of them equal on both sides.
        """
        if plan.kind is Kind.FULL:
            return plan.rule not in FRESH_OR_UNRELATED or self.settings.checksum_sync
        return plan.kind is Kind.BITMAP and bool(self.meta.checksum_sync) \
            and self.meta.gen.bitmap == self.meta.checksum_sync

    def _sync_kind(self, plan: Plan) -> str:
        """How the blocks marked dirty for a sync that does not compare are sent: "bitmap" or "full".

        A bitmap resync over --full-sync-threshold whose dirty blocks are
        scattered (runs shorter than a sync chunk on average) copies the whole
        disk: one sequential pass of full chunks beats many small ones. A long
        contiguous remainder, such as an interrupted sync's, stays a bitmap
        resync: it is already sequential.
        """
        if plan.kind is Kind.FULL:
            return "full"
        assert self.server is not None
        stats = self.server.stats()
        if 100 * stats.dirty_bytes <= self.settings.full_sync_threshold * self.disk_size:
            return "bitmap"
        bits = int.from_bytes(self.server.dirty_bitmap(), "little")
        runs = (bits & ~(bits << 1)).bit_count()  # each run of set bits starts with a 0 -> 1 step
        if runs and stats.dirty_blocks / runs >= SYNC_CHUNK // stats.dirty_granularity:
            return "bitmap"
        self.log.log(f"Copying the whole disk instead of a bitmap resync: {100 * stats.dirty_bytes / self.disk_size:.0f} "
                     f"% of it is dirty in {runs} scattered runs, over --full-sync-threshold "
                     f"{self.settings.full_sync_threshold} %.")
        return "full"

    @staticmethod
    def _expect(control: socket.socket, kind: str) -> dict[str, object]:
        reply = link.recv(control)
        if reply["type"] == "refuse":
            raise HandshakeRefused(f"the secondary refused: {reply.get('reason')}")
        if reply["type"] != kind:
            raise PeerError(f"expected {kind!r} from the secondary, got {reply['type']!r}")
        return reply

    def _watch(self, control: socket.socket) -> None:
        """Report progress until the link breaks or we are stopped.

        A finished sync is reported (100 %, UpToDate, failOver allowed, held writes released)
        only once the secondary says ``synced``: it has saved the identifiers ``sync_done``
        carried. Reporting it when the last block was acknowledged left a gap. A secondary that
        crashed before it saved came back at the sync identifier, by then only in our history,
        and got a full sync (r60) for a few changed blocks, after HAstatus had shown it UpToDate.
        That crash can still happen in the window between our save and its save (a full sync:
        more than needed, never less), but nothing calls the pair in sync inside it.
        """
        assert self.server is not None
        started = time.monotonic()
        #: sync_done sent, synced not yet back: the data link the sync finished on
        awaiting: int | None = None
        while not self._stop.is_set():
            with self._sync_lock:
                stats = self.server.stats()
                if not stats.peer_connected:
                    raise PeerError(f"data connection lost ({stats.last_error or 'no reason given'})")
                done = stats.sync_done and not stats.sync_active
                finished = done and not self.peer.sync_done and awaiting is None
                # Progress as DRBD shows it: the share of the disk the secondary has, and 100 %
                # only once it recorded that it holds all of it.
                self.peer.sync_percent = 100.0 if self.peer.sync_done else \
                    min(99.99, 100.0 * (1 - stats.dirty_bytes / self.disk_size))
                self.resync["bytes_sent"] = stats.bytes_synced
                if finished:
                    # History first, then tell the secondary, which adopts these identifiers.
                    self.meta.gen = generations.finish_sync_source(self.meta.gen)
                    self.meta.bitmap_trusted, self.meta.checksum_sync = True, ""
                    self.meta.save(self.home, self.settings.volume)
                    awaiting = stats.peer_failures
                with self._send_lock:
                    link.send(control, {"type": "progress", "percent": self.peer.sync_percent})
                    if finished:
                        link.send(control, {"type": "sync_done", "gen": self.meta.gen.to_json()})
            readable, _, _ = select.select([control], [], [], PROGRESS_SECONDS)
            if not readable:
                continue
            msg = link.recv(control)  # EOF raises PeerError
            if msg["type"] == "failover_request":
                self.on_failover_request()
            elif msg["type"] == "synced":
                if awaiting is None:
                    raise PeerError("the secondary confirmed a sync that was not finished")
                with self._sync_lock:
                    self.peer.synced_link, awaiting = awaiting, None
                    self.peer.sync_done = self.resync["done"] = True
                    self.peer.sync_percent = 100.0
                self.log.log(f"Sync to {self.ends.peer_sync} complete ({stats.bytes_synced} bytes sent in "
                             f"{time.monotonic() - started:.1f} s); the secondary is UpToDate.")
