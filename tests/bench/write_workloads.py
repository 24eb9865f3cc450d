"""The I/O the write-path benchmarks time, identical for every variant.

* ``sequential_1mib``: 1 GiB as 1 MiB pwrites from one page-aligned buffer,
  then one fsync (throughput).
* ``dsync_4kib``: N 4 KiB pwrites on an O_DSYNC file at fixed pseudo-random
  4 KiB-aligned offsets (each write is durable before it returns: writes/s
  and per-write latency).
* ``concurrent_dsync_4kib``: the same writes split over CONCURRENT_WRITERS
  threads, each with its own descriptor, all writing at once (how far the
  data path scales when many writers wait on the disk and the peer).

O_DIRECT is used whenever the target accepts it (``direct=False`` otherwise,
see write_targets.passthrough_ll). Buffers are mmap'ed, hence page aligned.
"""

from __future__ import annotations

import mmap
import os
import random
import statistics
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

CONCURRENT_WRITERS = 16
PARALLEL_WRITERS = 4  # 1 MiB writers at once in parallel_1mib's bench
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

T = TypeVar("T")


def aligned_buffer(size: int, seed: int) -> mmap.mmap:
    buf = mmap.mmap(-1, size)
    buf.write(random.Random(seed).randbytes(size))
    return buf


def stamp(buf: mmap.mmap, round_no: int) -> None:
    """Make this round's bytes differ from the last round's (first 16 bytes)."""
    buf[:16] = f"round {round_no:010d}".encode()


def _write_range(fd: int, buf: mmap.mmap, start: int, end: int) -> None:
    """[start, end) as len(buf)-sized pwrites in order; a short write is an error."""
    chunk = len(buf)
    for off in range(start, end, chunk):
        n = os.pwrite(fd, buf, off)
        if n != chunk:
            raise OSError(f"short write at {off}: {n} of {chunk}")


