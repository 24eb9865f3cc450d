"""The C data path end to end on this host: real FUSE, real TCP on 127.0.0.1.

A Receiver applies frames to image B; a PrimaryServer exposes image A as a
FUSE file and replicates to it. Every test ends by comparing the images.
Needs root and /dev/fuse (and loop devices + mkfs.ext4 for the filesystem
test); without them the tests skip, or fail under CI=true.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hactl import sync_link_congestion_control
from mirrord.errors import NativeError
from mirrord.replication.native import E_STATE, PrimaryServer, Receiver
from under_ci import skip_or_fail

pytestmark = pytest.mark.lab

MiB = 1 << 20
KiB = 1 << 10


def _require(*tools: str, loop: bool = False) -> None:
    missing = None
    if os.geteuid() != 0:
        missing = "root"
    elif not os.path.exists("/dev/fuse"):
        missing = "/dev/fuse"
    elif loop and not os.path.exists("/dev/loop-control"):
        missing = "/dev/loop-control"
    else:
        missing = next((t for t in ("cmp", *tools) if shutil.which(t) is None), None)
    if missing:
        skip_or_fail(f"the local data-path lab needs {missing}")


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def _aligned(data: bytes) -> mmap.mmap:
    """A page-aligned copy of data, as O_DIRECT wants."""
    buf = mmap.mmap(-1, max(len(data), 1))
    buf.write(data)
    return buf


def _identical(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def _writers(dev: Path, n: int, body: Callable[[int, int], None], flags: Callable[[int], int] = lambda _: 0) -> None:
    """Run body(seed, fd) in n threads at once, each with its own descriptor
    of dev (O_RDWR | O_DIRECT | flags(seed)); fail with every exception."""
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        fd = os.open(dev, os.O_RDWR | os.O_DIRECT | flags(seed))
        try:
            body(seed, fd)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a writer is stuck"


def _no_flush_of_its_own(server: PrimaryServer) -> None:
    """Bounds no test reaches: the server sends no FLUSH to bound its
    acked-but-unflushed ranges, so FLUSH counts are the test's alone."""
    server.set_unflushed_limit(1 << 40, 3_600_000)


@dataclass
class Pair:
    dir: Path
    a: Path
    b: Path
    dev: Path
    size: int
    server: PrimaryServer
    receiver: Receiver | None = None

    def connect(self) -> Receiver:
        """A fresh TCP connection and receiver, attached to the server."""
        primary_end, secondary_end = _socket_pair()
        self.receiver = Receiver(str(self.b), self.size, secondary_end.detach())
        self.server.attach_peer(primary_end.detach())
        return self.receiver

    def resync_dirty(self) -> None:
        """Close the old receiver, connect a new one and run a dirty-only
        resync to its end."""
        if self.receiver is not None:
            self.receiver.close()
        self.connect()
        self.server.start_sync(0, dirty_only=True)
        _wait(lambda: not self.server.stats().sync_active)

    def stop(self) -> None:
        """Stop both ends (idempotent): every frame sent is applied or dropped."""
        self.server.stop()
        if self.receiver is not None:
            self.receiver.stop()


