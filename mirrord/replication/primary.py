"""The primary's side of a volume: expose the disk, mount it, keep the secondary in sync.

The C server (:class:`PrimaryServer`) does every per-write job; this class
only starts and stops it, builds the loop device and filesystem on top, and
runs one *connector* thread that (re)connects to the secondary, performs the
handshake, hands the data socket to C and reports sync progress over the
control connection. Nothing here runs per write.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mirrord import __version__
from mirrord.config import Settings
from mirrord.errors import HandshakeRefused, MirrordError, PeerError
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
    def __init__(self, home: Home, settings: Settings, log: HALog, disk_size: int) -> None:
        self.home = home
        self.settings = settings
        self.log = log
        self.disk_size = disk_size
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
        self.server = PrimaryServer(str(self.settings.disk), str(self.device_file), self.disk_size)
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

    def _mount(self) -> None:
        assert self.settings.mount is not None
        self.loop_device = volume.attach_loop(self.device_file)
        if self.settings.mkfs:
            if volume.has_filesystem(self.loop_device):
                self.log.log(f"Kept the existing filesystem on {self.settings.disk}: --mkfs only formats an empty disk.")
            else:
                volume.make_filesystem(self.loop_device, self.settings.mkfs)
                self.log.log(f"Created an {self.settings.mkfs} filesystem on {self.settings.disk}.")
        volume.mount(self.loop_device, self.settings.mount)
        self.log.log(f"Mounted {self.loop_device} on {self.settings.mount}.")

    def stop(self) -> None:
        # Unmount while the peer is still attached: the filesystem's last writes
        # (journal, superblock) must be mirrored like any other.
        if self.settings.mount is not None and volume.is_mounted(self.settings.mount):
            volume.unmount(self.settings.mount)
            self.log.log(f"Unmounted {self.settings.mount}.")
        if self.loop_device is not None:
            volume.detach_loop(self.loop_device)
            self.loop_device = None
        self._stop.set()
        if self._connector is not None:
            self._connector.join(timeout=10)
        if self.server is not None:
            self.server.stop()
            self.server = None
            self.log.log(f"Stopped exposing {self.settings.disk}.")

    # -- the replication link ----------------------------------------------
    def _connect_forever(self) -> None:
        reported = ""
        while not self._stop.is_set():
            try:
                self._session()
                reported = ""
            except (PeerError, OSError) as exc:
                reason = str(exc)
                self.peer.last_error = reason
                if reason != reported:
                    self.log.log(f"Secondary {self.settings.secondary_sync_ip} not replicating: {reason}")
                    reported = reason
            self.peer.connected = False
            if self.server is not None and self.server.stats().peer_connected:
                self.server.detach_peer()
            self._stop.wait(RETRY_SECONDS)

    def _dial(self) -> socket.socket:
        s = socket.create_connection((str(self.settings.secondary_sync_ip), self.settings.sync_port),
                                     timeout=max(1.0, self.settings.ping_interval),
                                     source_address=(str(self.settings.primary_sync_ip), 0))
        link.tune(s, user_timeout_ms=int(max(1.0, 2 * self.settings.ping_interval) * 1000))
        return s

    def _session(self) -> None:
        assert self.server is not None
        control = self._dial()
        try:
            link.send(control, link.hello(node=str(self.settings.primary_sync_ip), role="primary",
                                          volume=self.settings.volume, disk_size=self.disk_size,
                                          version=__version__, settings=self.settings.to_json()))
            reply = link.recv(control)
            if reply["type"] == "refuse":
                raise HandshakeRefused(f"the secondary refused: {reply.get('reason')}")
            if reply["type"] != "welcome":
                raise PeerError(f"unexpected reply {reply['type']!r} to hello")
            data = self._dial()
            link.send(data, {"type": "data", "session": reply["session"]})
            if link.recv(data)["type"] != "ok":
                data.close()
                raise PeerError("the secondary did not accept the data connection")
            data.setblocking(True)
            self.server.attach_peer(data.detach())
            self.server.start_sync(0)
            self.peer = PeerView(connected=True)
            self.log.log(f"Connected to secondary {self.settings.secondary_sync_ip}; full sync of "
                         f"{self.disk_size} bytes started while serving.")
            self._watch(control)
        finally:
            control.close()

    def _watch(self, control: socket.socket) -> None:
        """Report progress until the link breaks or we are stopped."""
        assert self.server is not None
        started = time.monotonic()
        while not self._stop.is_set():
            stats = self.server.stats()
            if not stats.peer_connected:
                raise PeerError(f"data connection lost ({stats.last_error or 'no reason given'})")
            total = stats.sync_total or self.disk_size
            percent = 100.0 * stats.sync_offset / total if total else 100.0
            done = not stats.sync_active and stats.sync_offset >= total
            self.peer.sync_percent = 100.0 if done else percent
            link.send(control, {"type": "progress", "percent": self.peer.sync_percent})
            if done and not self.peer.sync_done:
                link.send(control, {"type": "sync_done"})
                self.peer.sync_done = True
                self.log.log(f"Initial sync to {self.settings.secondary_sync_ip} complete "
                             f"({total} bytes in {time.monotonic() - started:.1f} s); the secondary is UpToDate.")
            readable, _, _ = select.select([control], [], [], PROGRESS_SECONDS)
            if readable:
                link.recv(control)  # the secondary only speaks to say goodbye; EOF raises PeerError
