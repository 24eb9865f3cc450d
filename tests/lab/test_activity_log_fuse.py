"""The activity log on the real data path: FUSE, real files, a real crash (SIGKILL).

Each test serves a sparse image through PrimaryServer with an activity log
(4 MiB extents) and checks the file with read_activity_log, the way a
rejoining node will read it: the extents written are listed while serving,
only the most recent ones once more than the slots were written, nothing
after a clean stop, and after a SIGKILL every extent whose data reached the
disk without being complete is listed. Needs root and /dev/fuse; skips
without them, fails under CI=true.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from test_datapath_local import _aligned, _mounted, _no_flush_of_its_own, _require, _socket_pair

from mirrord.replication import volume
from mirrord.replication.native import PrimaryServer, Receiver, read_activity_log

pytestmark = pytest.mark.lab

KiB = 1 << 10
MiB = 1 << 20
EXT = 4 * MiB
SIZE = 512 * MiB
CHILD = str(Path(__file__).with_name("al_server.py"))
EXPECT_TIMEOUT = 60.0  # for the child's mount or peer to come up on a busy host


def _image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def _hot(al: Path) -> list[int]:
    """The extent numbers the file lists, least recently used first."""
    listed = read_activity_log(str(al))
    assert all(length == EXT and off % EXT == 0 for off, length in listed)
    return [off // EXT for off, _ in listed]


def _write(dev: Path, off: int, length: int = 4 * KiB, fill: int = 0x5A) -> None:
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwrite(fd, _aligned(bytes([fill]) * length), off) == length
    finally:
        os.close(fd)


def _unmount(dev: Path) -> None:
    if _mounted(dev):
        subprocess.run(["umount", "-l", str(dev)], check=False, timeout=30)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., PrimaryServer]]:
    """A started server on a.img at r0 with its log at v.al; peer=True adds a Receiver on b.img."""
    servers: list[PrimaryServer] = []
    receivers: list[Receiver] = []

    def make(slots: int = 8, peer: bool = True) -> PrimaryServer:
        _require()
        dev = tmp_path / "r0"
        dev.touch()
        server = PrimaryServer(str(_image(tmp_path / "a.img")), str(dev), SIZE,
                               activity_log=str(tmp_path / "v.al"), al_slots=slots)
        servers.append(server)
        server.start()
        if peer:
            primary_end, secondary_end = _socket_pair()
            receivers.append(Receiver(str(_image(tmp_path / "b.img")), SIZE, secondary_end.detach()))
            server.attach_peer(primary_end.detach())
        return server

    yield make
    try:
        for server in servers:
            server.close()
    finally:
        for receiver in receivers:
            receiver.close()
        _unmount(tmp_path / "r0")


def test_log_follows_the_writes_and_clean_stop_empties_it(tmp_path: Path,
                                                          serve: Callable[..., PrimaryServer]) -> None:
    server = serve(slots=8)
    al, dev = tmp_path / "v.al", tmp_path / "r0"
    assert _hot(al) == []
    for e in (3, 17, 40):
        _write(dev, e * EXT + 12 * KiB)
    assert _hot(al) == [3, 17, 40]
    # One 1 MiB write across the boundary of extents 60 and 61: both, in one record.
    _write(dev, 61 * EXT - 512 * KiB, MiB)
    assert sorted(_hot(al)) == [3, 17, 40, 60, 61]
    assert server.activity_log_stats().al_updates == 4
    # More distinct extents than slots: only the 8 most recently used stay.
    for e in range(70, 80):
        _write(dev, e * EXT)
    assert _hot(al) == list(range(72, 80))
    # Writes to hot extents cost no record: the file does not change.
    assert server.activity_log_stats().al_updates == 14
    for e in (78, 79, 72):
        _write(dev, e * EXT + 64 * KiB)
    st = server.activity_log_stats()
    assert st.al_updates == 14 and st.al_hot == 8 and st.al_waits == 0
    # Extent 73 was the first without a free slot: one flush made every idle extent
    # clean, enough for 74 to 79 too.
    assert st.al_flushes == 1
    assert _hot(al) == list(range(72, 80))
    stats = server.stats()
    assert stats.peer_connected and stats.dirty_blocks == 0 and stats.write_errors == 0
    server.stop()
    assert _hot(al) == []


def test_stop_with_writes_the_peer_lacks_keeps_the_log(tmp_path: Path,
                                                       serve: Callable[..., PrimaryServer]) -> None:
    server = serve(slots=8, peer=False)
    al, dev = tmp_path / "v.al", tmp_path / "r0"
    for e in (5, 9):
        _write(dev, e * EXT)
    assert server.stats().dirty_blocks == 2
    server.stop()
    assert _hot(al) == [5, 9]


def test_extent_goes_cold_only_once_both_disks_hold_its_writes(tmp_path: Path,
                                                               serve: Callable[..., PrimaryServer]) -> None:
    """An extent whose completed writes may still be in a page cache (this
    disk's, or the peer's: its ack is not durability) stays in the log until
    a local fdatasync and a FLUSH the peer acked cover them; else a power
    loss could leave a block different on the two disks and named nowhere.
    While the server is suspended (peer lost, fencing on) the peer cannot
    ack a FLUSH and the daemon has not yet recorded that it writes alone:
    a write that needs such an extent's slot waits until resume."""
    server = serve(slots=2, peer=False)
    al, dev = tmp_path / "v.al", tmp_path / "r0"
    primary_end, secondary_end = _socket_pair()
    receiver = Receiver(str(_image(tmp_path / "b.img")), SIZE, secondary_end.detach())
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)  # kept open: no close() flushes between writes
    writer: threading.Thread | None = None
    try:
        server.attach_peer(primary_end.detach())
        _no_flush_of_its_own(server)
        block = _aligned(bytes([0x33]) * 4 * KiB)
        for e in (0, 1):
            os.pwrite(fd, block, e * EXT)
        peer_flushes, fdatasyncs = receiver.stats().flushes, server.durability_stats().fdatasyncs
        os.pwrite(fd, block, 2 * EXT)  # 0 goes cold: first both disks get 0 and 1's writes
        assert _hot(al) == [1, 2] and server.activity_log_stats().al_flushes == 1
        assert receiver.stats().flushes == peer_flushes + 1
        assert server.durability_stats().fdatasyncs == fdatasyncs + 1
        os.pwrite(fd, block, 3 * EXT)  # 1's write was covered by that flush: no new one
        assert _hot(al) == [2, 3] and server.activity_log_stats().al_flushes == 1

        server.set_fencing(True)
        receiver.close()
        deadline = time.monotonic() + 10
        while not server.stats().suspended:
            assert time.monotonic() < deadline, "the server did not notice the lost peer"
            time.sleep(0.01)
        done: list[int] = []
        writer = threading.Thread(target=lambda: done.append(os.pwrite(fd, block, 4 * EXT)))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and done == [] and _hot(al) == [2, 3]  # 2's write may be lost on the peer
        server.resume(degraded=True)  # the daemon records "writing alone" before this
        writer.join(10)
        assert done == [4 * KiB] and _hot(al) == [3, 4]
        stats = server.stats()
        assert stats.write_errors == 0 and stats.dirty_blocks >= 1  # 4's write, local only
        assert server.activity_log_stats().al_flushes == 2
    finally:
        receiver.close()
        server.close()  # answers a write still waiting (EIO) before the fd is closed
        if writer is not None:
            writer.join(10)
        with contextlib.suppress(OSError):  # the mount is gone
            os.close(fd)


