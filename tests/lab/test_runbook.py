"""The runbook's walkthrough (docs/operations.md, section 0) runs as written: from nothing to a
failed-over pair and back. Only `make setup` (done by the test set-up) and `lab up`/`lab down`
(this test's own lab, under a unique name) are left to the fixture."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.lab

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def walkthrough() -> list[str]:
    section = RUNBOOK.read_text().split("## 0. ", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    return [line for line in block.splitlines()[1:] if line.strip()]


def test_the_walkthrough_block_is_there() -> None:
    lines = walkthrough()
    assert lines[0].startswith("make setup") and lines[-1] == "mirrord lab down"
    assert sum("failOver" in line for line in lines) == 2


def test_the_walkthrough_runs_as_written(make_lab: Any, tmp_path: Path) -> None:
    with make_lab(tmp_path, "64M") as lab:
        script = []
        for line in walkthrough():
            if re.match(r"(make setup|mirrord lab (up|down))\b", line):
                continue
            script.append(line.replace("mirrord lab exec ", f"mirrord lab exec --name {lab.name} "))
        env = {**lab.env, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
        done = subprocess.run(["bash", "-e", "-c", "\n".join(script)], cwd=RUNBOOK.parents[1], env=env,
                              capture_output=True, text=True, timeout=600)
        try:
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert "\nhello\n" in done.stdout, "the file written before the failOver is on the new primary"
            assert done.stdout.count("failOver: this appliance is idle") == 2
            final = done.stdout.rsplit("r0 mode:", 1)[1]
            assert final.startswith("primary role:Primary") and "replication:Established" in final, final
        finally:
            lab.run("a1", "stopHA >/dev/null 2>&1; mirrord shutdown >/dev/null 2>&1; true", timeout=120)
            lab.run("a2", "stopHA >/dev/null 2>&1; mirrord shutdown >/dev/null 2>&1; true", timeout=120)
