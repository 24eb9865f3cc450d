"""Fixtures of the write-path benchmarks (run with ``make bench``).

Needs root, /dev/fuse, gcc and pkg-config fuse3 (passthrough_ll is built from
the Debian example at session start, in a temporary directory). Everything
lives under one temporary directory on the root disk (``/var/tmp``): the
images, the FUSE mountpoints and a tmpfs of our own for the tmpfs replica.
It is removed at session end, after every mount under it is gone.

At session end the figures of every variant are printed as one table and
written to ``.benchmarks/latest-write-path.md``; pytest-benchmark's JSON
(with the same figures in each benchmark's extra_info) goes to
``.benchmarks/latest-write-path.json`` unless --benchmark-json says otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from under_ci import skip_or_fail
from write_path_report import WritePathReport
from write_targets import GiB, MiB, build_passthrough_ll, fill_image, remove_tree, tmpfs

IMAGE_SIZE = GiB
_REPORT = pytest.StashKey[WritePathReport]()


def _require() -> None:
    missing = None
    if os.geteuid() != 0:
        missing = "root"
    elif not os.path.exists("/dev/fuse"):
        missing = "/dev/fuse"
    else:
        missing = next((t for t in ("gcc", "pkg-config", "mount", "umount") if shutil.which(t) is None), None)
    if missing:
        message = f"the write-path benchmarks need {missing}"
        skip_or_fail(message)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REPORT] = WritePathReport()
    if hasattr(config.option, "benchmark_json") and not config.option.benchmark_json:
        out = config.rootpath / ".benchmarks"
        out.mkdir(exist_ok=True)
        config.option.benchmark_json = str(out / "latest-write-path.json")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The soak last: its CPU hogs leave the load at 4-6 for minutes after they stop,
    and every figure measured in that wake is skewed (it was, until session 7)."""
    items.sort(key=lambda item: item.path.name == "test_soak.py")


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    report = config.stash.get(_REPORT, None)
    if report is None or report.empty():
        return
    text = report.render()
    path = config.rootpath / ".benchmarks" / "latest-write-path.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    terminalreporter.write_sep("-", "mirrord write path (all variants from this run)")
    terminalreporter.write_line(text)
    terminalreporter.write_line(f"written to {path}")


@pytest.fixture(scope="session")
def write_path_report(pytestconfig: pytest.Config) -> WritePathReport:
    return pytestconfig.stash[_REPORT]


@pytest.fixture(scope="session")
def bench_dir() -> Iterator[Path]:
    _require()
    d = Path(tempfile.mkdtemp(prefix="mirrord-bench-", dir="/var/tmp"))
    try:
        yield d
    finally:
        remove_tree(d)


@pytest.fixture(scope="session")
def passthrough_ll_binary(bench_dir: Path) -> Path:
    return build_passthrough_ll(bench_dir / "build")


@pytest.fixture(scope="session")
def primary_image(bench_dir: Path) -> Path:
    """The 1 GiB image on the root disk every variant writes to (fully written once)."""
    image = bench_dir / "images" / "primary.img"
    image.parent.mkdir()
    fill_image(image, IMAGE_SIZE)
    return image


@pytest.fixture(scope="session")
def disk_replica(bench_dir: Path) -> Path:
    """The peer's image for variant (e), on the root disk."""
    image = bench_dir / "replica-disk" / "replica.img"
    image.parent.mkdir()
    fill_image(image, IMAGE_SIZE)
    return image


@pytest.fixture(scope="session")
def tmpfs_dir(bench_dir: Path) -> Iterator[Path]:
    with tmpfs(bench_dir / "tmpfs", IMAGE_SIZE + 64 * MiB) as d:
        yield d


@pytest.fixture(scope="session")
def tmpfs_replica(tmpfs_dir: Path) -> Path:
    """The peer's image for variant (d), on our tmpfs (a second machine's disk stand-in)."""
    image = tmpfs_dir / "replica.img"
    fill_image(image, IMAGE_SIZE)
    return image