# ---- crash ----------------------------------------------------------------------

class Child:
    """al_server.py in its own process; killed with SIGKILL, never stopped cleanly."""

    def __init__(self, tmp_path: Path, slots: int) -> None:
        _require("losetup", loop=True)
        self.loop: str | None = None
        self.dev, self.al, self.img = tmp_path / "r0", tmp_path / "v.al", _image(tmp_path / "a.img")
        self.dev.touch()
        argv = [sys.executable, CHILD, str(self.img), str(self.dev), str(self.al), str(slots)]
        # Unbuffered: a command written to stdin goes out at once, and _expect reads stdout's fd itself.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self._out = b""
        try:
            self._expect("ready")
        except BaseException:
            self.close()
            raise

    def _expect(self, word: str) -> None:
        """The child's next line is ``word``; a child that hangs (e.g. its mount never comes up) fails it."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + EXPECT_TIMEOUT
        while b"\n" not in self._out:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"the server process did not say {word!r} in {EXPECT_TIMEOUT} s")
            chunk = os.read(fd, 4096)
            if not chunk:  # it exited
                break
            self._out += chunk
        line, _, self._out = self._out.partition(b"\n")
        if line.strip() != word.encode():
            raise AssertionError(f"the server process did not say {word!r} (said {line!r}, exit {self.proc.poll()})")

    def attach_silent_peer(self) -> None:
        """From now on every write stays in flight (see al_server.py)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"silent-peer\n")
        self._expect("attached")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def attach_loop(self) -> str:
        """A loop device with direct I/O on the FUSE file, as the product uses it: unlike
        pwrites on the FUSE file itself (one at a time under the inode lock), its
        writes reach the server concurrently."""
        self.loop = volume.attach_loop(self.dev)
        return self.loop

    def close(self) -> None:
        """Kill, detach, unmount: each step even when the one before it failed."""
        try:
            self.kill()
        finally:
            try:
                if self.loop is not None:
                    volume.detach_loop(self.loop)
                    self.loop = None
            finally:
                _unmount(self.dev)


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    closes = ExitStack()  # every child is closed even when closing another one raised

    def make(slots: int) -> Child:
        c = Child(tmp_path, slots)
        closes.callback(c.close)
        return c

    with closes:
        yield make


