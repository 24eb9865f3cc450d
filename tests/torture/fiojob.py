"""fio as the second workload: blocks with CRC32C verify headers, written and fsync'd before a fault, verified after.

fio exits 0 only when every block was written and the file fsync'd
(``--end_fsync``): that exit is the acknowledgement. After the pair
recovered, ``--verify_only`` with the same job (same seed) reads every
block back on the current primary and checks its header and CRC32C;
``--verify_fatal`` makes any bad block a non-zero exit.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

SIZE = "4M"


def job(path: str, seed: int) -> list[str]:
    return ["fio", "--name=torture", f"--filename={path}", f"--size={SIZE}", "--bs=4k", "--rw=randwrite",
            "--ioengine=psync", "--direct=1", "--verify=crc32c", "--verify_state_save=0", f"--randseed={seed}",
            "--output-format=terse"]


@dataclass
class FioFile:
    path: str
    seed: int


def write(lab: Any, node: str, f: FioFile) -> tuple[bool, str]:
    """Write the file on ``node``; True once fio fsync'd it (acknowledged)."""
    done = lab.run(node, job(f.path, f.seed) + ["--do_verify=0", "--end_fsync=1"], timeout=120)
    return done.returncode == 0, done.stderr.strip()[-300:]


def verify(lab: Any, node: str, f: FioFile) -> tuple[bool, str]:
    """Read every block back on ``node`` and check it."""
    cmd = " ".join(shlex.quote(a) for a in job(f.path, f.seed) + ["--verify_only", "--verify_fatal=1"])
    done = lab.run(node, cmd + " 2>&1", timeout=120)
    bad = [line for line in done.stdout.splitlines() if "verify" in line or "err=" in line]
    return done.returncode == 0, "\n".join(bad)[-600:]


def remove(lab: Any, node: str, f: FioFile) -> None:
    lab.run(node, ["rm", "-f", f.path], timeout=60)
