"""Resync after a disconnection: mirrord's bitmap resync against `rsync --inplace` (issues 5 and 7).

A 1 GiB primary image of random data on the root disk and a replica on
tmpfs that starts identical. For 1 %, 10 % and 50 % of the 4 KiB blocks,
chosen at random:

* **mirrord**: the blocks are written through the FUSE device of a
  ``PrimaryServer`` with no peer (so its dirty bitmap records them); then a
  ``Receiver`` on the replica is attached over 127.0.0.1 and
  ``start_sync(dirty_only=True)`` runs; timed until the server says done.
* **rsync**: the replica is put back to its old content and ``rsync --inplace
  --no-whole-file`` sends the changed image to an rsync daemon on 127.0.0.1
  that writes the replica (its delta algorithm reads both whole files).

Both must leave the replica identical to the primary; the bytes each put on
the link come from mirrord's own counter (payload bytes sent) and rsync's
``--stats``. Targets: mirrord ≤ 0.2 × rsync's time at 1 %.

Then the application's side of a resync (issue 5: "application write latency
during a resync stays within 2× its idle value"): 4 KiB O_DSYNC writes on the
mirrored device, first with the pair idle and in sync, then while a full
resync of the whole 1 GiB runs (the writes stop counting when it ends).

Run: .venv/bin/python -m pytest -q tests/bench/test_resync.py --benchmark-only -p no:cacheprovider -s
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from under_ci import skip_or_fail
from write_targets import mirrord
from write_workloads import GiB, KiB, MiB, LatencySummary, aligned_buffer, dsync_offsets

SIZE = GiB
BLOCK = 4 * KiB
SHARES = (0.01, 0.10, 0.50)
GOAL_AT_1_PERCENT = 0.2
RESULTS: dict[float, dict[str, dict[str, float]]] = {}
LATENCY: dict[str, LatencySummary] = {}  # "idle", "resync"
LATENCY_GOAL = 2.0


def _require_rsync() -> None:
    if shutil.which("rsync") is None:
        message = "the resync benchmark needs rsync (Debian package rsync)"
        skip_or_fail(message)


@pytest.fixture(scope="module")
def original(bench_dir: Path) -> Path:
    """1 GiB of random data (distinct blocks: rsync's matching is not flattered by repeats)."""
    path = bench_dir / "resync" / "primary.img"
    path.parent.mkdir()
    with open(path, "wb") as f:
        for _ in range(SIZE // MiB):
            f.write(os.urandom(MiB))
    return path


@pytest.fixture(scope="module")
def rsync_daemon(bench_dir: Path, tmpfs_dir: Path) -> Iterator[str]:
    """An rsync daemon on 127.0.0.1 whose module `replica` is the tmpfs; its URL prefix."""
    _require_rsync()
    conf = bench_dir / "rsyncd.conf"
    conf.write_text(f"use chroot = no\n[replica]\n  path = {tmpfs_dir}\n  read only = no\n  uid = root\n  gid = root\n")
    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
                             "--address=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < end and proc.poll() is None, "the rsync daemon did not start"
                time.sleep(0.05)
        yield f"rsync://127.0.0.1:{port}/replica"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=never", str(src), str(dst)], check=True)


def _identical(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def _blocks(share: float) -> list[int]:
    n = SIZE // BLOCK
    return sorted(random.Random(int(share * 1000)).sample(range(n), int(n * share)))


@pytest.mark.parametrize("share", SHARES, ids=[f"{int(s * 100)}pct" for s in SHARES])
def test_resync_against_rsync(benchmark: Any, share: float, bench_dir: Path, original: Path,
                              tmpfs_replica: Path, rsync_daemon: str) -> None:
    primary = bench_dir / "resync" / f"primary-{int(share * 100)}.img"
    _copy(original, primary)
    blocks = _blocks(share)
    dirty = len(blocks) * BLOCK
    row: dict[str, dict[str, float]] = {}

    # -- mirrord: writes recorded in the bitmap while alone, then the resync.
    _copy(original, tmpfs_replica)
    with mirrord("d", primary, SIZE, bench_dir / "dev-resync") as t:
        buf = aligned_buffer(BLOCK, seed=7)
        fd = os.open(t.path, os.O_WRONLY | os.O_DIRECT)
        try:
            for i, b in enumerate(blocks):
                buf[:8] = i.to_bytes(8, "little")
                os.pwrite(fd, buf, b * BLOCK)
        finally:
            os.close(fd)
        server = t.server
        assert server is not None and server.stats().dirty_bytes == dirty
        t.attach(tmpfs_replica)
        sent_before = server.stats().bytes_sent

        def resync() -> None:
            t0 = time.perf_counter()
            server.start_sync(0, dirty_only=True)
            end = t0 + 300
            while server.stats().sync_active:
                assert time.perf_counter() < end, "the resync did not finish within 300 s"
                time.sleep(0.001)
            row["mirrord"] = {"seconds": time.perf_counter() - t0,
                              "bytes": server.stats().bytes_sent - sent_before}

        benchmark.pedantic(resync, rounds=1, iterations=1)
        stats = server.stats()
        assert stats.sync_done and stats.dirty_blocks == 0, stats
    assert _identical(primary, tmpfs_replica), "mirrord's resync left the replica different"

    # -- rsync: the same change, from the same old replica.
    _copy(original, tmpfs_replica)
    t0 = time.perf_counter()
    done = subprocess.run(["rsync", "--inplace", "--no-whole-file", "--stats", str(primary),
                           f"{rsync_daemon}/{tmpfs_replica.name}"], capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    sent = re.search(r"Total bytes sent: ([\d,.]+)", done.stdout)
    assert sent, done.stdout
    row["rsync"] = {"seconds": seconds, "bytes": float(sent.group(1).replace(",", "").replace(".", ""))}
    assert _identical(primary, tmpfs_replica), "rsync left the replica different"
    primary.unlink()

    RESULTS[share] = row
    ratio = row["mirrord"]["seconds"] / row["rsync"]["seconds"]
    benchmark.extra_info.update(share=share, dirty_bytes=dirty, ratio_time=round(ratio, 4),
                                **{f"{k}_{m}": round(v[m], 4) for k, v in row.items() for m in v})
    _write_report()


def _dsync_while(path: Path, offsets: list[int], running: Any = None) -> LatencySummary:
    """One O_DIRECT|O_DSYNC 4 KiB write per offset (while ``running()`` holds, if given)."""
    buf = aligned_buffer(BLOCK, seed=9)
    lat: list[int] = []
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
    try:
        start = time.perf_counter()
        for off in offsets:
            if running is not None and not running():
                break
            t0 = time.perf_counter_ns()
            os.pwrite(fd, buf, off)
            lat.append(time.perf_counter_ns() - t0)
        return LatencySummary.of(lat, time.perf_counter() - start)
    finally:
        os.close(fd)


def test_application_latency_during_a_resync(benchmark: Any, bench_dir: Path, original: Path,
                                             tmpfs_replica: Path) -> None:
    primary = bench_dir / "resync" / "primary-latency.img"
    _copy(original, primary)
    _copy(original, tmpfs_replica)
    offsets = dsync_offsets(2000, SIZE, seed=77)
    with mirrord("d", primary, SIZE, bench_dir / "dev-latency", tmpfs_replica) as t:
        server = t.server
        assert server is not None
        _dsync_while(t.path, offsets[:200])  # warm-up
        LATENCY["idle"] = _dsync_while(t.path, offsets)

        def during() -> None:
            server.start_sync(0)  # a full resync of the whole disk
            LATENCY["resync"] = _dsync_while(t.path, offsets * 10, lambda: server.stats().sync_active)
            end = time.monotonic() + 300
            while server.stats().sync_active:
                assert time.monotonic() < end, "the resync did not finish within 300 s"
                time.sleep(0.01)

        benchmark.pedantic(during, rounds=1, iterations=1)
        assert server.stats().sync_done
    assert _identical(primary, tmpfs_replica)
    primary.unlink()
    idle, busy = LATENCY["idle"], LATENCY["resync"]
    benchmark.extra_info.update(idle_mean_us=round(idle.mean_us, 1), resync_mean_us=round(busy.mean_us, 1),
                                idle_p50_us=round(idle.p50_us, 1), resync_p50_us=round(busy.p50_us, 1),
                                writes_during_resync=busy.writes)
    _write_report()


def _write_report() -> None:
    lines = ["# Resync after a disconnection: mirrord bitmap resync against rsync --inplace", "",
             f"1 GiB image of random data, replica on tmpfs, 127.0.0.1; load average at end "
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}.", "",
             "| dirty | mirrord s | mirrord bytes sent | rsync s | rsync bytes sent | time mirrord / rsync |",
             "|---|---|---|---|---|---|"]
    for share, row in sorted(RESULTS.items()):
        m, r = row["mirrord"], row["rsync"]
        lines.append(f"| {share:.0%} | {m['seconds']:.3f} | {m['bytes']:.0f} | {r['seconds']:.3f} | "
                     f"{r['bytes']:.0f} | {m['seconds'] / r['seconds']:.3f} |")
    if 0.01 in RESULTS:
        ratio = RESULTS[0.01]["mirrord"]["seconds"] / RESULTS[0.01]["rsync"]["seconds"]
        met = "yes" if ratio <= GOAL_AT_1_PERCENT else "**no**"
        lines += ["", "| target | value | goal | met |", "|---|---|---|---|",
                  f"| resync time at 1 % dirty, mirrord / rsync | {ratio:.3f} | ≤ {GOAL_AT_1_PERCENT} | {met} |"]
    if "idle" in LATENCY and "resync" in LATENCY:
        idle, busy = LATENCY["idle"], LATENCY["resync"]
        ratio = busy.mean_us / idle.mean_us
        lines += ["", "| 4 KiB O_DSYNC writes, mirrored | writes | mean µs | p50 µs | p99 µs |", "|---|---|---|---|---|",
                  f"| pair idle and in sync | {idle.writes} | {idle.mean_us:.0f} | {idle.p50_us:.0f} | {idle.p99_us:.0f} |",
                  f"| during a full 1 GiB resync | {busy.writes} | {busy.mean_us:.0f} | {busy.p50_us:.0f} | "
                  f"{busy.p99_us:.0f} |", "", "| target | value | goal | met |", "|---|---|---|---|",
                  f"| application latency during a resync / idle (mean) | {ratio:.2f} | ≤ {LATENCY_GOAL:g} | "
                  f"{'yes' if ratio <= LATENCY_GOAL else '**no**'} |"]
    out = Path(__file__).resolve().parents[2] / ".benchmarks" / "latest-resync.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
