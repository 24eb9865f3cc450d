"""Generation identifiers and online verify in the namespace lab (issue 5's acceptance tests 1, 2, 3, 5 and 6).

Every test writes to the raw mirrored device with writer.py, which prints
``ACK block n`` only after an O_DIRECT|O_DSYNC write returned: a printed line
is a write the application was told is safe.
"""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hactl import HA_ARGS, ha_log, in_sync, reset_pair, start_ha, status, stop_all, stop_ha, wait_status
from writer import BLOCK, block_bytes

pytestmark = pytest.mark.lab
WRITER = str(Path(__file__).with_name("writer.py"))
#: The same pair with the roles of the addresses swapped: a2 is the configured primary.
SWAPPED_ARGS = (HA_ARGS.replace("--primary-ip 198.18.0.11 --secondary-ip 198.18.0.12",
                                "--primary-ip 198.18.0.12 --secondary-ip 198.18.0.11")
                .replace("--primary-sync-ip 198.19.0.1 --secondary-sync-ip 198.19.0.2",
                         "--primary-sync-ip 198.19.0.2 --secondary-sync-ip 198.19.0.1"))


@pytest.fixture(scope="module")
def lab256(make_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with make_lab(tmp_path_factory.mktemp("resync"), "256M") as handle:
        yield handle


@pytest.fixture
def pair(lab256: Any) -> Iterator[Any]:
    yield lab256
    reset_pair(lab256)
    for node in ("a1", "a2"):
        (lab256.home(node) / "r0.bitmap").unlink(missing_ok=True)


def image(lab: Any, node: str) -> bytes:
    return (lab.home(node) / "disk.img").read_bytes()


def identical(lab: Any) -> bool:
    return filecmp.cmp(lab.home("a1") / "disk.img", lab.home("a2") / "disk.img", shallow=False)


def write_blocks(lab: Any, node: str, first: int, count: int, tag: str) -> None:
    lab.run(node, [sys.executable, WRITER, f"{lab.home(node)}/dev/r0", str(first), str(count), tag],
            check=True, timeout=120)


def holds(data: bytes, first: int, count: int, tag: str) -> bool:
    return all(data[b * BLOCK:(b + 1) * BLOCK] == block_bytes(tag, b, b - first) for b in range(first, first + count))


def resync_done(s: dict[str, Any]) -> bool:
    return in_sync(s) and bool(s["resync"].get("done"))


def test_returning_secondary_gets_only_the_dirty_bytes(pair: Any) -> None:
    """(1) lab crash a2; a1 writes 16 MiB at random offsets; a2 rejoins: only the dirty blocks are sent."""
    start_ha(pair, "a2")
    start_ha(pair, "a1")
    wait_status(pair, "a1", resync_done)
    pair.crash("a2")
    writer = pair.popen("a1", [sys.executable, WRITER, f"{pair.home('a1')}/dev/r0", "0", "65536", "away", "random"],
                        stdout=subprocess.DEVNULL)
    try:
        wait_status(pair, "a1", lambda s: s["replication"].get("dirty_blocks", 0) >= 4096, timeout=180)
    finally:
        writer.kill()
        writer.wait(timeout=10)
    s1 = status(pair, "a1")
    dirty = s1["replication"]["dirty_blocks"] * s1["replication"]["dirty_granularity"]
    assert s1["mode"] == "primary" and not s1["peer_connected"] and dirty >= 16 << 20
    pair.boot("a2")
    start_ha(pair, "a2")
    resync = wait_status(pair, "a1", resync_done, timeout=120)["resync"]
    print(f"dirty {dirty} bytes; resync {resync}")
    assert resync["kind"] == "bitmap", resync
    assert resync["dirty_bytes_at_start"] <= 1.05 * dirty, resync
    assert resync["bytes_sent"] <= 1.05 * resync["dirty_bytes_at_start"], resync
    assert resync["bytes_sent"] <= 1.05 * dirty, resync
    stop_all(pair)
    assert identical(pair)


def test_old_primary_rejoins_after_a_crash_under_a_writer(pair: Any) -> None:
    """(2) a1 crashes under a writer, a2 takes over and writes, a1 rejoins as secondary."""
    start_ha(pair, "a2")
    start_ha(pair, "a1")
    wait_status(pair, "a1", resync_done)
    writer = pair.popen("a1", [sys.executable, WRITER, f"{pair.home('a1')}/dev/r0", "0", "20000", "before-crash"],
                        stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    pair.crash("a1")
    out, _ = writer.communicate(timeout=30)
    acked = [tuple(map(int, line.split()[1:])) for line in out.splitlines() if line.startswith("ACK ")]
    assert len(acked) > 20, f"only {len(acked)} writes were acknowledged before the crash"
    wait_status(pair, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=60)
    write_blocks(pair, "a2", 30000, 500, "after-takeover")
    pair.boot("a1")
    start_ha(pair, "a1")
    wait_status(pair, "a1", lambda s: s["mode"] == "secondary" and s["disk"]["state"] == "UpToDate", timeout=120)
    resync = wait_status(pair, "a2", resync_done, timeout=120)["resync"]
    stop_all(pair)
    assert identical(pair), "a1 and a2 differ after a1 rejoined"
    data = image(pair, "a1")
    lost = [(b, n) for b, n in acked if data[b * BLOCK:(b + 1) * BLOCK] != block_bytes("before-crash", b, n)]
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:3]}"
    assert holds(data, 30000, 500, "after-takeover")
    # The new primary's bitmap since takeover plus the old primary's activity-log extents: no full sync.
    assert resync["kind"] == "bitmap", resync


