"""PostgreSQL 15 on the mirrored ext4 survives crashes of the primary, in both directions (issue 6).

mirrord's start/stop scripts run PostgreSQL on whichever appliance is
primary, listening on the floating IP. A client in the client namespace
commits one transaction after another and records each commit it was told
about; the primary is crashed; after the takeover every recorded commit is
in the table. ``TORTURE_PG_FAILOVERS`` crashes in a row (default 2: a1 then
a2), each time the crashed appliance rejoins as the secondary.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import pgapp
from pair import Pair, PairError, other
from under_ci import skip_or_fail

pytestmark = pytest.mark.lab

FAILOVERS = int(os.environ.get("TORTURE_PG_FAILOVERS", "2"))
CLIENT_BOUND = 600.0   # seconds a client may run at most


def require_postgres() -> None:
    missing = pgapp.installed()
    if missing:
        message = f"{missing} is missing; `make test` installs it"
        skip_or_fail(message)


def wait_until(predicate: Any, bound: float, what: str, logs: Any) -> None:
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            raise PairError(f"{what} not within {bound:g} s\n{logs()}")
        time.sleep(0.3)


def test_every_committed_transaction_survives_crashes_of_the_primary(torture_lab: tuple[Any, Path],
                                                                      tmp_path: Path) -> None:
    require_postgres()
    lab, mount = torture_lab
    script = tmp_path / "pg.sh"
    script.write_text(pgapp.APP)
    script.chmod(0o755)
    pair = Pair(lab, mount, script)
    pair.start()
    wait_until(lambda: pgapp.psql(lab, pgapp.SCHEMA).returncode == 0, 120,
               "PostgreSQL answering on the floating IP", pair.logs)
    rng = random.Random(os.environ.get("TORTURE_SEED", "postgres"))
    recorded: dict[int, str] = {}
    primary = "a1"
    crashed: list[str] = []
    for round_ in range(FAILOVERS):
        out_path = tmp_path / f"client{round_}.out"
        with out_path.open("w") as out:
            client = lab.popen("client", [sys.executable, "-c", pgapp.CLIENT, str(CLIENT_BOUND), f"r{round_}"],
                               stdout=out)
        wait_until(lambda: len(pgapp.committed(out_path.read_text())) >= 20, 60, "20 commits", pair.logs)
        time.sleep(rng.uniform(0.0, 2.0))
        before = len(pgapp.committed(out_path.read_text()))
        lab.crash(primary)
        crashed.append(primary)
        # The client goes on through the floating IP: commits resume on the survivor.
        wait_until(lambda: len(pgapp.committed(out_path.read_text())) >= before + 20, 120,
                   f"commits on {other(primary)} after the crash of {primary}", pair.logs)
        client.kill()
        client.wait(timeout=30)
        mine = pgapp.committed(out_path.read_text())
        assert not set(mine) & set(recorded), "a transaction id was reported committed twice"
        recorded.update(mine)
        table = pgapp.table(lab)
        lost = {i: t for i, t in recorded.items() if table.get(i) != t}
        print(f"round {round_}: crashed {primary}; {len(recorded)} commits recorded, {len(lost)} lost, "
              f"{len(table)} rows")
        assert not lost, f"committed transactions lost after the crash of {primary}: {sorted(lost.items())[:10]}"
        survivor = pair.recover()  # the crashed appliance rejoins as the secondary
        assert survivor == other(primary), f"{primary} crashed, yet {survivor} is the primary after recovery"
        primary = survivor
    assert FAILOVERS < 2 or set(crashed) == {"a1", "a2"}, crashed
