"""Shared by every test directory: the installed console scripts (startHA, HAstatus …) are on PATH.

Commands run inside lab nodes find them through PATH, exactly as an operator
would, also when pytest is started as ``.venv/bin/python -m pytest`` without
activating the virtualenv.
"""

import os
import subprocess
import sys
from typing import Iterator

import pytest

_bin = os.path.dirname(sys.executable)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")


_FUSECTL = "/sys/fs/fuse/connections"


def _fusectl_mounted() -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == _FUSECTL for line in f)


@pytest.fixture(scope="session", autouse=True)
def leave_fusectl_as_found() -> Iterator[None]:
    """The data path mounts fusectl when it must abort a FUSE connection and
    none is mounted (as systemd would); tests leave the host as they found it."""
    before = _fusectl_mounted()
    yield
    if not before and _fusectl_mounted():
        subprocess.run(["umount", _FUSECTL], check=False, timeout=30)
