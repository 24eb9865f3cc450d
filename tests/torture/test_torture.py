"""The torture test (issue 6): random faults under a writer that records what was acknowledged.

``make test`` runs a short version (``TORTURE_CYCLES``, default 5);
``make torture CYCLES=N SEED=S`` the long one, writing its report to
``TORTURE_REPORT``. Every failure names the seed that reproduces it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from nemesis import CATALOGUE, Torture
from pair import Pair
from under_ci import skip_or_fail

pytestmark = pytest.mark.lab

CYCLES = int(os.environ.get("TORTURE_CYCLES", "5"))

APP = """#!/bin/sh
# The torture's application is the writer itself: on stop nothing may keep the mount busy.
[ "$1" = stop ] && fuser -k -m "$MIRRORD_MOUNT" >/dev/null 2>&1
exit 0
"""


def require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        message = f"`{tool}` is missing (Debian package {package}; `make test` installs it)"
        skip_or_fail(message)


def seed_from_env() -> int:
    given = os.environ.get("TORTURE_SEED", "")
    return int(given) if given else random.SystemRandom().randrange(10**9)


def narrator(path: Path) -> Any:
    def say(line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        print(stamped, flush=True)
        with path.open("a") as f:
            f.write(stamped + "\n")
    return say


def test_random_faults_lose_no_acknowledged_record(torture_lab: tuple[Any, Path], tmp_path: Path) -> None:
    require("fio", "fio")
    lab, mount = torture_lab
    seed = seed_from_env()
    rerun = f"make torture SEED={seed} CYCLES={CYCLES}"
    say = narrator(tmp_path / "torture.log")
    say(f"torture: seed {seed}, {CYCLES} cycles, faults: {', '.join(f.name for f in CATALOGUE)}")
    script = tmp_path / "app.sh"
    script.write_text(APP)
    script.chmod(0o755)
    acks = tmp_path / "acks"
    acks.mkdir()
    pair = Pair(lab, mount, script, say)
    torture = Torture(lab, pair, random.Random(seed), acks, say)
    started = time.monotonic()
    try:
        pair.start()
        for n in range(CYCLES):
            torture.cycle(n)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed} (rerun: {rerun}): {exc}") from None
    finally:
        report = torture.report(seed, time.monotonic() - started)
        say("report: " + json.dumps({k: v for k, v in report.items() if k != "log"}))
        if os.environ.get("TORTURE_REPORT"):
            Path(os.environ["TORTURE_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
    assert report["cycles"] == CYCLES and report["records_acknowledged"] > 0
