"""Eight volumes on one pair against one: do the volumes' data paths get in each other's way?

Each volume is what a pair of several runs per disk (docs/decisions.md 26): its
own C server (FUSE file) on its own image on the root disk, mirrored to its
own receiver over its own 127.0.0.1 connection, replica on tmpfs (variant (d)
of test_write_path.py). Two workloads, each first on one volume alone, then
on all eight at once, one writer per volume:

* 4 KiB O_DSYNC writes at random offsets: aggregate writes/s against one
  volume's (independent volumes should add up, like 8 concurrent writers on
  one volume: the #7 goal there is ≥ 4 ×);
* 1 MiB writes + fsync: aggregate GiB/s against one volume's (bounded by the
  two shared cores, as (d) is).

The report goes to ``.benchmarks/latest-volumes.md``. Nothing here asserts on
time; it does assert that every replica equals its image afterwards.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from write_path_report import machine
from write_targets import Target, fill_image, mirrord, tmpfs
from write_workloads import KiB, MiB, aligned_buffer, dsync_4kib, dsync_offsets, run_together, sequential_1mib

VOLUMES = 8
SIZE = 128 * MiB
DSYNC_WRITES = 1500  # per writer
RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def volumes(bench_dir: Path) -> Iterator[list[Target]]:
    """Eight mirrored volumes (image on the root disk, replica on a tmpfs of their own)."""
    root = bench_dir / "volumes"
    root.mkdir()
    with ExitStack() as stack:
        replicas = stack.enter_context(tmpfs(root / "tmpfs", VOLUMES * SIZE + 64 * MiB))
        targets = []
        for i in range(VOLUMES):
            image, replica = root / f"v{i}.img", replicas / f"v{i}.img"
            fill_image(image, SIZE)
            shutil.copyfile(image, replica)  # in sync from the start: the replicas can be compared
            targets.append(stack.enter_context(mirrord("d", image, SIZE, root / f"dev{i}", replica)))
        yield targets


def test_dsync_4kib_one_volume_and_eight(benchmark: Any, volumes: list[Target]) -> None:
    bufs = [aligned_buffer(4 * KiB, seed=i) for i in range(VOLUMES)]
    offsets = [dsync_offsets(DSYNC_WRITES, SIZE, seed=100 + i) for i in range(VOLUMES)]
    dsync_4kib(volumes[0].path, bufs[0], offsets[0][:200], direct=True)  # warm-up

    def measure() -> None:
        _, alone = dsync_4kib(volumes[0].path, bufs[0], offsets[0], direct=True)
        _, wall = run_together([lambda i=i: dsync_4kib(volumes[i].path, bufs[i], offsets[i], direct=True)
                          for i in range(VOLUMES)])
        RESULTS["dsync"] = {"one": DSYNC_WRITES / alone, "eight": VOLUMES * DSYNC_WRITES / wall}

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for t in volumes:  # protocol C: a write returned only after its receiver applied it
        assert t.replica is not None and filecmp.cmp(t.backing, t.replica, shallow=False)
    benchmark.extra_info.update({k: round(v, 1) for k, v in RESULTS["dsync"].items()})
    _write_report()


def test_sequential_1mib_one_volume_and_eight(benchmark: Any, volumes: list[Target]) -> None:
    bufs = [aligned_buffer(MiB, seed=50 + i) for i in range(VOLUMES)]
    sequential_1mib(volumes[0].path, bufs[0], SIZE, direct=True)  # warm-up

    def measure() -> None:
        alone = sequential_1mib(volumes[0].path, bufs[0], SIZE, direct=True)
        _, wall = run_together([lambda i=i: sequential_1mib(volumes[i].path, bufs[i], SIZE, direct=True)
                          for i in range(VOLUMES)])
        RESULTS["1mib"] = {"one": SIZE / alone / (1 << 30), "eight": VOLUMES * SIZE / wall / (1 << 30)}

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for t in volumes:  # protocol C: a write returned only after its receiver applied it
        assert t.replica is not None and filecmp.cmp(t.backing, t.replica, shallow=False)
    benchmark.extra_info.update({k: round(v, 3) for k, v in RESULTS["1mib"].items()})
    _write_report()


def _write_report() -> None:
    info = machine()
    lines = ["# Eight volumes on one pair against one (`tests/bench/test_volume_scaling.py`)", "",
             *(f"- {k}: {v}" for k, v in info.items()),
             f"- load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", "",
             f"Each volume: its own C server on a {SIZE >> 20} MiB image on the root disk, mirrored over its own "
             "127.0.0.1 connection to its own receiver, replica on tmpfs; one writer per volume.", "",
             "| workload | one volume | eight volumes at once (sum) | eight / one |", "|---|---|---|---|"]
    if "dsync" in RESULTS:
        r = RESULTS["dsync"]
        lines.append(f"| 4 KiB O_DSYNC writes/s ({DSYNC_WRITES} per writer) | {r['one']:.0f} | {r['eight']:.0f} | "
                     f"{r['eight'] / r['one']:.2f} |")
    if "1mib" in RESULTS:
        r = RESULTS["1mib"]
        lines.append(f"| 1 MiB writes + fsync, GiB/s ({SIZE >> 20} MiB per writer) | {r['one']:.2f} | "
                     f"{r['eight']:.2f} | {r['eight'] / r['one']:.2f} |")
    out = Path(__file__).resolve().parents[2] / ".benchmarks" / "latest-volumes.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
