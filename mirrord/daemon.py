"""The per-appliance daemon: control socket, HA state, and the supervisor tick.

Threads: the control server (one thread per request), the tick loop, and the
replication threads owned by the primary or secondary side. Every change of
mode happens under ``self._lock``, either in a command handler or in a tick,
so a command never races the loop.

After a restart the daemon always comes back ``standalone``, whatever mode it
was in before: an appliance that rebooted must never take the primary role or
mount the volume by itself (see docs/operations.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from mirrord import __version__, atomicfile, config
from mirrord.config import Settings
from mirrord.control import ControlServer
from mirrord.errors import BadInput, MirrordError, NotAvailable, Refused
from mirrord.halog import HALog
from mirrord.modes import Event, Mode, transition
from mirrord.net import floatip
from mirrord.net.addresses import local_addresses
from mirrord.paths import Home
from mirrord.replication import volume
from mirrord.replication.meta import DiskState, VolumeMeta
from mirrord.supervisor import Facts, decide

TICK_SECONDS = 0.2
SCRIPT_TIMEOUT = 120.0


class Daemon:
    def __init__(self, home: Home) -> None:
        from mirrord.replication.primary import PrimarySide
        from mirrord.replication.secondary import SecondarySide

        self._sides = (PrimarySide, SecondarySide)
        self.home = home
        home.ensure()
        self.log = HALog(home, "mirrord-daemon")
        self.mode = Mode.STANDALONE
        self.role: str | None = None
        self.settings: Settings | None = config.load(home)
        self.primary: Any = None
        self.secondary: Any = None
        self.meta: VolumeMeta | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._last_sentence = ""
        previous = atomicfile.read_json(home.state_file) or {}
        if previous.get("mode", "standalone") != "standalone":
            self.log.log(f"Daemon restarted while {previous['mode']}: coming back standalone. An appliance never "
                         "resumes HA by itself; run startHA to rejoin.")
        self._save_state()
        self.control = ControlServer(home, self.handle)

    # -- lifecycle ------------------------------------------------------------
    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.control.start()
        self.log.log(f"mirrord {__version__} daemon started (pid {os.getpid()}), mode {self.mode}.")
        try:
            while not self._stop.wait(TICK_SECONDS):
                self.tick()
        finally:
            with self._lock:
                if self.mode is not Mode.STANDALONE:
                    self._teardown("daemon stopping")
            self.control.stop()
            self.log.log("Daemon stopped.")

    def tick(self) -> str:
        """One HA loop iteration; returns the sentence describing what it did."""
        with self._lock:
            decision = decide(self._facts())
            if decision.event is not None:
                self._set_mode(transition(self.mode, decision.event))
            if decision.sentence != self._last_sentence:
                self.log.log(decision.sentence)
                self._last_sentence = decision.sentence
            return decision.sentence

    def _facts(self) -> Facts:
        disk_state = self.meta.disk_state if self.meta else DiskState.UP_TO_DATE
        if self.primary is not None:
            return Facts(self.mode, self.primary.peer.connected, disk_state, self.primary.peer.sync_percent)
        if self.secondary is not None:
            view = self.secondary.primary
            return Facts(self.mode, view.connected, self.secondary.meta.disk_state, view.sync_percent,
                         view.sync_started)
        return Facts(self.mode, False, disk_state, 0.0)

    def _set_mode(self, mode: Mode) -> None:
        if mode is not self.mode:
            self.log.log(f"Mode {self.mode} -> {mode}.")
        self.mode = mode
        self._save_state()

    def _save_state(self) -> None:
        atomicfile.write_json(self.home.state_file, {"mode": str(self.mode), "role": self.role})

    # -- commands ---------------------------------------------------------------
    def handle(self, command: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        handlers = {
            "status": self.status,
            "start_ha": self.start_ha,
            "stop_ha": self.stop_ha,
            "configure_ha": self.configure_ha,
            "fail_over": self.fail_over,
            "shutdown": self.shutdown,
            "debug_corrupt_next": self.debug_corrupt_next,
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
            disk_state = str(self.meta.disk_state) if self.meta else "UpToDate"
            replication: dict[str, Any] = {}
            peer_error = ""
            if self.primary is not None:
                peer_connected = self.primary.peer.connected
                sync_percent = self.primary.peer.sync_percent if peer_connected else 0.0
                peer_error = self.primary.peer.last_error
                if self.primary.server is not None:
                    replication = self.primary.server.stats().as_dict()
            elif self.secondary is not None:
                peer_connected = self.secondary.primary.connected
                sync_percent = self.secondary.primary.sync_percent
                disk_state = str(self.secondary.meta.disk_state)
                peer_error = self.secondary.primary.last_error
                replication = self.secondary.receiver_stats()
            held = False
            if settings is not None:
                held = floatip.held(settings.floating_ip)
            data = {
                "mode": str(self.mode),
                "role": self.role,
                "version": __version__,
                "peer_connected": peer_connected,
                "floating_ip_held": held,
                "disk": {"state": disk_state, "sync_percent": round(sync_percent, 2),
                         "path": str(settings.disk) if settings else None},
                "replication": replication,
                "peer_error": peer_error,
                "summary": self._last_sentence,
                "settings": settings.to_json() if settings else None,
            }
        return self._last_sentence or f"Mode {self.mode}.", data

    def start_ha(self, **options: Any) -> tuple[str, dict[str, Any]]:
        settings = config.parse(options)
        with self._lock:
            role = config.check_local(settings, local_addresses())
            event = Event.START_PRIMARY if role == "primary" else Event.START_SECONDARY
            next_mode = transition(self.mode, event)
            size = config.check_disk(settings.disk)
            volume.ensure_unused(settings.disk)
            meta = VolumeMeta.load(self.home, settings.volume)
            if role == "primary":
                if meta.disk_state is not DiskState.UP_TO_DATE:
                    raise Refused(f"This appliance's disk is {meta.disk_state}: it cannot become primary. "
                                  "Make it the secondary of an UpToDate primary first.")
                side = self._sides[0](self.home, settings, self.log, size)
                side.start()
                try:
                    floatip.add(settings.floating_ip, settings.primary_ip)
                    self._run_script(settings.start_script, "start", settings, "primary")
                except MirrordError:
                    floatip.remove(settings.floating_ip)
                    side.stop()
                    raise
                self.primary = side
            else:
                side = self._sides[1](self.home, settings, self.log, size, meta)
                try:
                    side.start()
                except OSError as exc:
                    raise MirrordError(f"Cannot listen on {settings.secondary_sync_ip}:{settings.sync_port}: "
                                       f"{exc.strerror}.") from exc
                self.secondary = side
            self.settings, self.role, self.meta = settings, role, meta
            config.save(self.home, settings)
            self._set_mode(next_mode)
            me = settings.my_public_ip(role)
            if role == "primary":
                message = (f"HA started: this appliance ({me}) is the primary; the floating IP {settings.floating_ip} "
                           f"is here and writes to {settings.disk} are mirrored to {settings.secondary_sync_ip} "
                           "once the secondary connects.")
            else:
                message = (f"HA started: this appliance ({me}) is the secondary; waiting for the primary "
                           f"{settings.primary_sync_ip} to sync {settings.disk}.")
            self.log.log(message)
            return message, self.status()[1]

    def stop_ha(self) -> tuple[str, dict[str, Any]]:
        with self._lock:
            was = self.mode
            transition(self.mode, Event.STOP)
            if was is Mode.STANDALONE:
                return "HA was not running; this appliance is standalone.", self.status()[1]
            self._teardown("stopHA")
            self._set_mode(Mode.STANDALONE)
            message = f"HA stopped: this appliance was {was} and is now standalone."
            self.log.log(message)
            return message, self.status()[1]

    def _teardown(self, why: str) -> None:
        settings = self.settings
        if self.primary is not None and settings is not None:
            self._run_script(settings.stop_script, "stop", settings, str(self.mode), check=False)
            if floatip.remove(settings.floating_ip):
                self.log.log(f"Released floating IP {settings.floating_ip} ({why}).")
            self.primary.stop()
            self.primary = None
        if self.secondary is not None:
            self.secondary.stop()
            self.secondary = None
        self.role = None

    def configure_ha(self, **changes: Any) -> tuple[str, dict[str, Any]]:
        with self._lock:
            if self.mode is Mode.STANDALONE or self.settings is None:
                raise Refused("HA is not running on this appliance; configureHA changes a running pair. "
                              "Use startHA first.")
            new = config.merge(self.settings, changes)
            changed = sorted(k for k, v in new.to_json().items() if v != self.settings.to_json().get(k))
            if not changed:
                return "configureHA: nothing to change; the settings are already these.", self.status()[1]
            live = {"ping_interval", "start_script", "stop_script"}
            if set(changed) - live:
                raise NotAvailable(
                    f"Changing {', '.join(sorted(set(changed) - live))} on a running pair is not implemented yet; "
                    "run stopHA, then startHA with the new values."
                )
            for flag, script in (("--start-script", new.start_script), ("--stop-script", new.stop_script)):
                if script is not None:
                    config.check_script(flag, script)
            self.settings = new
            for side in (self.primary, self.secondary):
                if side is not None:
                    side.settings = new
            config.save(self.home, new)
            message = f"configureHA: changed {', '.join(changed)}."
            self.log.log(message)
            return message, self.status()[1]

    def fail_over(self) -> tuple[str, dict[str, Any]]:
        raise NotAvailable("failOver is not implemented yet in this version: the graceful role switch arrives with "
                           "automatic failover. Nothing was changed.")

    def debug_corrupt_next(self, count: int) -> tuple[str, dict[str, Any]]:
        """Fault injection for tests: flip a bit in the payload of the next frames after their CRC."""
        with self._lock:
            if self.primary is None or self.primary.server is None:
                raise Refused("Frame corruption can only be injected on the primary.")
            self.primary.server.debug_corrupt_next(int(count))
            message = f"Fault injection: the next {int(count)} frame(s) to the secondary will be corrupted."
            self.log.log(message)
            return message, {}

    def shutdown(self) -> tuple[str, dict[str, Any]]:
        self._stop.set()
        return "Daemon stopping.", {}

    def _run_script(self, script: Path | None, action: str, settings: Settings, mode: str,
                    check: bool = True) -> None:
        if script is None:
            return
        env = dict(os.environ, MIRRORD_MODE=mode, MIRRORD_FLOATING_IP=str(settings.floating_ip.ip),
                   MIRRORD_MOUNT=str(settings.mount or ""))
        try:
            done = subprocess.run([str(script), action], env=env, capture_output=True, text=True,
                                  timeout=SCRIPT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            done = None
            reason = str(exc)
        else:
            reason = f"exit code {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}"
        if done is not None and done.returncode == 0:
            self.log.log(f"Ran {script} {action}.")
            return
        self.log.log(f"{script} {action} failed ({reason}).")
        if check:
            raise MirrordError(f"The {action} script {script} failed ({reason}); see ha.log.")


def main(home: Home | None = None) -> None:
    Daemon(home or Home.from_env()).run()
