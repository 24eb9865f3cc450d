"""Eight volumes on one pair (issue 7): mirrored, failed over together, and reconnected together."""

from __future__ import annotations

import random
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hactl import HA_ARGS, ha_log, in_sync, reset_pair, stop_ha, wait_status
from mirrord import config
from writer import BLOCK, block_bytes

pytestmark = pytest.mark.lab

WRITER = str(Path(__file__).with_name("writer.py"))
VOLUMES = config.MAX_VOLUMES
EXTRA_SIZE = "24M"  # volumes r1..r7; r0 is the lab's own disk.img


@pytest.fixture(scope="module")
def lab8(make_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with make_lab(tmp_path_factory.mktemp("volumes"), "64M") as handle:
        yield handle


@pytest.fixture
def pair(lab8: Any) -> Iterator[Any]:
    """Both appliances with eight disks and eight empty mount points; standalone again afterwards."""
    for node in ("a1", "a2"):
        lab8.run(node, f"for i in $(seq 1 {VOLUMES - 1}); do rm -f $MIRRORD_HOME/v$i.img; "
                       f"truncate -s {EXTRA_SIZE} $MIRRORD_HOME/v$i.img; done; "
                       f"for i in $(seq 0 {VOLUMES - 1}); do mkdir -p $MIRRORD_HOME/m$i; done", check=True)
    yield lab8
    reset_pair(lab8)


def disks(n: int = VOLUMES) -> list[str]:
    return ["$MIRRORD_HOME/disk.img"] + [f"$MIRRORD_HOME/v{i}.img" for i in range(1, n)]


def volume_args(n: int = VOLUMES) -> str:
    """HA_ARGS names disk.img; the other disks and every mount point follow in order."""
    extra = " ".join(f"--disk {d}" for d in disks(n)[1:])
    mounts = " ".join(f"--mount $MIRRORD_HOME/m{i}" for i in range(n))
    return f"{extra} {mounts}"


def start(lab: Any, node: str, extra: str = "") -> None:
    done = lab.run(node, f"startHA {HA_ARGS} {volume_args()} {extra}", timeout=180)
    assert done.returncode == 0, f"startHA on {node} exited {done.returncode}: {done.stdout}{done.stderr}"


def first_acks(writer: subprocess.Popen[str], n: int, timeout: float) -> list[str]:
    """Read writer.py's output until it has acknowledged n writes; the lines read. Fails if
    that takes longer than timeout seconds (the volume is stalled) or the writer ends first."""
    assert writer.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while sum(line.startswith("ACK ") for line in lines) < n:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"fewer than {n} writes acknowledged in {timeout:g} s: {lines[-3:]}"
        ready, _, _ = select.select([writer.stdout], [], [], remaining)
        line = writer.stdout.readline() if ready else ""
        assert line or not ready, f"the writer ended after {len(lines)} lines"
        if line:
            lines.append(line.rstrip("\n"))
    return lines


def image(lab: Any, node: str, index: int) -> Path:
    return lab.home(node) / ("disk.img" if index == 0 else f"v{index}.img")


def all_in_sync(s: dict[str, Any]) -> bool:
    vols = s.get("volumes") or []
    return in_sync(s) and len(vols) == VOLUMES and all(v["peer_connected"] and v["sync_percent"] >= 100 for v in vols)


def mounted(lab: Any, node: str) -> list[str]:
    home = str(lab.home(node))
    lines = lab.run(node, "cat /proc/mounts", check=True).stdout.splitlines()
    return sorted(f.split()[1] for f in lines if f.split()[1].startswith(f"{home}/m") and f.split()[2] == "ext4")


def test_eight_volumes_are_mirrored_and_fail_over_together(pair: Any) -> None:
    start(pair, "a2")
    start(pair, "a1", "--mkfs ext4")
    s1 = wait_status(pair, "a1", all_in_sync, timeout=120)
    assert [v["name"] for v in s1["volumes"]] == ["r0"] + [f"r{i}" for i in range(1, VOLUMES)]
    # The mode follows the disks' UpToDate at the supervisor's next tick: wait for both.
    wait_status(pair, "a2", lambda s: s["mode"] == "secondary" and s["disk"]["state"] == "UpToDate"
                and len(s["volumes"]) == VOLUMES and all(v["state"] == "UpToDate" for v in s["volumes"]))
    assert len(mounted(pair, "a1")) == VOLUMES and not mounted(pair, "a2")

    # One file per filesystem, then O_DSYNC writers on three of them until a1 dies.
    for i in range(VOLUMES):
        pair.run("a1", f"head -c 1M /dev/urandom > $MIRRORD_HOME/m{i}/data && sync", check=True)
    kept = {i: (pair.home("a1") / f"m{i}-copy") for i in range(VOLUMES)}
    for i, copy in kept.items():
        pair.run("a1", f"cp $MIRRORD_HOME/m{i}/data {copy}", check=True)
    tag = f"vol-{random.randrange(1 << 30)}"
    writers = {i: pair.popen("a1", [sys.executable, WRITER, f"{pair.home('a1')}/m{i}/records", "0", "2000",
                                    f"{tag}-{i}"], stdout=subprocess.PIPE, text=True)
               for i in (0, 3, VOLUMES - 1)}
    # Crash once every writer has had writes acknowledged (not after a fixed sleep: three Python
    # processes starting on two busy cores may take longer than it), at a random moment after.
    early = {i: first_acks(writer, 6, timeout=30) for i, writer in writers.items()}
    time.sleep(random.uniform(0.0, 0.5))
    pair.crash("a1")
    acked: dict[int, list[tuple[int, int]]] = {}
    for i, writer in writers.items():
        out, _ = writer.communicate(timeout=30)
        acked[i] = [tuple(map(int, line.split()[1:])) for line in early[i] + out.splitlines()
                    if line.startswith("ACK ")]

    s2 = wait_status(pair, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=60)
    assert len(s2["volumes"]) == VOLUMES
    assert len(mounted(pair, "a2")) == VOLUMES
    for i, copy in kept.items():
        got = pair.home("a2") / f"m{i}-data"
        pair.run("a2", f"cp $MIRRORD_HOME/m{i}/data {got}", check=True)
        assert got.read_bytes() == copy.read_bytes(), f"volume r{i}: the file differs after the takeover"
    for i, records in acked.items():
        got = pair.home("a2") / f"m{i}-records"
        pair.run("a2", f"cp $MIRRORD_HOME/m{i}/records {got}", check=True)
        data = got.read_bytes()
        missing = [(b, n) for b, n in records if data[b * BLOCK:(b + 1) * BLOCK] != block_bytes(f"{tag}-{i}", b, n)]
        assert not missing, f"volume r{i}: {len(missing)} of {len(records)} acknowledged writes missing on a2"
    assert "Now primary (takeover)" in ha_log(pair, "a2")


def test_losing_one_volumes_link_reconnects_all_and_they_end_up_in_sync(pair: Any) -> None:
    start(pair, "a2")
    start(pair, "a1", "--mkfs ext4")
    wait_status(pair, "a1", all_in_sync, timeout=120)
    pair.run("a1", "mirrord debug corrupt-next 1", check=True)  # breaks volume r0's link only
    pair.run("a1", "head -c 64K /dev/urandom > $MIRRORD_HOME/m0/after && sync", check=True)
    assert pair.wait_for(lambda: "dropped the links of" in ha_log(pair, "a1"), timeout=30), \
        "the corrupt frame never dropped the links"
    s1 = wait_status(pair, "a1", all_in_sync, timeout=120)
    assert s1["mode"] == "primary"
    # No volume is left Outdated on the secondary: every one reconnected and resynced.
    wait_status(pair, "a2", lambda s: s["disk"]["state"] == "UpToDate"
                and all(v["state"] == "UpToDate" and v["peer_connected"] for v in s["volumes"]), timeout=60)
    stop_ha(pair, "a1")
    for i in range(VOLUMES):
        assert image(pair, "a1", i).read_bytes() == image(pair, "a2", i).read_bytes(), f"volume r{i} differs"


def test_bad_volume_options_change_nothing(pair: Any) -> None:
    mismatch = pair.run("a1", f"startHA {HA_ARGS} --disk $MIRRORD_HOME/v1.img --mount $MIRRORD_HOME/m0", timeout=60)
    assert mismatch.returncode == 2, mismatch.stdout + mismatch.stderr
    assert "--mount is given 1 times for 2 disks" in mismatch.stdout + mismatch.stderr
    same = pair.run("a1", f"startHA {HA_ARGS} --disk $MIRRORD_HOME/disk.img", timeout=60)
    assert same.returncode == 2 and "is given twice" in same.stdout + same.stderr
    assert not (pair.home("a1") / "ha.json").exists()


def test_a_peer_with_another_number_of_volumes_is_reported(pair: Any) -> None:
    done = pair.run("a2", f"startHA {HA_ARGS} --disk $MIRRORD_HOME/v1.img", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    done = pair.run("a1", f"startHA {HA_ARGS}", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert pair.wait_for(lambda: "volumes here 1 / peer 2" in ha_log(pair, "a1"), timeout=30), ha_log(pair, "a1")
    # Each side logs the mismatch when its own supervisor compares the peer's heartbeat: not at the same tick.
    assert pair.wait_for(lambda: "volumes here 2 / peer 1" in ha_log(pair, "a2"), timeout=30), ha_log(pair, "a2")


def test_failover_moves_every_volume_and_the_old_primary_rejoins(pair: Any) -> None:
    start(pair, "a2")
    start(pair, "a1", "--mkfs ext4")
    wait_status(pair, "a1", all_in_sync, timeout=120)
    for i in range(VOLUMES):
        pair.run("a1", f"echo volume-{i} > $MIRRORD_HOME/m{i}/name && sync", check=True)
    done = pair.run("a1", "failOver", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    s2 = wait_status(pair, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=60)
    assert len(s2["volumes"]) == VOLUMES and len(mounted(pair, "a2")) == VOLUMES and not mounted(pair, "a1")
    for i in range(VOLUMES):
        assert pair.run("a2", f"cat $MIRRORD_HOME/m{i}/name", check=True).stdout.strip() == f"volume-{i}"
    before = len(ha_log(pair, "a2"))
    start(pair, "a1")  # the idle old primary becomes the secondary of every volume
    wait_status(pair, "a2", all_in_sync, timeout=120)
    s1 = wait_status(pair, "a1", lambda s: s["mode"] == "secondary"
                     and all(v["state"] == "UpToDate" for v in s["volumes"]), timeout=60)
    assert s1["disk"]["state"] == "UpToDate"
    rejoined = ha_log(pair, "a2")[before:]
    assert rejoined.count("bitmap resync of") == VOLUMES, f"every volume rejoins with a bitmap resync:\n{rejoined}"