def test_idle_old_primary_becomes_secondary_with_a_bitmap_resync(pair: Any) -> None:
    """After failOver the idle appliance rejoins with the new primary's changes only, never a full sync."""
    start_ha(pair, "a2")
    start_ha(pair, "a1")
    wait_status(pair, "a1", resync_done)
    done = pair.run("a1", "failOver", timeout=120)
    assert done.returncode == 0, done.stderr
    wait_status(pair, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=60)
    write_blocks(pair, "a2", 500, 64, "after-failover")
    assert status(pair, "a1")["mode"] == "idle"
    start_ha(pair, "a1")
    resync = wait_status(pair, "a2", resync_done, timeout=120)["resync"]
    assert resync["kind"] == "bitmap" and resync["bytes_sent"] <= 1.05 * 64 * BLOCK, resync
    stop_all(pair)
    assert identical(pair)


MiB = 1 << 20
#: The repair of REPAIR_MIB chunks at REPAIR_RATE MiB/s takes seconds: time to crash the primary inside it.
REPAIR_MIB, REPAIR_RATE = 96, 24


def flip_a_byte_per_chunk(lab: Any, node: str, chunks: range) -> None:
    """Bit rot behind mirrord's back: one byte changed in each of these 1 MiB chunks."""
    with open(lab.home(node) / "disk.img", "r+b") as f:
        for chunk in chunks:
            f.seek(chunk * MiB + 777)
            old = f.read(1)
            f.seek(chunk * MiB + 777)
            f.write(bytes([old[0] ^ 0xFF]))


def chunks_differing(lab: Any, chunks: range) -> int:
    one, two = image(lab, "a1"), image(lab, "a2")
    return sum(one[c * MiB:(c + 1) * MiB] != two[c * MiB:(c + 1) * MiB] for c in chunks)


def in_sync_with_a_slow_verify(lab: Any, chunks: range) -> None:
    """A pair in sync with an activity log on a1 (a crash is then recovered by bitmap), a resync
    rate that makes the verify and its repair take seconds, and ``chunks`` flipped on a2."""
    start_ha(lab, "a2")
    start_ha(lab, "a1")
    wait_status(lab, "a1", resync_done)
    write_blocks(lab, "a1", 0, 16, "before-verify")
    done = lab.run("a1", f"configureHA --resync-rate {REPAIR_RATE}", timeout=60)
    assert done.returncode == 0, done
    flip_a_byte_per_chunk(lab, "a2", chunks)


def crash_a1_and_restart_it(lab: Any, chunks: range) -> None:
    """a1 crashes with ``chunks`` still different: a2 must not take over, and a1's restart must
    resend them."""
    left = chunks_differing(lab, chunks)
    lab.crash("a1")
    assert 0 < left, "the repair finished before the crash: the test proves nothing"
    s2 = wait_status(lab, "a2", lambda s: s["mode"] in ("inconsistent", "primary"), timeout=30)
    assert s2["mode"] == "inconsistent" and s2["disk"]["state"] == "Inconsistent", s2
    assert "differ on this disk" in ha_log(lab, "a2")
    lab.boot("a1")
    start_ha(lab, "a1")
    resync = wait_status(lab, "a1", resync_done, timeout=120)["resync"]
    wait_status(lab, "a2", lambda s: s["mode"] == "secondary" and s["disk"]["state"] == "UpToDate", timeout=60)
    print(f"{left} of {len(chunks)} chunks differed before the crash; resync {resync}")
    assert resync["kind"] == "bitmap", resync
    assert "named by its activity log" in ha_log(lab, "a1")
    stop_all(lab)
    assert chunks_differing(lab, chunks) == 0
    assert identical(lab)


