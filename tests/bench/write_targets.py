"""The five places the write-path benchmarks write to, and their mounts.

Each variant is a context manager yielding a ``Target``: the file the
workload opens, the image(s) where the bytes land, and how the file may be
opened. Every context manager undoes what it set up (servers stopped, FUSE
and tmpfs unmounted, helper processes reaped) also when the body raises.

(a) ``local_file``      the image on the root disk, opened directly
(b) ``passthrough_ll``  libfuse's C example ``passthrough_ll -o cache=never``
                        over the directory holding the image
(c) ``mirrord``         mirrord's PrimaryServer on the image, no peer
(d) ``mirrord``         + a Receiver over 127.0.0.1 TCP, replica on tmpfs
(e) ``mirrord``         + a Receiver over 127.0.0.1 TCP, replica on the root disk

All variants write to the *same* primary image (one at a time), so the
extents, the filesystem and the disk under them are identical.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from mirrord.replication.native import PrimaryServer, Receiver, ReceiverStats, ServerStats

MiB = 1 << 20
GiB = 1 << 30

PASSTHROUGH_LL_SOURCE = Path("/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c")

# Short labels used in tables and in extra_info.
LABELS = {
    "a": "local file (root disk)",
    "b": "libfuse passthrough_ll (C, cache=never)",
    "c": "mirrord, no peer",
    "d": "mirrord mirrored, replica on tmpfs",
    "e": "mirrord mirrored, replica on root disk",
}


@dataclass
class Target:
    key: str
    path: Path  # the file the workload opens
    backing: Path  # where the bytes land on this machine
    replica: Path | None = None  # where the peer lands them (mirrored variants)
    o_direct: bool = True  # False: the file refuses O_DIRECT; the workload drops it
    note: str = ""
    server: PrimaryServer | None = None
    receiver: Receiver | None = None

    @property
    def label(self) -> str:
        return LABELS[self.key]

    def server_stats(self) -> ServerStats | None:
        return self.server.stats() if self.server is not None else None

    def receiver_stats(self) -> ReceiverStats | None:
        return self.receiver.stats() if self.receiver is not None else None

    def attach(self, replica: Path) -> None:
        """Connect a Receiver on replica to the server over a fresh 127.0.0.1 TCP connection."""
        assert self.server is not None and self.receiver is None
        primary_end, secondary_end = localhost_pair()
        try:
            self.receiver = Receiver(str(replica), self.server.stats().size, secondary_end.detach())
            self.replica = replica
            self.server.attach_peer(primary_end.detach())
        finally:  # no-ops once detached; closes both if anything failed first
            primary_end.close()
            secondary_end.close()


# ---- mounts ---------------------------------------------------------------

def mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def mounts_under(directory: Path) -> list[str]:
    prefix = str(directory).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def unmount(path: Path) -> None:
    """Unmount path if mounted: a normal umount first, a lazy one if that fails."""
    if not mounted(path):
        return
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(0.02)


@contextmanager
def tmpfs(directory: Path, size: int) -> Iterator[Path]:
    """A tmpfs of our own at directory (stands in for the second machine's disk)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "mirrord-bench", str(directory)],
                   check=True)
    try:
        yield directory
    finally:
        unmount(directory)


# ---- images ---------------------------------------------------------------

def fill_image(path: Path, size: int) -> None:
    """Create path with size bytes really written (no holes, no unwritten extents).

    A disk image in service has been written; writing into fresh unwritten
    extents would add extent conversion to every variant's first writes.
    """
    import mmap

    buf = mmap.mmap(-1, MiB)
    buf.write(os.urandom(MiB))
    with open(path, "wb") as f:
        f.truncate(size)
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if _supports_direct(path) else 0))
    try:
        for off in range(0, size, MiB):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def _supports_direct(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
        return True
    except OSError:
        return False  # tmpfs


# ---- (a) ------------------------------------------------------------------

@contextmanager
def local_file(image: Path) -> Iterator[Target]:
    yield Target("a", image, image)


# ---- (b) ------------------------------------------------------------------

def build_passthrough_ll(build_dir: Path) -> Path:
    """Compile libfuse's example in build_dir (never kept in the repository)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    binary = build_dir / "passthrough_ll"
    flags = subprocess.run(["pkg-config", "fuse3", "--cflags", "--libs"], check=True,
                           capture_output=True, text=True).stdout.split()
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(PASSTHROUGH_LL_SOURCE), *flags],
                   check=True, capture_output=True, text=True)
    return binary


@contextmanager
def passthrough_ll(binary: Path, image: Path, mountpoint: Path, log: Path) -> Iterator[Target]:
    """passthrough_ll in the foreground over image's directory, cache=never.

    With cache=never the example sets direct_io on every open, so the kernel
    sends every write straight to the daemon, like mirrord's O_DIRECT path.
    It opens the backing file with the caller's flags, O_DIRECT included,
    and then writes from an unaligned buffer: O_DIRECT writes fail (EINVAL).
    ``o_direct`` is then False and the workload keeps everything but
    O_DIRECT (O_DSYNC reaches the backing file, so each 4 KiB write is still
    durable before the reply; 1 MiB writes go to the backing file's page
    cache and the final fsync flushes them, as mirrord's do).
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [str(binary), "-f", "-o", f"source={image.parent},cache=never", str(mountpoint)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
    try:
        wait_for(lambda: mounted(mountpoint) or proc.poll() is not None, 10, "passthrough_ll mount")
        if proc.poll() is not None:
            raise RuntimeError(f"passthrough_ll exited with {proc.returncode}; see {log}")
        path = mountpoint / image.name
        target = Target("b", path, image, o_direct=_direct_write_works(path))
        if not target.o_direct:
            target.note = "O_DIRECT refused by passthrough_ll (EINVAL); opened without it"
        yield target
    finally:
        unmount(mountpoint)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        unmount(mountpoint)


def _direct_write_works(path: Path) -> bool:
    """Does a 4 KiB aligned O_DIRECT write through this file succeed? (rewrites block 0 as is)"""
    import mmap

    buf = mmap.mmap(-1, 4096)
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.preadv(fd, [buf], 0)
        os.pwrite(fd, buf, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()


# ---- (c), (d), (e) ----------------------------------------------------------

def localhost_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1 (never any other address)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        client.settimeout(None)
        listener.settimeout(10)
        server, _ = listener.accept()
        server.settimeout(None)
    return client, server


@contextmanager
def mirrord(key: str, image: Path, size: int, device: Path, replica: Path | None = None) -> Iterator[Target]:
    """PrimaryServer on image exposed at device; with replica, a Receiver on 127.0.0.1."""
    device.touch()
    server = PrimaryServer(str(image), str(device), size)
    target = Target(key, device, image, server=server)
    try:
        server.start()
        if replica is not None:
            target.attach(replica)
        yield target
    finally:
        try:
            server.close()
        finally:
            if target.receiver is not None:
                with suppress(Exception):
                    target.receiver.stop()
                target.receiver.close()
            unmount(device)


def remove_tree(directory: Path) -> None:
    """rm -rf directory, but never through a mount that is still there."""
    for m in sorted(mounts_under(directory), key=len, reverse=True):
        unmount(Path(m))
    if not mounts_under(directory):
        shutil.rmtree(directory, ignore_errors=True)