def test_crash_leaves_every_written_extent_listed(child: Callable[..., Child]) -> None:
    c = child(slots=61)
    written = [2, 7, 33, 90, 127, 64]
    for e in written:
        _write(c.dev, e * EXT + 8 * KiB, fill=0x40 + e)
    c.kill()
    assert set(written) <= set(_hot(c.al))


def _on_disk(img: Path, off: int, data: bytes) -> bool:
    with open(img, "rb") as f:
        f.seek(off)
        return f.read(len(data)) == data


def test_crash_with_writes_in_flight_lists_their_extents(child: Callable[..., Child]) -> None:
    """Writes on the local disk but never acknowledged by the peer: the case the log exists for."""
    slots = 4
    c = child(slots=slots)
    # The loop device first: attaching it flushes, and a flush would wait forever for the peer.
    loop = c.attach_loop()
    c.attach_silent_peer()
    # One more writer than slots: the last cold write must wait, since every
    # slot has a write in flight and none may be evicted.
    extents = [11, 23, 42, 57, 99]
    blocks = {e: bytes([0x80 + i]) * (64 * KiB) for i, e in enumerate(extents)}
    errors: dict[int, str] = {}

    def writer(e: int) -> None:
        fd = os.open(loop, os.O_WRONLY | os.O_DIRECT)
        try:
            os.pwrite(fd, _aligned(blocks[e]), e * EXT + 128 * KiB)
            errors[e] = "acknowledged, with a peer that never acks"
        except OSError as exc:
            errors[e] = exc.strerror or str(exc)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(e,), daemon=True) for e in extents]
    for t in threads:
        t.start()
    try:
        # The first `slots` writes reach the disk (in flight, unacknowledged); which
        # ones go first is up to the scheduler, so wait for any `slots` of them.
        deadline = time.monotonic() + 30
        while sum(_on_disk(c.img, e * EXT + 128 * KiB, blocks[e]) for e in extents) < slots:
            assert time.monotonic() < deadline, "the writes did not reach the disk"
            assert c.proc.poll() is None
            time.sleep(0.01)
        landed = [e for e in extents if _on_disk(c.img, e * EXT + 128 * KiB, blocks[e])]
        assert len(landed) == slots  # the fifth waits for a slot: not issued
    finally:
        c.kill()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert "acknowledged, with a peer that never acks" not in errors.values()
    assert set(landed) <= set(_hot(c.al))
    # Nothing of the waiting write reached the disk after the kill either.
    waiting = [e for e in extents if e not in landed]
    assert not any(_on_disk(c.img, e * EXT + 128 * KiB, blocks[e]) for e in waiting)