def busy_cpu_seconds() -> float:
    """CPU time every core of the machine has spent on anything but idle and iowait
    (/proc/stat), for CPU budgets: both appliances of a mirrored variant run here."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = ticks[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def sequential_1mib(path: Path, buf: mmap.mmap, total: int, direct: bool) -> float:
    """Write total bytes as len(buf)-sized pwrites from offset 0, then fsync; seconds taken."""
    fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if direct else 0))
    try:
        t0 = time.perf_counter()
        _write_range(fd, buf, 0, total)
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def parallel_1mib(path: Path, bufs: list[mmap.mmap], total: int, direct: bool) -> float:
    """len(bufs) writers at once, writer i writing the i-th equal share of total sequentially in
    len(bufs[i])-sized pwrites; then one fsync. Seconds taken (what a filesystem's writeback or
    a database checkpoint looks like: several large writes in flight, not one)."""
    n = len(bufs)
    share = total // n
    flags = os.O_WRONLY | (os.O_DIRECT if direct else 0)

    def writer(i: int) -> None:
        fd = os.open(path, flags)
        try:
            _write_range(fd, bufs[i], i * share, (i + 1) * share)
        finally:
            os.close(fd)

    fd = os.open(path, flags)
    try:
        t0 = time.perf_counter()
        run_together([lambda i=i: writer(i) for i in range(n)])
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def dsync_offsets(count: int, size: int, seed: int = 4096) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(size // (4 * KiB)) * 4 * KiB for _ in range(count)]


def dsync_4kib(path: Path, buf: mmap.mmap, offsets: list[int], direct: bool) -> tuple[list[int], float]:
    """One O_DSYNC 4 KiB pwrite per offset: the nanoseconds each took, and the seconds for all."""
    flags = os.O_WRONLY | os.O_DSYNC | (os.O_DIRECT if direct else 0)
    lat: list[int] = []
    fd = os.open(path, flags)
    try:
        clock = time.perf_counter_ns
        start = clock()
        for off in offsets:
            t0 = clock()
            n = os.pwrite(fd, buf, off)
            lat.append(clock() - t0)
            if n != len(buf):
                raise OSError(f"short write at {off}: {n} of {len(buf)}")
        return lat, (clock() - start) / 1e9
    finally:
        os.close(fd)


def run_together(jobs: list[Callable[[], T]]) -> tuple[list[T], float]:
    """Each job in its own thread, all released by one barrier; their results and the wall seconds
    until the last is done. A job's exception is raised here. os.pwrite releases the GIL, so the
    threads really wait in the kernel at the same time."""
    import threading

    barrier = threading.Barrier(len(jobs) + 1)
    results: list[Any] = [ValueError("job did not run")] * len(jobs)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = jobs[i]()
        except BaseException as exc:  # reported by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    barrier.wait(timeout=30)
    start = time.perf_counter()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - start
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results, wall


def concurrent_dsync_4kib(path: Path, bufs: list[mmap.mmap], offsets: list[int],
                          direct: bool) -> tuple[list[int], float]:
    """len(bufs) threads, thread i writing bufs[i] at offsets[i::len(bufs)]; latencies and wall seconds."""
    n = len(bufs)
    results, wall = run_together([lambda i=i: dsync_4kib(path, bufs[i], offsets[i::n], direct) for i in range(n)])
    lat: list[int] = []
    for r in results:
        lat.extend(r[0])
    return lat, wall


@dataclass(frozen=True)
class LatencySummary:
    writes: int
    seconds: float
    mean_us: float
    p50_us: float
    p99_us: float
    max_us: float

    @property
    def writes_per_s(self) -> float:
        return self.writes / self.seconds

    @classmethod
    def of(cls, latencies_ns: list[int], seconds: float) -> LatencySummary:
        """seconds: wall time of the whole loop (writes/s uses it)."""
        us = sorted(x / 1000 for x in latencies_ns)
        q = statistics.quantiles(us, n=100)
        return cls(writes=len(us), seconds=seconds, mean_us=statistics.fmean(us),
                   p50_us=q[49], p99_us=q[98], max_us=us[-1])


def read_back(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        return f.read(length)


def loopback_blast(total: int, chunk: int = MiB) -> float:
    """Seconds to push total bytes through one 127.0.0.1 TCP connection (sender thread -> receiver)."""
    import socket
    import threading

    from write_targets import localhost_pair

    a, b = localhost_pair()
    payload = memoryview(bytes(chunk))
    sink = bytearray(chunk)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for _ in range(total // chunk):
                a.sendall(payload)
            a.shutdown(socket.SHUT_WR)
        except BaseException as e:  # reported by the caller
            errors.append(e)

    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    b.settimeout(30)
    try:
        sender = threading.Thread(target=send)
        t0 = time.perf_counter()
        sender.start()
        got = 0
        while got < total:
            n = b.recv_into(sink)
            if n == 0:
                break
            got += n
        elapsed = time.perf_counter() - t0
        sender.join(timeout=30)
        if errors:
            raise errors[0]
        if got != total:
            raise AssertionError(f"loopback: received {got} of {total} bytes")
        return elapsed
    finally:
        a.close()
        b.close()


def loopback_round_trips(count: int) -> list[int]:
    """Nanoseconds of each 64-byte ping-pong over one 127.0.0.1 TCP connection (echo thread)."""
    import socket
    import threading

    from write_targets import localhost_pair

    a, b = localhost_pair()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(10)

    def echo() -> None:
        with suppress(OSError):
            for _ in range(count):
                msg = b.recv(64)
                if not msg:
                    return
                b.sendall(msg)

    ping = bytes(64)
    rtts: list[int] = []
    echoer = threading.Thread(target=echo)
    echoer.start()
    try:
        clock = time.perf_counter_ns
        for _ in range(count):
            t0 = clock()
            a.sendall(ping)
            got = 0
            while got < len(ping):
                n = len(a.recv(64))
                if n == 0:
                    raise AssertionError("loopback echo closed early")
                got += n
            rtts.append(clock() - t0)
        return rtts
    finally:
        a.close()
        echoer.join(timeout=10)
        b.close()
