"""Write-path benchmarks: mirrord against a local file and libfuse's C passthrough_ll.

Variants (write_targets.py): (a) local file, (b) passthrough_ll, (c) mirrord
without a peer, (d) mirrored to a receiver on tmpfs over 127.0.0.1 TCP,
(e) mirrored with both images on the root disk. Workloads
(write_workloads.py): 1 GiB of 1 MiB writes + one fsync, and 4 KiB O_DSYNC
writes. Then a full sync of a 1 GiB image against the disk and loopback TCP.

These report; they never assert on time. They do assert that the bytes
landed (read back from the image, and from the replica when mirrored) and
that mirrord's counters agree.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from write_path_report import Throughput, WritePathReport
from write_targets import LABELS, Target, local_file, mirrord, passthrough_ll
from write_workloads import (
    CONCURRENT_WRITERS, PARALLEL_WRITERS, GiB, KiB, MiB, LatencySummary, aligned_buffer, concurrent_dsync_4kib,
    busy_cpu_seconds, dsync_4kib, dsync_offsets, loopback_blast, loopback_round_trips, parallel_1mib, read_back,
    sequential_1mib, stamp,
)

VARIANTS = list(LABELS)  # a b c d e
# The variants are interleaved: sweep 1 runs a..e, then sweep 2 runs a..e, and
# so on, so that a load change on the shared machine hits every variant
# rather than the few that happened to run during it. Figures pool the sweeps.
SWEEPS = [1, 2, 3]
ROUNDS_1MIB = 1  # per sweep
WARMUP_1MIB = 1  # the first pass after another variant also refills the page cache
ROUNDS_DSYNC = 1  # per sweep
WARMUP_DSYNC = 1
DSYNC_WRITES = 2000
# The 16-writer round lasts ~0.1 s at DSYNC_WRITES: too short for /proc/stat's 10 ms ticks to give
# its CPU per write (the ceiling in the report) better than ±15 %.
CONCURRENT_DSYNC_WRITES = 8000
ROUNDS_SYNC = 3
WARMUP_SYNC = 1
SIZE = GiB  # == conftest.IMAGE_SIZE


@pytest.fixture
def target(request: pytest.FixtureRequest, key: str, bench_dir: Path, primary_image: Path) -> Iterator[Target]:
    """Variant `key` set up on the shared primary image; torn down whatever happens."""
    if key == "a":
        cm = local_file(primary_image)
    elif key == "b":
        binary = request.getfixturevalue("passthrough_ll_binary")
        cm = passthrough_ll(binary, primary_image, bench_dir / "mnt-passthrough_ll",
                            bench_dir / "passthrough_ll.log")
    else:
        replica = {"c": None,
                   "d": lambda: request.getfixturevalue("tmpfs_replica"),
                   "e": lambda: request.getfixturevalue("disk_replica")}[key]
        cm = mirrord(key, primary_image, SIZE, bench_dir / f"dev-{key}", replica() if replica else None)
    with cm as t:
        yield t


def _round_setup(buf: Any) -> Callable[[], tuple[tuple[()], dict[str, Any]]]:
    counter = itertools.count()

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        stamp(buf, next(counter))
        return (), {}

    return setup


def _check_landed(t: Target, offsets: list[int], expected: bytes) -> None:
    for off in offsets:
        assert read_back(t.backing, off, len(expected)) == expected, f"({t.key}) local image at {off}"
        if t.replica is not None:
            assert read_back(t.replica, off, len(expected)) == expected, f"({t.key}) replica at {off}"


def _check_mirrord(t: Target, benchmark: Any, report: WritePathReport, min_bytes: int) -> None:
    stats = t.server_stats()
    if stats is None:
        return
    assert stats.write_errors == 0, stats.last_error
    assert stats.bytes_written >= min_bytes
    benchmark.extra_info["server_writes"] = stats.writes
    benchmark.extra_info["server_flushes"] = stats.flushes
    if t.receiver is None:
        return
    rstats = t.receiver_stats()
    assert rstats is not None
    assert stats.peer_connected and stats.dirty_blocks == 0, stats.last_error
    assert stats.in_flight == 0 and stats.acked == stats.frames_sent
    assert rstats.crc_errors == 0 and rstats.bytes_applied == stats.bytes_sent
    benchmark.extra_info["frames_sent"] = stats.frames_sent
    benchmark.extra_info["peer_ack_latency_avg_us"] = round(stats.ack_latency_avg_us, 1)
    benchmark.extra_info["peer_ack_latency_max_us"] = round(stats.ack_latency_ns_max / 1000, 1)


@pytest.mark.parametrize("key", VARIANTS)
@pytest.mark.parametrize("sweep", SWEEPS)
def test_1mib_writes_then_fsync(benchmark: Any, sweep: int, key: str, target: Target,
                                write_path_report: WritePathReport) -> None:
    """1 GiB as 1024 sequential 1 MiB writes (O_DIRECT where accepted), then one fsync."""
    buf = aligned_buffer(MiB, seed=1)
    seconds: list[float] = []
    cpu: list[float] = []

    def one_round() -> None:
        busy = busy_cpu_seconds()
        seconds.append(sequential_1mib(target.path, buf, SIZE, target.o_direct))
        cpu.append(busy_cpu_seconds() - busy)

    benchmark.pedantic(one_round, setup=_round_setup(buf), rounds=ROUNDS_1MIB, iterations=1,
                       warmup_rounds=WARMUP_1MIB)
    seconds = seconds[-ROUNDS_1MIB:]
    _check_landed(target, [0, SIZE // 2, SIZE - MiB], bytes(buf))
    tp = Throughput(SIZE, seconds)
    write_path_report.add_throughput(key, SIZE, seconds)
    write_path_report.add_cpu(key, SIZE, cpu[-ROUNDS_1MIB:])
    if target.note:
        write_path_report.notes[key] = target.note
    benchmark.extra_info.update(
        variant=f"({key}) {target.label}", o_direct=target.o_direct, note=target.note,
        bytes_per_round=SIZE, round_seconds=[round(s, 4) for s in seconds],
        round_cpu_seconds=[round(c, 3) for c in cpu[-ROUNDS_1MIB:]],
        bytes_per_s=round(tp.mean_bps), GiB_per_s=round(tp.mean_bps / GiB, 3))
    _check_mirrord(target, benchmark, write_path_report, (WARMUP_1MIB + ROUNDS_1MIB) * SIZE)


@pytest.mark.parametrize("key", VARIANTS)
@pytest.mark.parametrize("sweep", SWEEPS)
def test_4kib_dsync_writes(benchmark: Any, sweep: int, key: str, target: Target,
                           write_path_report: WritePathReport) -> None:
    """DSYNC_WRITES 4 KiB O_DIRECT|O_DSYNC writes at pseudo-random aligned offsets, one at a time."""
    buf = aligned_buffer(4 * KiB, seed=2)
    offsets = dsync_offsets(DSYNC_WRITES, SIZE)
    runs: list[tuple[list[int], float]] = []
    benchmark.pedantic(lambda: runs.append(dsync_4kib(target.path, buf, offsets, target.o_direct)),
                       setup=_round_setup(buf), rounds=ROUNDS_DSYNC, iterations=1,
                       warmup_rounds=WARMUP_DSYNC)
    timed = runs[-ROUNDS_DSYNC:]
    _check_landed(target, [offsets[-1]], bytes(buf))
    summary = LatencySummary.of([ns for lat, _ in timed for ns in lat], sum(s for _, s in timed))
    for lat, wall in timed:
        write_path_report.add_dsync(key, lat, wall)
    if target.note:
        write_path_report.notes[key] = target.note
    benchmark.extra_info.update(
        variant=f"({key}) {target.label}", o_direct=target.o_direct, note=target.note,
        writes_per_round=DSYNC_WRITES, writes_per_s=round(summary.writes_per_s, 1),
        mean_us=round(summary.mean_us, 1), p50_us=round(summary.p50_us, 1),
        p99_us=round(summary.p99_us, 1), max_us=round(summary.max_us, 1))
    _check_mirrord(target, benchmark, write_path_report, 0)
    if "peer_ack_latency_avg_us" in benchmark.extra_info:
        write_path_report.ack_us.setdefault(key, []).append(benchmark.extra_info["peer_ack_latency_avg_us"])


@pytest.mark.parametrize("key", ["a", "c", "d"])
def test_concurrent_4kib_dsync_writers(benchmark: Any, key: str, target: Target,
                                       write_path_report: WritePathReport) -> None:
    """CONCURRENT_WRITERS threads, CONCURRENT_DSYNC_WRITES O_DSYNC 4 KiB writes in all, at distinct offsets."""
    bufs = [aligned_buffer(4 * KiB, seed=100 + i) for i in range(CONCURRENT_WRITERS)]
    offsets = sorted(set(dsync_offsets(CONCURRENT_DSYNC_WRITES * 2, SIZE, seed=8192)))[:CONCURRENT_DSYNC_WRITES]
    runs: list[tuple[list[int], float]] = []
    cpu: list[float] = []

    def one_round() -> None:
        busy = busy_cpu_seconds()
        runs.append(concurrent_dsync_4kib(target.path, bufs, offsets, target.o_direct))
        cpu.append(busy_cpu_seconds() - busy)

    benchmark.pedantic(one_round, rounds=1, iterations=1, warmup_rounds=1)
    lat, wall = runs[-1]
    for i, buf in enumerate(bufs):
        _check_landed(target, [offsets[i::CONCURRENT_WRITERS][-1]], bytes(buf))
    summary = LatencySummary.of(lat, wall)
    write_path_report.concurrent[key] = summary
    write_path_report.concurrent_cpu_s[key] = cpu[-1] / len(lat)
    benchmark.extra_info.update(variant=f"({key}) {target.label}", writers=CONCURRENT_WRITERS,
                                writes_per_s=round(summary.writes_per_s, 1), mean_us=round(summary.mean_us, 1),
                                p99_us=round(summary.p99_us, 1))
    _check_mirrord(target, benchmark, write_path_report, 0)


@pytest.mark.parametrize("key", ["c", "d"])
@pytest.mark.parametrize("sweep", SWEEPS)
def test_parallel_1mib_writers(benchmark: Any, sweep: int, key: str, target: Target,
                               write_path_report: WritePathReport) -> None:
    """1 GiB as 1 MiB O_DIRECT writes by PARALLEL_WRITERS writers at once (a quarter each), then one
    fsync: several large writes in flight, as from a filesystem's writeback, where the one-writer
    test above has one."""
    bufs = [aligned_buffer(MiB, seed=200 + i) for i in range(PARALLEL_WRITERS)]
    seconds: list[float] = []
    benchmark.pedantic(lambda: seconds.append(parallel_1mib(target.path, bufs, SIZE, target.o_direct)),
                       rounds=1, iterations=1, warmup_rounds=1)
    share = SIZE // PARALLEL_WRITERS
    for i, buf in enumerate(bufs):
        _check_landed(target, [i * share, (i + 1) * share - MiB], bytes(buf))
    write_path_report.parallel.setdefault(key, Throughput(SIZE, [])).seconds.append(seconds[-1])
    benchmark.extra_info.update(variant=f"({key}) {target.label}", writers=PARALLEL_WRITERS,
                                GiB_per_s=round(SIZE / seconds[-1] / GiB, 3))
    _check_mirrord(target, benchmark, write_path_report, 2 * SIZE)


def test_loopback_tcp_blast(benchmark: Any, bench_dir: Path, write_path_report: WritePathReport) -> None:
    """1 GiB through one 127.0.0.1 TCP connection (the bound of a sync over loopback)."""
    seconds: list[float] = []
    benchmark.pedantic(lambda: seconds.append(loopback_blast(SIZE)), rounds=ROUNDS_SYNC, iterations=1)
    tp = Throughput(SIZE, seconds)
    write_path_report.loopback = tp
    benchmark.extra_info.update(bytes_per_s=round(tp.mean_bps), GiB_per_s=round(tp.mean_bps / GiB, 3),
                                round_seconds=[round(s, 4) for s in seconds])


def test_loopback_tcp_round_trip(benchmark: Any, write_path_report: WritePathReport) -> None:
    """64-byte ping-pong over 127.0.0.1 between two threads: the floor of one peer round trip.

    A mirrored O_DSYNC write costs two (WRITE/WRITE_ACK, then FLUSH/FLUSH_ACK).
    Python on both ends adds a few µs per hop; the C path has no Python.
    """
    runs: list[list[int]] = []
    benchmark.pedantic(lambda: runs.append(loopback_round_trips(DSYNC_WRITES)), rounds=ROUNDS_DSYNC,
                       iterations=1, warmup_rounds=1)
    timed = runs[-ROUNDS_DSYNC:]
    summary = LatencySummary.of([ns for r in timed for ns in r], sum(ns for r in timed for ns in r) / 1e9)
    write_path_report.round_trip = summary
    benchmark.extra_info.update(mean_us=round(summary.mean_us, 1), p50_us=round(summary.p50_us, 1),
                                p99_us=round(summary.p99_us, 1))


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_disk_read_1gib(benchmark: Any, primary_image: Path, write_path_report: WritePathReport) -> None:
    """The primary image read start to end in 1 MiB reads, dropped from the page cache first: a sync's disk side."""
    seconds: list[float] = []

    def read_all() -> None:
        import time

        fd = os.open(primary_image, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            off = 0
            while chunk := os.pread(fd, MiB, off):
                off += len(chunk)
            seconds.append(time.perf_counter() - t0)
            assert off == SIZE
        finally:
            os.close(fd)

    benchmark.pedantic(read_all, setup=lambda: _drop_cache(primary_image), rounds=ROUNDS_SYNC, iterations=1)
    write_path_report.disk_read = Throughput(SIZE, seconds)
    benchmark.extra_info.update(GiB_per_s=round(write_path_report.disk_read.mean_bps / GiB, 3))


def test_full_sync_1gib(benchmark: Any, bench_dir: Path, primary_image: Path, tmpfs_replica: Path,
                        write_path_report: WritePathReport) -> None:
    """start_sync of the whole 1 GiB primary image to a receiver on tmpfs over 127.0.0.1.

    Each round: a fresh server and receiver, the primary image dropped from
    the page cache (a sync reads a disk that is not cached), then the time
    from start_sync until the server says the sync is done.
    """
    seconds: list[float] = []
    rounds = ExitStack()
    current: list[Target] = []

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        rounds.close()
        current.clear()
        _drop_cache(primary_image)
        current.append(rounds.enter_context(
            mirrord("d", primary_image, SIZE, bench_dir / "dev-sync", tmpfs_replica)))
        return (), {}

    def run() -> None:
        import time

        server = current[0].server
        assert server is not None
        t0 = time.perf_counter()
        server.start_sync(0)
        end = t0 + 120
        while server.stats().sync_active:
            if time.perf_counter() > end:
                raise TimeoutError("full sync did not finish within 120 s")
            time.sleep(0.002)
        seconds.append(time.perf_counter() - t0)

    with rounds:
        benchmark.pedantic(run, setup=setup, rounds=ROUNDS_SYNC, iterations=1, warmup_rounds=WARMUP_SYNC)
        t = current[0]
        stats = t.server_stats()
        assert stats is not None and stats.sync_done and stats.bytes_synced == SIZE, stats
        assert stats.dirty_blocks == 0 and stats.write_errors == 0
        t.server.stop()  # type: ignore[union-attr]
        assert t.receiver is not None
        t.receiver.stop()
        assert subprocess.run(["cmp", "-s", str(primary_image), str(tmpfs_replica)]).returncode == 0
    tp = Throughput(SIZE, seconds[-ROUNDS_SYNC:])
    write_path_report.full_sync = tp
    bound = write_path_report.sync_bound()
    benchmark.extra_info.update(
        bytes_per_s=round(tp.mean_bps), GiB_per_s=round(tp.mean_bps / GiB, 3),
        round_seconds=[round(s, 4) for s in seconds[-ROUNDS_SYNC:]],
        bound_bytes_per_s=round(bound) if bound else None,
        ratio_to_bound=round(tp.mean_bps / bound, 3) if bound else None)
