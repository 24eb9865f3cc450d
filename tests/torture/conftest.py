"""The torture tests drive the same namespace lab as tests/lab: its fixtures and helpers serve here too."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

LAB_TESTS = Path(__file__).resolve().parent.parent / "lab"
if str(LAB_TESTS) not in sys.path:  # hactl, writer: the lab's helpers
    sys.path.append(str(LAB_TESTS))

from hactl import reset_pair  # noqa: E402  (importable once LAB_TESTS is on the path)

DISK_SIZE = "128M"
MOUNT_ROOT = Path("/run/mirrord-torture")  # world-searchable, unlike pytest's tmp dirs (PostgreSQL runs as postgres)

_spec = importlib.util.spec_from_file_location("lab_fixtures", LAB_TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
lab_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lab_fixtures)


@pytest.fixture(name="make_lab", scope="session")
def make_lab_fixture() -> Callable[..., Any]:
    """``with make_lab(tmp_path, disk_size) as lab:`` a lab of a test's own, checked clean after."""
    return lab_fixtures.make_lab


@pytest.fixture
def torture_lab(make_lab: Any, tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """A lab of its own with a mount point both appliances can use, left clean whatever happens."""
    with make_lab(tmp_path / "lab", DISK_SIZE) as lab:
        mount = MOUNT_ROOT / lab.name / "mnt"
        try:
            yield lab, mount
        finally:
            for node in ("a1", "a2"):  # kept in pytest's tmp dir: the lab's own data goes with lab down
                log = lab.home(node) / "log" / "ha.log"
                if log.exists():
                    shutil.copy(log, tmp_path / f"{node}-ha.log")
            try:
                reset_pair(lab)
            finally:
                shutil.rmtree(MOUNT_ROOT / lab.name, ignore_errors=True)
                with contextlib.suppress(OSError):  # not empty: a torture run in another checkout uses it
                    MOUNT_ROOT.rmdir()