@pytest.fixture
def make_pair(tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    pairs: list[Pair] = []

    def make(size: int = 64 * MiB, fill_a: bytes | None = None, connect: bool = True) -> Pair:
        _require()
        a, b, dev = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "r0"
        with open(a, "wb") as f:
            f.truncate(size)
            if fill_a is not None:
                f.seek(0)
                f.write(fill_a)
        with open(b, "wb") as f:
            f.truncate(size)
        dev.touch()
        pair = Pair(tmp_path, a, b, dev, size, PrimaryServer(str(a), str(dev), size))
        pairs.append(pair)
        pair.server.start()
        if connect:
            pair.connect()
        return pair

    yield make
    for pair in pairs:
        try:
            pair.server.close()
        finally:
            if pair.receiver is not None:
                pair.receiver.close()
            if _mounted(pair.dev):
                subprocess.run(["umount", "-l", str(pair.dev)], check=False)


def test_fuse_file_looks_like_the_disk(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair(size=8 * MiB + 4 * KiB, connect=False)
    st = os.stat(pair.dev)
    assert st.st_size == pair.size and (st.st_mode & 0o170000) == 0o100000
    fd = os.open(pair.dev, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 100, 0)
        assert os.pread(fd, 100, 0) == b"x" * 100
        # Past the end: refused; straddling the end: cut short, like a block device.
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"y", pair.size)
        assert ei.value.errno in (28, 27)  # ENOSPC / EFBIG
        assert os.pwrite(fd, b"z" * 10, pair.size - 4) == 4
        assert os.pread(fd, 10, pair.size - 4) == b"zzzz"
        # Truncation is ignored: the size is the disk's.
        os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == pair.size
        assert os.statvfs(pair.dev).f_blocks * 4096 <= pair.size
    finally:
        os.close(fd)
    stats = pair.server.stats()
    assert stats.fuse_running and not stats.peer_connected and stats.dirty_blocks == 2


def test_writes_reach_both_disks(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    _no_flush_of_its_own(pair.server)  # the FLUSH counts below are exact
    rnd = random.Random(7)
    # O_DSYNC 4 KiB writes: each one is a durable (F_SYNC) write round trip.
    # An O_DIRECT open is FOPEN_DIRECT_IO, so the kernel sends no FSYNC after
    # each write (only the FLUSH of close), and that FLUSH needs a FLUSH
    # frame only because the connection is new.
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    try:
        for _ in range(200):
            off = rnd.randrange(pair.size // (4 * KiB)) * 4 * KiB
            assert os.pwrite(fd, _aligned(rnd.randbytes(4 * KiB)), off) == 4 * KiB
    finally:
        os.close(fd)
    d = pair.server.durability_stats()
    assert d.dsync_writes == 200 and d.flushes == 1
    assert d.flush_frames == 1 and d.fdatasyncs == 1
    # 1 MiB direct writes (max_write), some not extent aligned.
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
    try:
        for i in range(24):
            off = i * MiB + (i % 3) * 64 * KiB
            assert os.pwrite(fd, _aligned(rnd.randbytes(MiB)), off) == MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    # Buffered, unaligned.
    with open(pair.dev, "r+b", buffering=0) as f:
        for _ in range(100):
            f.seek(rnd.randrange(pair.size - 10000))
            f.write(rnd.randbytes(rnd.randrange(1, 10000)))
        os.fsync(f.fileno())
    stats = pair.server.stats()
    assert stats.max_write_seen == MiB  # max_pages took effect
    assert stats.peer_connected and stats.dirty_blocks == 0 and stats.write_errors == 0
    assert stats.in_flight == 0 and stats.acked == stats.frames_sent
    rstats = pair.receiver.stats() if pair.receiver else None
    assert rstats is not None and rstats.crc_errors == 0 and rstats.durable_writes == 200
    assert rstats.bytes_applied == stats.bytes_sent
    # The two fsyncs after unflagged writes each needed a FLUSH frame.
    assert rstats.flushes == pair.server.durability_stats().flush_frames == 3
    pair.stop()
    assert _identical(pair.a, pair.b)


def _congestion_control(local_port: int) -> str:
    """The congestion control `ss` reports for the 127.0.0.1 socket bound to local_port."""
    out = subprocess.run(["ss", "-tinH", "state", "established", "src", f"127.0.0.1:{local_port}"],
                         capture_output=True, text=True, check=True).stdout
    algos = [w for w in out.split() if w in ("cubic", "reno", "bbr")]
    assert len(algos) == 1, out
    return algos[0]


def test_sync_link_uses_cubic_whatever_the_system_default(make_pair: Callable[..., Pair]) -> None:
    """Both ends of the data connection are switched away from a pacing default (bbr here)."""
    _require("ss")
    want = sync_link_congestion_control()
    pair = make_pair(connect=False)
    primary_end, secondary_end = _socket_pair()
    ports = primary_end.getsockname()[1], secondary_end.getsockname()[1]
    pair.receiver = Receiver(str(pair.b), pair.size, secondary_end.detach())
    pair.server.attach_peer(primary_end.detach())
    assert [_congestion_control(p) for p in ports] == [want, want]
    fd = os.open(pair.dev, os.O_RDWR)
    try:
        os.pwrite(fd, b"cc" * 2048, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_flush_frames_only_when_the_peer_holds_unsynced_data(make_pair: Callable[..., Pair]) -> None:
    """Which fsyncs travel: unflagged writes need a FLUSH (and a local
    fdatasync), durable writes and repeated fsyncs need neither."""
    pair = make_pair()
    _no_flush_of_its_own(pair.server)
    data = _aligned(random.Random(1).randbytes(4 * KiB))
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
    try:
        def counts() -> tuple[int, int, int]:
            d = pair.server.durability_stats()
            return d.dsync_writes, d.flush_frames, d.fdatasyncs

        os.fsync(fd)  # first flush on a new connection: always both
        assert counts() == (0, 1, 1)
        os.fsync(fd)  # nothing written since
        assert counts() == (0, 1, 1)
        os.pwrite(fd, data, 0)  # plain write: acked by the peer, not durable
        os.fsync(fd)
        assert counts() == (0, 2, 2)
        # RWF_DSYNC on a plain fd is an O_DSYNC write for FUSE too.
        assert os.pwritev(fd, [data], 4 * KiB, os.RWF_DSYNC) == 4 * KiB
        assert counts()[0] == 1
        os.fsync(fd)
        assert counts() == (1, 2, 2)
        # A plain write after a durable one makes the next fsync travel again.
        os.pwrite(fd, data, 8 * KiB)
        assert os.pwritev(fd, [data], 12 * KiB, os.RWF_DSYNC) == 4 * KiB
        os.fsync(fd)
        assert counts() == (2, 3, 3)
    finally:
        os.close(fd)  # its flush: nothing to do
    assert pair.server.durability_stats().flush_frames == 3
    assert pair.server.stats().write_errors == 0
    rstats = pair.receiver.stats() if pair.receiver else None
    assert rstats is not None and rstats.durable_writes == 2 and rstats.flushes == 3
    # Without a peer nothing travels; the local watermark works the same.
    pair.server.detach_peer()
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    try:
        os.pwrite(fd, data, 16 * KiB)
        d = pair.server.durability_stats()
        assert (d.dsync_writes, d.flush_frames, d.fdatasyncs) == (3, 3, 3)
    finally:
        os.close(fd)
    assert pair.server.stats().dirty_blocks == 1
    pair.connect()
    os.close(os.open(pair.dev, os.O_RDWR))  # close = flush: new connection, it travels
    assert pair.server.durability_stats().flush_frames == 4
    pair.server.start_sync(0, dirty_only=True)
    _wait(lambda: not pair.server.stats().sync_active)
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_concurrent_dsync_and_plain_writers(make_pair: Callable[..., Pair]) -> None:
    """O_DSYNC writers next to plain writers that fsync: every fsync that
    follows a plain write of its own sends a FLUSH, whatever the others do."""
    pair = make_pair()
    errors: list[BaseException] = []
    plain_rounds = 150

    def dsync_writer(seed: int) -> None:
        rnd = random.Random(seed)
        fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
        try:
            for _ in range(300):
                off = rnd.randrange(pair.size // (8 * KiB)) * 4 * KiB  # lower half
                os.pwrite(fd, _aligned(rnd.randbytes(4 * KiB)), off)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            os.close(fd)

    def plain_writer() -> None:
        rnd = random.Random(99)
        fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
        try:
            for _ in range(plain_rounds):
                off = pair.size // 2 + rnd.randrange(pair.size // (8 * KiB)) * 4 * KiB
                before = pair.server.durability_stats().flush_frames
                os.pwrite(fd, _aligned(rnd.randbytes(4 * KiB)), off)
                os.fsync(fd)
                assert pair.server.durability_stats().flush_frames > before
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=dsync_writer, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=plain_writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    d = pair.server.durability_stats()
    assert d.dsync_writes == 900 and d.flush_frames >= plain_rounds
    stats = pair.server.stats()
    assert stats.write_errors == 0 and stats.dirty_blocks == 0 and stats.in_flight == 0
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_concurrent_overlapping_writers_reach_both_disks_in_the_same_order(
        make_pair: Callable[..., Pair]) -> None:
    """Sixteen writers hammer a 2 MiB region with overlapping writes of 4 KiB
    to 192 KiB (across the 64 KiB ordering locks), O_DSYNC or not, so frames
    share sends and acks share batches. Every write is acked (nothing dirty,
    nothing in flight), every O_DSYNC write was applied durably on the peer,
    and the two images are identical: overlapping writes were applied in the
    same order on both sides."""
    pair = make_pair()
    region, base = 512 * KiB, 3 * MiB - 32 * KiB
    writes_each = 300

    def writer(seed: int, fd: int) -> None:
        rnd = random.Random(seed)
        for _ in range(writes_each):
            length = rnd.choice([4, 4, 8, 60, 68, 192]) * KiB
            off = base + rnd.randrange((region - length) // (4 * KiB)) * 4 * KiB
            assert os.pwrite(fd, _aligned(rnd.randbytes(length)), off) == length

    _writers(pair.dev, 16, writer, lambda seed: os.O_DSYNC if seed % 2 == 0 else 0)
    stats = pair.server.stats()
    assert stats.write_errors == 0 and stats.writes == 16 * writes_each, stats.last_error
    assert stats.dirty_blocks == 0 and stats.in_flight == 0 and stats.acked == stats.frames_sent
    assert pair.receiver is not None
    rstats = pair.receiver.stats()
    assert rstats.writes == stats.writes and rstats.crc_errors == 0
    assert rstats.durable_writes == pair.server.durability_stats().dsync_writes == 8 * writes_each
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_large_writes_are_spliced_and_reach_both_disks(make_pair: Callable[..., Pair]) -> None:
    """Writes of 256 KiB and more are sent zero-copy: the socket reads the
    FUSE request's own pages, so the writer must not let libfuse reuse them
    before the ack ("Zero-copy sends" in ext/server.c). Eight writers
    overwrite one 4 MiB region with fresh bytes in writes of 256 KiB to
    1 MiB (spliced) and 4 to 192 KiB (copied), so FUSE workers are reused
    as fast as the acks allow. A page changed under the socket would show
    as a CRC error (connection dropped, range dirty) or as images that
    differ; there must be neither, and every large frame was spliced."""
    pair = make_pair()
    region, base = 4 * MiB, 5 * MiB
    large = [0] * 8

    def writer(seed: int, fd: int) -> None:
        rnd = random.Random(seed)
        for _ in range(60):
            length = rnd.choice([4, 64, 192, 256, 512, 768, 1024, 1024]) * KiB
            off = base + rnd.randrange((region - length) // (4 * KiB) + 1) * 4 * KiB
            assert os.pwrite(fd, _aligned(rnd.randbytes(length)), off) == length
            large[seed] += length >= 256 * KiB

    _writers(pair.dev, 8, writer, lambda seed: os.O_DSYNC if seed % 4 == 0 else 0)
    stats = pair.server.stats()
    assert stats.write_errors == 0 and stats.peer_failures == 0, stats.last_error
    assert stats.dirty_blocks == 0 and stats.in_flight == 0 and stats.acked == stats.frames_sent
    assert pair.receiver is not None
    assert pair.receiver.stats().crc_errors == 0
    zc = pair.server.zero_copy_stats()
    assert zc.frames_spliced == sum(large) > 100
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_peer_lost_during_spliced_writes_then_resync(make_pair: Callable[..., Pair]) -> None:
    """The secondary goes away while 1 MiB writes are being spliced: the
    writers carry on (the ranges go dirty), a new connection gets a new pipe,
    the dirty resync repairs the replica, and large writes are spliced again
    on the new connection."""
    pair = make_pair()
    region = 8 * MiB
    stop = threading.Event()
    done = [0] * 4

    def writer(seed: int, fd: int) -> None:
        rnd = random.Random(seed)
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            off = rnd.randrange(region // MiB) * MiB
            assert os.pwrite(fd, _aligned(rnd.randbytes(MiB)), off) == MiB
            done[seed] += 1

    dropped: list[BaseException | None] = []

    def drop_the_peer_mid_stream() -> None:
        try:
            _wait(lambda: pair.server.zero_copy_stats().frames_spliced >= 40)
            assert pair.receiver is not None
            pair.receiver.stop()
            _wait(lambda: not pair.server.stats().peer_connected)
            before = sum(done)
            _wait(lambda: sum(done) >= before + 20)  # writes go on without the peer
            dropped.append(None)
        except BaseException as e:  # noqa: BLE001
            dropped.append(e)
        finally:
            stop.set()

    dropper = threading.Thread(target=drop_the_peer_mid_stream)
    dropper.start()
    try:
        _writers(pair.dev, 4, writer)
    finally:
        stop.set()
        dropper.join(60)
    assert dropped == [None], dropped
    stats = pair.server.stats()
    assert stats.write_errors == 0 and stats.dirty_blocks > 0

    pair.receiver.close()
    pair.connect()
    pair.server.start_sync(0, dirty_only=True)
    _wait(lambda: not pair.server.stats().sync_active)
    assert pair.server.stats().sync_done and pair.server.stats().dirty_blocks == 0
    spliced = pair.server.zero_copy_stats().frames_spliced
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
    try:
        for i in range(8):
            assert os.pwrite(fd, _aligned(random.Random(i).randbytes(MiB)), i * MiB) == MiB
    finally:
        os.close(fd)
    assert pair.server.zero_copy_stats().frames_spliced == spliced + 8
    assert pair.receiver.stats().crc_errors == 0
    pair.stop()
    assert _identical(pair.a, pair.b)


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def _dirty_pages(path: Path) -> int:
    """Pages of path's page cache not yet written to the disk (dirty or
    under writeback), from cachestat(2) (Linux 6.5+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    whole = (ctypes.c_uint64 * 2)(0, 0)
    st = _CacheStat()
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(451, fd, whole, ctypes.byref(st), 0) != 0:  # __NR_cachestat
            raise OSError(ctypes.get_errno(), f"cachestat {path}")
    finally:
        os.close(fd)
    return int(st.dirty + st.writeback)


def test_large_writes_start_their_writeback_on_both_disks(make_pair: Callable[..., Pair]) -> None:
    """Write-behind (ext/server.c): a write of 256 KiB or more starts its own
    writeback on the primary's disk and, after the ack, on the replica, so
    neither holds it dirty until a flush; small writes are left dirty for the
    kernel to merge. Without write-behind the kernel would start on these
    pages only after 30 s (vm.dirty_expire_centisecs), far past the wait."""
    pair = make_pair()
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(pair.dir)], capture_output=True, text=True).stdout.strip()
    assert fs != "tmpfs", f"{pair.dir} is on tmpfs, which never writes back: this test needs a disk-backed /tmp"
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
    try:
        rnd = random.Random(5)
        for i in range(32):
            assert os.pwrite(fd, _aligned(rnd.randbytes(MiB)), 8 * MiB + i * MiB) == MiB
        _wait(lambda: _dirty_pages(pair.a) == 0 and _dirty_pages(pair.b) == 0, timeout=15)
        for i in range(16):
            assert os.pwrite(fd, _aligned(rnd.randbytes(4 * KiB)), i * 64 * KiB) == 4 * KiB
        assert _dirty_pages(pair.a) > 0 and _dirty_pages(pair.b) > 0
        os.fsync(fd)
        assert _dirty_pages(pair.a) == 0 and _dirty_pages(pair.b) == 0
    finally:
        os.close(fd)
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_ext4_on_loop_direct_io(make_pair: Callable[..., Pair], tmp_path: Path) -> None:
    _require("losetup", "mkfs.ext4", "mount", "umount", loop=True)
    pair = make_pair(size=128 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(pair.dev)],
                          check=True, capture_output=True, text=True).stdout.strip()
    mounted = False
    try:
        dio = Path(f"/sys/block/{Path(loop).name}/loop/dio").read_text().strip()
        assert dio == "1", "the loop device fell back to buffered I/O"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop], check=True)
        subprocess.run(["mount", loop, str(mnt)], check=True)
        mounted = True
        rnd = random.Random(3)
        for i in range(20):
            (mnt / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 3 * MiB)))
        subprocess.run(["sync"], check=True)
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
        subprocess.run(["losetup", "-d", loop], check=True)
    _wait(lambda: not Path(f"/sys/block/{Path(loop).name}/loop/backing_file").exists())
    stats = pair.server.stats()
    assert stats.peer_connected and stats.dirty_blocks == 0 and stats.writes > 0
    # A loop device passes no O_DSYNC: it asks for durability with separate
    # flushes (block-layer FUA emulation), and those do travel.
    d = pair.server.durability_stats()
    assert d.dsync_writes == 0 and d.flush_frames >= 1
    pair.stop()
    assert _identical(pair.a, pair.b)


@contextmanager
def _front_writer(pair: Pair, seed: int, near_front: float = 1.0) -> Iterator[list[int]]:
    """A thread writing through the device while the body runs; yields [writes made so far].

    A share ``near_front`` of the writes aims just ahead of the sync's (or
    verify's) acked front, where chunks are being read and sent: that is the
    race.
    """
    size = pair.size
    writes = [0]
    stop = threading.Event()

    def hammer() -> None:
        rnd = random.Random(seed)
        fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
        try:
            while not stop.is_set():
                length = rnd.choice([4, 8, 64, 256, 1024]) * KiB
                if rnd.random() < near_front:
                    lo, span = min(pair.server.stats().sync_offset, size - 8 * MiB), 8 * MiB
                else:
                    lo, span = 0, size
                off = lo + rnd.randrange((span - length) // (4 * KiB)) * 4 * KiB
                os.pwrite(fd, _aligned(rnd.randbytes(length)), off)
                writes[0] += 1
        finally:
            os.close(fd)

    writer = threading.Thread(target=hammer)
    writer.start()
    try:
        yield writes
    finally:
        stop.set()
        writer.join()


def _full_sync_under_writes(pair: Pair, seed: int, near_front: float) -> int:
    """Run a full sync while a writer hammers the disk; the number of writes it made."""
    with _front_writer(pair, seed, near_front) as writes:
        time.sleep(0.2)
        pair.server.start_sync(0)
        _wait(lambda: not pair.server.stats().sync_active, timeout=120)
        time.sleep(0.2)  # keep writing a little after the sync finished
    return writes[0]


def test_full_sync_races_with_writes(make_pair: Callable[..., Pair]) -> None:
    size = 256 * MiB
    pattern = random.Random(11).randbytes(MiB) * (size // MiB)
    pair = make_pair(size=size, fill_a=pattern)
    writes = _full_sync_under_writes(pair, seed=12, near_front=0.5)
    stats = pair.server.stats()
    assert stats.sync_done and stats.sync_offset == size and stats.bytes_synced == size
    assert stats.peer_connected and stats.dirty_blocks == 0
    assert writes > 50, "the writer did not overlap the sync"
    pair.stop()
    assert _identical(pair.a, pair.b)


def _fill(path: Path, size: int, byte: int) -> None:
    with open(path, "r+b") as f:
        chunk = bytes([byte]) * MiB
        for off in range(0, size, MiB):
            f.write(chunk)


def test_sync_of_a_sparse_disk_sends_holes_as_zero_ranges(make_pair: Callable[..., Pair]) -> None:
    """Holes on the source travel as SYNC_ZERO frames and overwrite whatever the replica held."""
    size = 64 * MiB
    pair = make_pair(size=size, connect=False)
    _fill(pair.b, size, 0xA5)  # an old replica: every byte must be replaced
    rnd = random.Random(21)
    data_at = {0: MiB, 5 * MiB + 12 * KiB: 4 * KiB, 33 * MiB: 3 * MiB, size - 4 * KiB: 4 * KiB}
    with open(pair.a, "r+b") as f:
        for off, length in data_at.items():
            f.seek(off)
            f.write(rnd.randbytes(length))
    pair.connect()
    pair.server.start_sync(0)
    _wait(lambda: not pair.server.stats().sync_active, timeout=60)
    stats = pair.server.stats()
    assert stats.sync_done and stats.bytes_synced == size and stats.dirty_blocks == 0
    # Data is read and sent per 1 MiB chunk, so a chunk that holds any data
    # goes as data; everything else as zero ranges, with 8 bytes of payload each.
    data_chunks = {o // MiB for off, length in data_at.items() for o in range(off, off + length, 4 * KiB)}
    zero_frames_at_most = size // MiB + len(data_at)  # one per chunk, plus a hole before data in a chunk
    assert stats.bytes_zeroed >= size - len(data_chunks) * MiB, stats
    assert stats.bytes_sent <= len(data_chunks) * MiB + 8 * zero_frames_at_most, stats
    pair.stop()
    assert pair.receiver is not None and pair.receiver.stats().bytes_zeroed == stats.bytes_zeroed
    assert _identical(pair.a, pair.b)


def test_sync_of_a_sparse_disk_races_with_writes_into_its_holes(make_pair: Callable[..., Pair]) -> None:
    """Writes that fill holes while the sync passes: the replica ends identical, never zeroed over data."""
    size = 128 * MiB
    pair = make_pair(size=size, connect=False)
    _fill(pair.b, size, 0x5A)
    pair.connect()
    writes = _full_sync_under_writes(pair, seed=22, near_front=0.7)
    stats = pair.server.stats()
    assert stats.sync_done and stats.bytes_synced == size and stats.dirty_blocks == 0
    assert stats.bytes_zeroed > 0 and writes > 20, (stats, writes)
    pair.stop()
    assert _identical(pair.a, pair.b)


def _verify(pair: Pair) -> None:
    pair.server.start_verify(0)
    _wait(lambda: not pair.server.stats().sync_active, timeout=60)
    stats = pair.server.stats()
    assert stats.sync_done and stats.bytes_verified == pair.size and not stats.verifying, stats


def test_online_verify_finds_a_flipped_byte_and_the_resync_repairs_it(make_pair: Callable[..., Pair]) -> None:
    size = 32 * MiB
    pair = make_pair(size=size, fill_a=random.Random(31).randbytes(size))
    pair.server.start_sync(0)
    _wait(lambda: pair.server.stats().sync_done, timeout=60)
    _verify(pair)
    assert pair.server.stats().verify_diff_bytes == 0
    # A byte flipped behind mirrord's back on the replica (bit rot, a bad disk).
    where = 17 * MiB + 12345
    with open(pair.b, "r+b") as f:
        f.seek(where)
        old = f.read(1)
        f.seek(where)
        f.write(bytes([old[0] ^ 0x40]))
    _verify(pair)
    stats = pair.server.stats()
    assert stats.verify_diff_bytes == MiB, stats  # the 1 MiB chunk holding it
    assert stats.dirty_blocks * stats.dirty_granularity == MiB
    assert pair.receiver is not None and pair.receiver.stats().verify_diffs == 1
    pair.server.start_sync(0, dirty_only=True)
    _wait(lambda: not pair.server.stats().sync_active and pair.server.stats().dirty_blocks == 0, timeout=60)
    assert pair.server.stats().verify_diff_bytes == MiB  # the last verify's count, through its repair
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_online_verify_leaves_the_next_fsync_its_flush(make_pair: Callable[..., Pair]) -> None:
    """A verify's VERIFY_SAME answers make nothing durable on the peer: the
    fsync after a plain write still sends its FLUSH (it was skipped when a
    VERIFY_SAME moved the peer's durability watermark)."""
    pair = make_pair(size=8 * MiB)
    _no_flush_of_its_own(pair.server)
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, _aligned(random.Random(41).randbytes(4 * KiB)), 0)
        before = pair.server.durability_stats().flush_frames
        assert pair.receiver is not None
        rflushes = pair.receiver.stats().flushes
        _verify(pair)
        os.fsync(fd)
        assert pair.server.durability_stats().flush_frames == before + 1
        assert pair.receiver.stats().flushes == rflushes + 1
    finally:
        os.close(fd)
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_online_verify_under_writes_reports_no_false_difference(make_pair: Callable[..., Pair]) -> None:
    """Writes racing the verify: each chunk is compared in stream order, so an in-flight write never shows."""
    size = 64 * MiB
    pair = make_pair(size=size, fill_a=random.Random(32).randbytes(size))
    pair.server.start_sync(0)
    _wait(lambda: pair.server.stats().sync_done, timeout=60)
    with _front_writer(pair, seed=33) as writes:
        for _ in range(3):
            _verify(pair)
            assert pair.server.stats().verify_diff_bytes == 0, pair.server.stats()
    assert writes[0] > 20
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_checksum_sync_copies_only_the_chunks_that_differ(make_pair: Callable[..., Pair]) -> None:
    """A full sync of two mostly equal disks (--checksum-sync): compared everywhere, copied where different."""
    size = 32 * MiB
    data = random.Random(51).randbytes(size)
    pair = make_pair(size=size, fill_a=data, connect=False)
    changed = {3, 17, 30}  # chunks (1 MiB) where the replica is older
    stale = bytearray(data)
    for chunk in changed:
        stale[chunk * MiB + 100:chunk * MiB + 200] = bytes(100)
    pair.b.write_bytes(bytes(stale))
    pair.connect()
    pair.server.mark_dirty(0, size)
    sent_before = pair.server.stats().bytes_sent
    pair.server.start_sync(0, checksum=True)
    _wait(lambda: not pair.server.stats().sync_active, timeout=60)
    stats = pair.server.stats()
    assert stats.sync_done and stats.dirty_blocks == 0, stats
    assert stats.bytes_verified == size and stats.verify_diff_bytes == len(changed) * MiB, stats
    assert stats.bytes_synced == len(changed) * MiB, stats
    # On the wire: three chunks of data and a 12-byte compare request per chunk.
    assert stats.bytes_sent - sent_before == len(changed) * MiB + 12 * (size // MiB), stats
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_sync_rate_ceiling_is_never_exceeded(make_pair: Callable[..., Pair]) -> None:
    """--resync-rate: the sync's average rate stays under the ceiling (a lower bound on its time)."""
    size, rate = 16 * MiB, 8 * MiB
    pair = make_pair(size=size, fill_a=random.Random(41).randbytes(size))
    pair.server.set_sync_rate(rate)
    t0 = time.monotonic()
    pair.server.start_sync(0)
    _wait(lambda: not pair.server.stats().sync_active, timeout=60)
    elapsed = time.monotonic() - t0
    assert pair.server.stats().sync_done
    # The last chunk may leave as soon as the ones before it fit under the ceiling.
    assert elapsed >= (size - MiB) / rate, elapsed
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_sync_yields_to_application_writes(make_pair: Callable[..., Pair]) -> None:
    """While the application writes, the sync sends small chunks one at a time (see "Pacing" in server.c)."""
    size = 64 * MiB
    pair = make_pair(size=size, fill_a=random.Random(42).randbytes(size))
    with _front_writer(pair, seed=43, near_front=0.0) as writes:
        time.sleep(0.1)
        pair.server.start_sync(0)
        _wait(lambda: not pair.server.stats().sync_active, timeout=120)
    assert pair.server.stats().sync_done and writes[0] > 20
    receiver = pair.receiver
    assert receiver is not None
    # Idle, this sync is 64 chunks of 1 MiB; yielding, most chunks are 64 KiB.
    assert receiver.stats().syncs > 4 * size // MiB, receiver.stats()
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_corrupted_frame_is_detected_and_never_applied(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    good = random.Random(5).randbytes(256 * KiB)
    off = 10 * MiB
    pair.server.debug_corrupt_next(1)
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwrite(fd, _aligned(good), off) == len(good)  # completes locally
        os.fsync(fd)
    finally:
        os.close(fd)
    receiver = pair.receiver
    assert receiver is not None
    _wait(lambda: not receiver.stats().connected)
    _wait(lambda: not pair.server.stats().peer_connected)
    rstats = receiver.stats()
    assert rstats.crc_errors == 1 and "CRC32C" in rstats.last_error
    stats = pair.server.stats()
    assert stats.dirty_blocks == len(good) // (4 * KiB)
    assert stats.last_error.startswith("peer lost")
    with open(pair.b, "rb") as f:
        f.seek(off)
        on_b = f.read(len(good))
    assert on_b in (bytes(len(good)), good)  # old or correct, never corrupted
    with open(pair.a, "rb") as f:
        f.seek(off)
        assert f.read(len(good)) == good  # the local disk got the good data


def test_peer_drop_keeps_serving_and_dirty_resync_catches_up(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    rnd = random.Random(9)
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, _aligned(rnd.randbytes(MiB)), 0)
        os.fsync(fd)  # durable on the peer: the drop below leaves it clean
        assert pair.server.stats().dirty_blocks == 0
        assert pair.receiver is not None
        pair.receiver.stop()  # the secondary goes away
        _wait(lambda: not pair.server.stats().peer_connected)
        written = set()
        for _ in range(50):
            block = rnd.randrange(pair.size // (4 * KiB))
            assert os.pwrite(fd, _aligned(rnd.randbytes(4 * KiB)), block * 4 * KiB) == 4 * KiB
            written.add(block)
        os.fsync(fd)
        stats = pair.server.stats()
        assert not stats.peer_connected and stats.dirty_blocks == len(written)
        bitmap = pair.server.dirty_bitmap()
        assert {i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1} == written

        pair.resync_dirty()  # a new connection; only the dirty blocks travel
        stats = pair.server.stats()
        assert stats.sync_done and stats.dirty_blocks == 0
        assert stats.bytes_synced == len(written) * 4 * KiB

        pair.server.detach_peer()  # on purpose, same bookkeeping
        os.pwrite(fd, _aligned(rnd.randbytes(4 * KiB)), 0)
        assert pair.server.stats().dirty_blocks == 1
        pair.resync_dirty()
    finally:
        os.close(fd)
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_acked_but_unflushed_write_lost_by_the_peer_is_resynced(make_pair: Callable[..., Pair]) -> None:
    """The peer acks a write once it is in its page cache. If the secondary
    then loses that cache (power loss, reboot) before any FLUSH, the range
    must be dirty once the connection is gone, so the resync sends it again
    (the bit was cleared at the ack and nothing ever sent it again)."""
    pair = make_pair(size=8 * MiB)
    _no_flush_of_its_own(pair.server)
    where = 3 * MiB + 12 * KiB
    before = random.Random(43).randbytes(4 * KiB)
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, _aligned(before), where)
        os.fsync(fd)
        new = _aligned(random.Random(44).randbytes(4 * KiB))
        os.pwrite(fd, new, where)  # acked when pwrite returns; no fsync
        stats = pair.server.stats()
        assert stats.in_flight == 0 and stats.dirty_blocks == 0
        assert _read_at(pair.b, where, 4 * KiB) == bytes(new)
        # The secondary loses its page cache: its disk still holds the
        # bytes of the flushed write before.
        with open(pair.b, "r+b") as f:
            f.seek(where)
            f.write(before)
        assert pair.receiver is not None
        pair.receiver.stop()
        _wait(lambda: not pair.server.stats().peer_connected)
        assert pair.server.stats().dirty_blocks == 1
        pair.resync_dirty()
        stats = pair.server.stats()
        assert stats.sync_done and stats.dirty_blocks == 0
    finally:
        os.close(fd)
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_unflushed_data_past_the_bound_is_flushed_by_the_server(make_pair: Callable[..., Pair]) -> None:
    """Writes without any fsync: once the peer holds more than the bound
    acked but not flushed, the server sends a FLUSH of its own (and none
    before), so the list of such ranges stays bounded."""
    pair = make_pair(size=16 * MiB)
    pair.server.set_unflushed_limit(4 * MiB, 3_600_000)  # the size bound only
    assert pair.receiver is not None
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
    try:
        data = _aligned(random.Random(45).randbytes(MiB))
        for i in range(3):
            os.pwrite(fd, data, i * MiB)
        assert pair.receiver.stats().flushes == 0  # 3 MiB: under the bound
        for i in range(3, 9):
            os.pwrite(fd, data, i * MiB)
        _wait(lambda: pair.receiver is not None and pair.receiver.stats().flushes >= 1)
        assert pair.server.stats().dirty_blocks == 0
        pair.receiver.stop()
        _wait(lambda: not pair.server.stats().peer_connected)
        # The flush covered the first four MiB at least; later ones may be dirty.
        stats = pair.server.stats()
        assert stats.dirty_blocks * stats.dirty_granularity <= 5 * MiB
        pair.resync_dirty()
    finally:
        os.close(fd)
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_clean_stop_flushes_the_peer_and_leaves_nothing_dirty(make_pair: Callable[..., Pair]) -> None:
    """A clean stop after writes without fsync: the server flushes the peer
    and waits for it before it reports nothing dirty."""
    pair = make_pair(size=8 * MiB)
    _no_flush_of_its_own(pair.server)
    assert pair.receiver is not None
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, _aligned(random.Random(46).randbytes(MiB)), 0)
        flushes = pair.receiver.stats().flushes
        pair.server.stop()  # with the file still open: no close() flush before it
        assert pair.receiver.stats().flushes == flushes + 1
        assert pair.server.stats().dirty_blocks == 0
    finally:
        with contextlib.suppress(OSError):  # the server is gone: close's flush may fail
            os.close(fd)
    pair.stop()
    assert _identical(pair.a, pair.b)


@contextmanager
def _pair_on_a_full_tmpfs(tmp_path: Path, size: int, full_mib: int = 1, **server: Any) -> Iterator[Pair]:
    """A connected pair whose primary image lives on a full_mib MiB tmpfs,
    its first full_mib MiB written: any write to the rest fails with ENOSPC
    locally (after its frame went to the peer). server: PrimaryServer's
    keyword arguments (an activity log)."""
    _require()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={full_mib}m", "tmpfs", str(small)], check=True)
    try:
        a, b, dev = small / "a.img", tmp_path / "b.img", tmp_path / "r0"
        for path in (a, b):
            with open(path, "wb") as f:
                f.truncate(size)
        dev.touch()
        pair = Pair(tmp_path, a, b, dev, size, PrimaryServer(str(a), str(dev), size, **server))
        try:
            pair.server.start()
            pair.connect()
            fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
            try:
                os.pwrite(fd, _aligned(random.Random(48).randbytes(full_mib * MiB)), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            yield pair
        finally:
            pair.server.close()
            if pair.receiver is not None:
                pair.receiver.close()
            if _mounted(dev):
                subprocess.run(["umount", "-l", str(dev)], check=False)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def _write_fails_enospc(pair: Pair, offset: int, length: int) -> None:
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, _aligned(random.Random(offset).randbytes(length)), offset)
        assert ei.value.errno == errno.ENOSPC
    finally:
        with contextlib.suppress(OSError):  # close's flush
            os.close(fd)


def test_failed_local_write_is_marked_dirty(tmp_path: Path) -> None:
    """A write whose frame went out but whose local pwrite failed (ENOSPC
    here) leaves the disks different: its range must be dirty although the
    peer acked it."""
    with _pair_on_a_full_tmpfs(tmp_path, 8 * MiB) as pair:
        _write_fails_enospc(pair, MiB, MiB)
        stats = pair.server.stats()
        assert stats.peer_connected and stats.write_errors == 1
        assert stats.dirty_blocks * stats.dirty_granularity == MiB


def test_extent_of_a_failed_write_stays_in_the_activity_log(tmp_path: Path) -> None:
    """A write that failed locally after the peer applied it leaves the disks
    different while the pair counts as in sync; only the in-memory bitmap
    knows, and after a crash only the activity log would: its extent must
    not go cold however many other extents are written."""
    from mirrord.replication.native import read_activity_log

    ext = 64 * KiB
    log = tmp_path / "v.al"
    with _pair_on_a_full_tmpfs(tmp_path, 8 * MiB, full_mib=2, activity_log=str(log), al_extent_size=ext,
                               al_slots=17) as pair:
        _write_fails_enospc(pair, 2 * MiB, 4 * KiB)  # extent 32
        stats = pair.server.stats()
        assert stats.peer_connected and stats.dirty_blocks == 1
        fd = os.open(pair.dev, os.O_WRONLY | os.O_DIRECT)
        try:
            block = _aligned(bytes([0x44]) * 4 * KiB)
            for e in range(32):  # twice the slots, all on the allocated part of the image
                os.pwrite(fd, block, e * ext)
                assert 32 in [off // ext for off, _ in read_activity_log(str(log))], f"after extent {e}"
        finally:
            os.close(fd)
        assert pair.server.activity_log_stats().al_updates >= 32


def test_sync_done_means_nothing_dirty_behind_its_cursor(tmp_path: Path) -> None:
    """A write that fails locally during a dirty resync, behind the sync's
    cursor, dirties a block the pass has already left: the sync copies it
    before it reports done, so done means nothing dirty and equal disks."""
    size = 16 * MiB
    with _pair_on_a_full_tmpfs(tmp_path, size) as pair:
        pair.server.mark_dirty(0, size)
        pair.server.set_sync_rate(2 * MiB)  # about 8 s for the whole pass
        pair.server.start_sync(0, dirty_only=True)
        _wait(lambda: pair.server.stats().sync_offset >= 4 * MiB)
        _write_fails_enospc(pair, MiB, 4 * KiB)
        assert pair.server.stats().sync_active  # the failure is behind a running pass
        _wait(lambda: not pair.server.stats().sync_active)
        stats = pair.server.stats()
        assert stats.sync_done and stats.dirty_blocks == 0, stats
        pair.stop()
        assert _identical(pair.a, pair.b)


def test_failed_local_fdatasync_fails_every_later_flush(tmp_path: Path) -> None:
    """After a failed fdatasync the kernel reports the error once: the next
    fdatasync succeeds although the pages it could not write are gone. So
    every flush after a failed one must fail too. The disk is a loop
    device whose backing file lies on a full tmpfs: its writeback fails."""
    _require("losetup", loop=True)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        size = 8 * MiB
        with open(small / "back", "wb") as f:
            f.truncate(size)
        with open(small / "fill", "wb") as f:
            f.write(bytes(MiB))  # the tmpfs is full: no block of "back" can be allocated
        loop = subprocess.run(["losetup", "-f", "--show", str(small / "back")],
                              check=True, capture_output=True, text=True).stdout.strip()
        try:
            dev = tmp_path / "r0"
            dev.touch()
            server = PrimaryServer(loop, str(dev), size)
            try:
                server.start()
                fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
                try:
                    os.pwrite(fd, _aligned(random.Random(49).randbytes(4 * KiB)), 0)  # into the page cache
                    for _ in range(3):
                        with pytest.raises(OSError) as ei:
                            os.fsync(fd)
                        assert ei.value.errno in (errno.EIO, errno.ENOSPC)
                finally:
                    with contextlib.suppress(OSError):  # close's flush fails the same way
                        os.close(fd)
                assert server.durability_stats().fdatasyncs == 1  # the later flushes did not retry
                assert "fdatasync" in server.stats().last_error
                # Nor is a stop clean: the daemon must not clear its "crashed primary" flag.
                with pytest.raises(NativeError) as stop:
                    server.stop()
                assert stop.value.errno == errno.EIO  # type: ignore[attr-defined]
                assert not server.stats().fuse_running
            finally:
                with contextlib.suppress(NativeError):  # EIO again; the object is freed anyway
                    server.close()
                if _mounted(dev):
                    subprocess.run(["umount", "-l", str(dev)], check=False)
        finally:
            subprocess.run(["losetup", "-d", loop], check=False)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_stopping_a_server_never_aborts_the_next_mount(tmp_path: Path) -> None:
    """A stopped server's FUSE connection number is recycled by the next
    FUSE mount on the machine; the stop must not abort that one (it did,
    through fusectl by number, when two appliances shared a kernel in the
    lab: a volume mounted during a failover then read EIO). One server
    stops while another starts, many times; the new one always serves."""
    _require()
    size = 4 * MiB
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(size)
    old = PrimaryServer(str(image), str(tmp_path / "dev0"), size)
    old.start()
    try:
        for i in range(1, 41):
            new = PrimaryServer(str(image), str(tmp_path / f"dev{i}"), size)
            stopper = threading.Thread(target=old.close)
            stopper.start()
            new.start()
            stopper.join(30)
            assert not stopper.is_alive()
            old = new
            with open(tmp_path / f"dev{i}", "rb") as f:
                assert len(f.read(64 * KiB)) == 64 * KiB, f"round {i}"
    finally:
        old.close()


# ---- fencing ----------------------------------------------------------------

class _Writer(threading.Thread):
    """O_DIRECT|O_DSYNC 4 KiB writes (write + flush round trip each), each one
    with unique data, recording every acknowledged one in order; it stops at
    the first error (recorded) or when told."""

    def __init__(self, dev: Path, size: int) -> None:
        super().__init__(daemon=True)
        self.dev, self.nblocks = dev, size // (4 * KiB)
        self.lock = threading.Lock()
        self.acked: dict[int, bytes] = {}  # offset -> last acknowledged data
        self.count = 0
        self.errors: list[OSError] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        rnd = random.Random(21)
        fd = os.open(self.dev, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
        try:
            i = 0
            while not self.stop_event.is_set():
                off = (i % self.nblocks) * 4 * KiB
                data = i.to_bytes(8, "little") + rnd.randbytes(4 * KiB - 8)
                try:
                    written = os.pwrite(fd, _aligned(data), off)
                except OSError as e:
                    with self.lock:
                        self.errors.append(e)
                    return
                assert written == len(data)
                with self.lock:
                    self.acked[off] = data
                    self.count += 1
                i += 1
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # the close's flush fails too once the server failed

    def snapshot(self) -> tuple[int, dict[int, bytes]]:
        with self.lock:
            return self.count, dict(self.acked)

    def finish(self, timeout: float = 20.0) -> None:
        self.stop_event.set()
        self.join(timeout)
        assert not self.is_alive(), "the writer is still blocked"


def _read_at(path: Path, off: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(length)


def _all_present(path: Path, acked: dict[int, bytes]) -> list[int]:
    """Offsets whose acknowledged data is NOT in the image at path."""
    return [off for off, data in acked.items() if _read_at(path, off, len(data)) != data]


def _fence_and_cut(pair: Pair, writer: _Writer) -> tuple[int, dict[int, bytes]]:
    """Run the writer, cut the peer, wait for the suspension with the writer
    blocked on a held op, and check that nothing the peer did not get was
    acknowledged. Returns the writer's snapshot at that point."""
    receiver = pair.receiver
    assert receiver is not None
    writer.start()
    _wait(lambda: writer.snapshot()[0] >= 20 or not writer.is_alive())
    assert not writer.errors
    receiver.stop()  # the connection goes away under the writer's feet
    _wait(lambda: (lambda st: st.suspended and st.held >= 1)(pair.server.stats()))
    stats = pair.server.stats()
    assert not stats.peer_connected and not stats.failed_io
    assert stats.last_error.startswith("peer lost")
    count, acked = writer.snapshot()
    # (a) Every write acknowledged to the application reached the peer.
    assert _all_present(pair.b, acked) == []
    # The writer's current op is held: it cannot have progressed meanwhile.
    assert writer.snapshot()[0] == count and writer.is_alive() and not writer.errors
    return count, acked


def test_fencing_suspends_then_resume_degraded(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    pair.server.set_fencing(True)
    writer = _Writer(pair.dev, pair.size)
    try:
        count, _ = _fence_and_cut(pair, writer)
        pair.server.resume(degraded=True)
        # The held write returns success and later writes go on, local-only.
        _wait(lambda: writer.snapshot()[0] >= count + 20 or not writer.is_alive())
    finally:
        writer.finish()
    assert not writer.errors
    stats = pair.server.stats()
    assert not stats.suspended and not stats.failed_io and stats.held == 0
    assert not stats.peer_connected and stats.dirty_blocks > 0
    pair.server.resume(degraded=True)  # not suspended any more: a no-op
    _, acked = writer.snapshot()
    fd = os.open(pair.dev, os.O_RDONLY)
    try:
        assert all(os.pread(fd, len(d), off) == d for off, d in acked.items())
    finally:
        os.close(fd)
    pair.stop()
    assert _all_present(pair.a, acked) == []


def test_fencing_holds_a_flush_that_needs_no_frame(make_pair: Callable[..., Pair]) -> None:
    """Everything the peer acked is durable, so an fsync would need no FLUSH
    frame: after a peer failure it is held all the same, until resume."""
    pair = make_pair()
    pair.server.set_fencing(True)
    data = _aligned(random.Random(4).randbytes(4 * KiB))
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    done = threading.Event()
    result: list[BaseException | None] = []

    def fsync() -> None:
        try:
            os.fsync(fd)
            result.append(None)
        except OSError as e:
            result.append(e)
        done.set()

    try:
        for i in range(10):
            os.pwrite(fd, data, i * 4 * KiB)
        frames = pair.server.durability_stats().flush_frames
        assert pair.receiver is not None
        pair.receiver.stop()
        _wait(lambda: pair.server.stats().suspended)
        t = threading.Thread(target=fsync)
        t.start()
        _wait(lambda: pair.server.stats().held == 1)
        assert not done.wait(0.3), "a flush was answered while suspended"
        assert pair.server.durability_stats().flush_frames == frames  # none needed
        pair.server.resume(degraded=True)
        assert done.wait(20)
        t.join()
        assert result == [None]
    finally:
        os.close(fd)
    stats = pair.server.stats()
    assert not stats.suspended and stats.held == 0 and stats.dirty_blocks == 0
    assert _all_present(pair.b, {i * 4 * KiB: bytes(data) for i in range(10)}) == []


def test_fencing_resume_fail_answers_eio(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    pair.server.set_fencing(True)
    writer = _Writer(pair.dev, pair.size)
    try:
        count, acked = _fence_and_cut(pair, writer)
        pair.server.resume(degraded=False)
        writer.join(20)
        assert not writer.is_alive()
    finally:
        writer.finish()
    assert [e.errno for e in writer.errors] == [errno.EIO]  # the held write
    assert writer.snapshot()[0] == count
    stats = pair.server.stats()
    assert stats.failed_io and not stats.suspended and stats.held == 0
    fd = os.open(pair.dev, os.O_RDWR | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, _aligned(b"n" * 4 * KiB), 0)
        assert ei.value.errno == errno.EIO
        with pytest.raises(OSError) as ei:
            os.fsync(fd)
        assert ei.value.errno == errno.EIO
    finally:
        with pytest.raises(OSError) as ei:
            os.close(fd)  # closed, but its flush reports the failure
        assert ei.value.errno == errno.EIO
    assert pair.server.stats().write_errors >= 1  # the held op may be the flush half
    # Reads still work (the close of a read-only handle too) and see what
    # was acknowledged.
    fd = os.open(pair.dev, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4 * KiB)
        for off, data in list(acked.items())[:50]:
            assert os.preadv(fd, [buf], off) == 4 * KiB and buf[:] == data
    finally:
        os.close(fd)
    # Stepped down: no new peer, no way back to acknowledging writes.
    primary_end, secondary_end = _socket_pair()
    try:
        with pytest.raises(NativeError) as exc:
            pair.server.attach_peer(primary_end.detach())
        assert exc.value.code == E_STATE  # type: ignore[attr-defined]
        with pytest.raises(NativeError):
            pair.server.resume(degraded=True)
    finally:
        secondary_end.close()
    assert pair.server.stats().failed_io


def test_fencing_attach_while_suspended_then_resync(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    pair.server.set_fencing(True)
    writer = _Writer(pair.dev, pair.size)
    try:
        count, _ = _fence_and_cut(pair, writer)
        old = pair.receiver
        assert old is not None
        pair.connect()  # allowed while suspended; the held op stays held
        old.close()
        stats = pair.server.stats()
        assert stats.peer_connected and stats.suspended and stats.held >= 1
        assert writer.snapshot()[0] == count
        pair.server.resume(degraded=True)
        _wait(lambda: writer.snapshot()[0] >= count + 20 or not writer.is_alive())
    finally:
        writer.finish()
    assert not writer.errors
    stats = pair.server.stats()
    assert stats.peer_connected and not stats.suspended and stats.held == 0
    pair.server.start_sync(0, dirty_only=True)
    _wait(lambda: not pair.server.stats().sync_active)
    assert pair.server.stats().sync_done and pair.server.stats().dirty_blocks == 0
    pair.stop()
    assert _identical(pair.a, pair.b)


def test_fencing_stop_answers_held_ops(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    pair.server.set_fencing(True)
    writer = _Writer(pair.dev, pair.size)
    try:
        _fence_and_cut(pair, writer)
        pair.server.stop()  # must not hang on the held op
        writer.join(20)
        assert not writer.is_alive()
    finally:
        writer.finish()
    assert len(writer.errors) == 1
    assert not pair.server.stats().fuse_running


def test_fencing_off_or_detach_keeps_acknowledging(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    receiver = pair.receiver
    assert receiver is not None
    writer = _Writer(pair.dev, pair.size)
    try:
        writer.start()
        _wait(lambda: writer.snapshot()[0] >= 20 or not writer.is_alive())
        receiver.stop()
        _wait(lambda: not pair.server.stats().peer_connected)
        count = writer.snapshot()[0]
        # Today's behaviour: the writer goes on, local-only, marked dirty.
        _wait(lambda: writer.snapshot()[0] >= count + 20 or not writer.is_alive())
        stats = pair.server.stats()
        assert not stats.suspended and stats.held == 0 and stats.dirty_blocks > 0

        # With fencing on, an explicit detach is not a failure to fence.
        receiver.close()
        pair.connect()
        pair.server.set_fencing(True)
        pair.server.detach_peer()
        count = writer.snapshot()[0]
        _wait(lambda: writer.snapshot()[0] >= count + 20 or not writer.is_alive())
        stats = pair.server.stats()
        assert not stats.suspended and stats.held == 0 and not stats.peer_connected
    finally:
        writer.finish()
    assert not writer.errors
