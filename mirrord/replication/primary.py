"""The primary's side of a volume: expose the disk, mount it, keep the secondary in sync.

The C server (:class:`PrimaryServer`) does every per-write job; this class
only starts and stops it, builds the loop device and filesystem on top, and
runs one *connector* thread that (re)connects to the secondary, performs the
handshake, hands the data socket to C and reports sync progress over the
control connection. Nothing here runs per write.
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mirrord import __version__
from typing import Callable

from mirrord.config import Endpoints, Settings
from mirrord.errors import HandshakeRefused, MirrordError, PeerError, Refused
from mirrord.halog import HALog
from mirrord.paths import Home
from mirrord.replication import link, volume
from mirrord.replication.native import PrimaryServer

RETRY_SECONDS = 0.5
PROGRESS_SECONDS = 0.2


@dataclass
class PeerView:
    connected: bool = False
    sync_percent: float = 0.0
    sync_done: bool = False
    last_error: str = ""


class PrimarySide:
    def __init__(self, home: Home, settings: Settings, log: HALog, disk_size: int, ends: Endpoints,
                 on_failover_request: Callable[[], None], secret: bytes | None, lineage: str) -> None:
        self.secret = secret
        self.lineage = lineage
        self.home = home
        self.settings = settings
        self.log = log
        self.disk_size = disk_size
        self.ends = ends
        self.on_failover_request = on_failover_request
        self._control: socket.socket | None = None
        self._send_lock = threading.Lock()
        self.device_file: Path = home.device(settings.volume)
        self.server: PrimaryServer | None = None
        self.loop_device: str | None = None
        self.peer = PeerView()
        self._stop = threading.Event()
        self._connector: threading.Thread | None = None

    # -- exposing the disk -------------------------------------------------
    def start(self) -> None:
        volume.ensure_unused(self.settings.disk)
        self.home.dev_dir.mkdir(parents=True, exist_ok=True)
        self.device_file.touch(exist_ok=True)
        self.server = PrimaryServer(str(self.settings.disk), str(self.device_file), self.disk_size,
                                    peer_timeout_ms=int(max(1.0, 2 * self.settings.ping_interval) * 1000))
        # Fencing: losing the secondary holds writes until the supervisor decides (see supervisor.py).
        self.server.set_fencing(True)
        self.server.start()
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

    def stop(self) -> None:
        # Unmount while the peer is still attached: the filesystem's last writes
        # (journal, superblock) must be mirrored like any other.
        self.release_filesystem()
        self._stop.set()
        if self._connector is not None:
            self._connector.join(timeout=10)
        if self.server is not None:
            self.server.stop()
            self.server = None
            self.log.log(f"Stopped exposing {self.settings.disk}.")

    # -- the replication link ----------------------------------------------
    def _connect_forever(self) -> None:
        reported = ""  # one line per outage and reason in ha.log, not one per retry
        while not self._stop.is_set():
            try:
                self._session()
                reported = ""
            except (PeerError, OSError) as exc:
                reason = str(exc)
                was_connected = self.peer.connected
                self.peer.last_error = reason
                # A new reason is logged (e.g. "connection refused" then the secondary's refusal).
                if was_connected or reason != reported:
                    self.log.log(f"Secondary {self.ends.peer_sync} not replicating: {reason}")
                    reported = reason
            self.peer.connected = False
            self._stop.wait(RETRY_SECONDS)

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
            link.send(control, {**hello, "nonce": mine, "lineage": self.lineage})
            reply = self._expect(control, "challenge")
            theirs = str(reply.get("nonce"))
            if not link.proof_ok(self.secret, "secondary", reply.get("proof"), mine, theirs):
                reason = "the secondary does not know the shared secret (check --secret-file on both appliances)"
                link.send(control, {"type": "refuse", "reason": reason})
                raise HandshakeRefused(reason)
            link.send(control, {"type": "auth", "proof": link.proof(self.secret, "primary", theirs, mine)})
            reply = self._expect(control, "welcome")
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
            self.server.attach_peer(data.detach())
            # Every sync is a bitmap sync (DRBD's way). Same lineage: our bitmap holds exactly
            # what the secondary lacks, whether it was UpToDate when it left or cut off in the
            # middle of a sync (then the sync resumes where it stopped). Otherwise every block
            # is marked first: a full sync that is cut short leaves only the rest dirty.
            bitmap = reply.get("source") == self.lineage
            if not bitmap:
                self.server.mark_dirty(0, self.disk_size)
            self.server.start_sync(0, dirty_only=True)
            self.peer = PeerView(connected=True)
            self._control = control
            total = self.server.stats().sync_total
            kind = (f"bitmap resync of {total} bytes the secondary lacks" if bitmap
                    else f"full sync of {total} bytes")
            self.log.log(f"Connected to secondary {self.ends.peer_sync}; {kind} started while serving.")
            try:
                self._watch(control)
            finally:
                guard.shutdown(socket.SHUT_RDWR)
                guard.close()
        finally:
            with self._send_lock:
                self._control = None
            control.close()

    @staticmethod
    def _expect(control: socket.socket, kind: str) -> dict[str, object]:
        reply = link.recv(control)
        if reply["type"] == "refuse":
            raise HandshakeRefused(f"the secondary refused: {reply.get('reason')}")
        if reply["type"] != kind:
            raise PeerError(f"expected {kind!r} from the secondary, got {reply['type']!r}")
        return reply

    def _watch(self, control: socket.socket) -> None:
        """Report progress until the link breaks or we are stopped."""
        assert self.server is not None
        started = time.monotonic()
        while not self._stop.is_set():
            stats = self.server.stats()
            if not stats.peer_connected:
                raise PeerError(f"data connection lost ({stats.last_error or 'no reason given'})")
            # Progress as DRBD shows it: the share of the disk the secondary has.
            percent = 100.0 * (1 - stats.dirty_bytes / self.disk_size)
            done = stats.sync_done and not stats.sync_active
            self.peer.sync_percent = 100.0 if done else percent
            with self._send_lock:
                link.send(control, {"type": "progress", "percent": self.peer.sync_percent})
                if done and not self.peer.sync_done:
                    link.send(control, {"type": "sync_done", "source": self.lineage})
            if done and not self.peer.sync_done:
                self.peer.sync_done = True
                self.log.log(f"Sync to {self.ends.peer_sync} complete ({stats.bytes_synced} bytes sent in "
                             f"{time.monotonic() - started:.1f} s); the secondary is UpToDate.")
            readable, _, _ = select.select([control], [], [], PROGRESS_SECONDS)
            if readable and link.recv(control)["type"] == "failover_request":  # EOF raises PeerError
                self.on_failover_request()