def test_a_crash_of_the_primary_during_the_verify_repair_neither_forgets_nor_promotes_the_differences(
        pair: Any) -> None:
    """Decision 42: the differences verify found are in the bitmap file before the repair starts,
    and the secondary holding them is Inconsistent until it ends, so a crash of the primary inside
    the repair leaves no takeover with the wrong blocks and a restart resends them."""
    chunks = range(64, 64 + REPAIR_MIB)
    in_sync_with_a_slow_verify(pair, chunks)
    done = pair.run("a1", "mirrord verify", timeout=120)
    assert done.returncode == 0 and f"{REPAIR_MIB * MiB} bytes differed" in done.stdout, done
    crash_a1_and_restart_it(pair, chunks)


def test_a_crash_of_the_primary_during_the_verify_pass_neither_forgets_nor_promotes_what_it_found(
        pair: Any) -> None:
    """Decision 42: a pass can take hours, so from its first difference on the secondary is
    Inconsistent and the bitmap file holds what was found (at most a second behind)."""
    chunks = range(8, 16)  # found in the pass's first second; the pass takes about ten
    in_sync_with_a_slow_verify(pair, chunks)
    verify = pair.popen("a1", "mirrord verify", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_status(pair, "a2", lambda s: s["disk"]["state"] == "Inconsistent", timeout=30)
    time.sleep(2.5)  # past the next save of what the pass found
    assert verify.poll() is None, "the verify ended before the crash: the test proves nothing"
    crash_a1_and_restart_it(pair, chunks)
    verify.wait(timeout=30)


def test_a_copy_a_verify_found_different_serves_only_when_forced_after_the_primary_is_lost(
        pair: Any) -> None:
    """Decision 48: a1 is lost for good during the verify pass. a2's copy is whole but for the
    chunks found different: startHA naming a2 primary refuses, and --force serves it, those
    chunks as they are (a half-copied disk would be refused even then)."""
    chunks = range(8, 16)
    in_sync_with_a_slow_verify(pair, chunks)
    verify = pair.popen("a1", "mirrord verify", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_status(pair, "a2", lambda s: s["disk"]["state"] == "Inconsistent", timeout=30)
    pair.crash("a1")
    verify.wait(timeout=30)
    wait_status(pair, "a2", lambda s: s["mode"] == "inconsistent", timeout=30)
    stop_ha(pair, "a2")
    a2_as_primary = HA_ARGS.replace("198.18.0.11 --secondary-ip 198.18.0.12", "198.18.0.12 --secondary-ip 198.18.0.11") \
        .replace("198.19.0.1 --secondary-sync-ip 198.19.0.2", "198.19.0.2 --secondary-sync-ip 198.19.0.1")
    assert a2_as_primary != HA_ARGS
    refused = pair.run("a2", f"startHA {a2_as_primary}", timeout=120)
    assert refused.returncode == 3 and "online verify found blocks" in refused.stdout + refused.stderr, refused
    before = image(pair, "a2")
    forced = pair.run("a2", f"startHA {a2_as_primary} --force", timeout=120)
    assert forced.returncode == 0, f"{forced.stdout}{forced.stderr}"
    s2 = wait_status(pair, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=60)
    assert s2["disk"]["state"] == "UpToDate", s2
    assert "served as they are" in ha_log(pair, "a2")
    stop_ha(pair, "a2")
    assert image(pair, "a2") == before  # served as it was: nothing repaired it, nothing lost


def test_split_brain_is_refused_then_resolved_on_the_victim(pair: Any) -> None:
    """(3) both appliances primary during a partition, each written; heal; refuse; resolve on a1."""
    start_ha(pair, "a2")
    start_ha(pair, "a1")
    wait_status(pair, "a1", resync_done)
    pair.cut("a1", "all")
    wait_status(pair, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=60)
    wait_status(pair, "a1", lambda s: s["mode"] == "primary" and s["serving"], timeout=60)  # continued alone
    write_blocks(pair, "a1", 0, 100, "a1-alone")
    write_blocks(pair, "a2", 100, 200, "a2-alone")
    pair.heal("a1", "all")
    # The older term steps down (it stops serving) and says why; nothing is synced. a2 may or may
    # not have heard a1 as primary before a1 stepped down (whoever compares the heartbeats first),
    # so a2 says so at the latest when the handshake refuses, below.
    s1 = wait_status(pair, "a1", lambda s: s["mode"] == "standalone" and bool(s["split_brain"]), timeout=60)
    assert s1["split_brain"].startswith("Split brain:") and "startHA --discard-my-data" in s1["split_brain"]
    assert status(pair, "a2")["mode"] == "primary" and "Split brain:" in ha_log(pair, "a1")
    # The operator restarts a1 as usual: the handshake refuses on both sides, both copies stay.
    start_ha(pair, "a1")
    wait_status(pair, "a1", lambda s: s["peer_error"].startswith("Split brain:"), timeout=60)
    s2 = wait_status(pair, "a2", lambda s: s["peer_error"].startswith("Split brain:"), timeout=60)
    assert s2["mode"] == "primary" and s2["split_brain"].startswith("Split brain:"), s2
    assert "startHA --discard-my-data" in s2["split_brain"] and "Split brain:" in ha_log(pair, "a2")
    a1_data = image(pair, "a1")
    assert holds(a1_data, 0, 100, "a1-alone") and not holds(a1_data, 100, 200, "a2-alone")
    assert holds(image(pair, "a2"), 100, 200, "a2-alone") and not holds(image(pair, "a2"), 0, 100, "a1-alone")
    assert status(pair, "a1")["disk"]["sync_percent"] < 100 or not status(pair, "a1")["peer_connected"]
    # Resolution: a1's changes are discarded after a copy of its disk is saved.
    stop_ha(pair, "a1")
    done = start_ha(pair, "a1", "--discard-my-data")
    saved = Path(re.search(r"saved to (\S+\.img)", done.stdout).group(1))  # type: ignore[union-attr]
    assert saved.parent == pair.home("a1") / "splitbrain" and saved.name.startswith("r0-")
    assert str(saved) in ha_log(pair, "a1")
    assert saved.read_bytes() == a1_data
    resync = wait_status(pair, "a2", resync_done, timeout=120)["resync"]
    wait_status(pair, "a1", lambda s: s["mode"] == "secondary" and s["disk"]["state"] == "UpToDate"
                and s["split_brain"] is None, timeout=60)
    assert resync["kind"] == "bitmap" and resync["extra_bytes"] >= 100 * BLOCK, resync
    assert status(pair, "a2")["split_brain"] is None
    stop_all(pair)
    assert identical(pair)
    assert holds(image(pair, "a1"), 100, 200, "a2-alone") and not holds(image(pair, "a1"), 0, 100, "a1-alone")


def test_discard_my_data_without_a_split_brain_is_refused(pair: Any) -> None:
    before = image(pair, "a2")
    done = start_ha(pair, "a2", "--discard-my-data", check=False)
    assert done.returncode == 3 and "no split brain to resolve" in done.stderr, done.stderr
    assert status(pair, "a2")["mode"] == "standalone"
    assert not (pair.home("a2") / "splitbrain").exists() and image(pair, "a2") == before


def test_unrelated_disks_are_refused(pair: Any) -> None:
    """(6) each appliance used on its own as primary, then paired: refused, both disks intact."""
    start_ha(pair, "a1")
    write_blocks(pair, "a1", 0, 10, "a1-own")
    stop_ha(pair, "a1")
    done = pair.run("a2", f"startHA {SWAPPED_ARGS}", timeout=120)
    assert done.returncode == 0 and "is the primary" in done.stdout, done.stderr
    write_blocks(pair, "a2", 0, 10, "a2-own")
    stop_ha(pair, "a2")
    start_ha(pair, "a2")
    start_ha(pair, "a1")
    for node in ("a1", "a2"):
        s = wait_status(pair, node, lambda s: (s["peer_error"] or "").startswith("Unrelated data:"), timeout=60)
        assert "startHA --discard-my-data" in s["split_brain"]
    assert "Unrelated data:" in ha_log(pair, "a1") and "Unrelated data:" in ha_log(pair, "a2")
    assert not status(pair, "a2")["peer_connected"]
    assert holds(image(pair, "a1"), 0, 10, "a1-own") and holds(image(pair, "a2"), 0, 10, "a2-own")


def test_verify_finds_a_byte_flipped_on_the_secondary_and_the_resync_repairs_it(pair: Any) -> None:
    """(5) mirrord verify while serving: a byte changed behind mirrord's back is found and resent."""
    start_ha(pair, "a2")
    start_ha(pair, "a1")
    wait_status(pair, "a1", resync_done)
    write_blocks(pair, "a1", 100, 200, "verified")
    assert identical(pair)
    done = pair.run("a2", "mirrord verify", timeout=60)
    assert done.returncode == 3 and "run mirrord verify on the primary" in done.stdout + done.stderr, done
    done = pair.run("a1", "mirrord verify", timeout=120)
    assert done.returncode == 0 and "identical" in done.stdout, done
    where = 150 * BLOCK + 1234
    with open(pair.home("a2") / "disk.img", "r+b") as f:  # bit rot on the secondary's disk
        f.seek(where)
        old = f.read(1)
        f.seek(where)
        f.write(bytes([old[0] ^ 0xFF]))
    assert not identical(pair)
    done = pair.run("a1", "mirrord verify", timeout=120)
    assert done.returncode == 0 and "1048576 bytes differed" in done.stdout, done
    wait_status(pair, "a1", lambda s: in_sync(s) and s["replication"]["dirty_blocks"] == 0)
    stop_all(pair)
    assert identical(pair)
    assert "differed there; they are marked out of sync and being resent" in ha_log(pair, "a1")
