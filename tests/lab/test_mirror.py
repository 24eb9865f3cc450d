"""Synchronous mirroring in the namespace lab (issue 3's acceptance tests)."""

from __future__ import annotations

import filecmp
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hactl import (ha_log, in_sync, reset_pair, start_ha, start_primary_with_fs, status, stop_all, stop_ha,
                   sync_link_congestion_control, wait_status)
from mirrord.paths import Home
from mirrord.replication.generations import Generations
from mirrord.replication.link import PROTOCOL_VERSION
from mirrord.replication.meta import DiskState, VolumeMeta
from writer import BLOCK, block_bytes

WRITER = str(Path(__file__).with_name("writer.py"))
DEVICE = "$MIRRORD_HOME/dev/r0"

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab256(make_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with make_lab(tmp_path_factory.mktemp("mirror"), "256M") as handle:
        yield handle


@pytest.fixture
def pair(lab256: Any) -> Iterator[Any]:
    """The lab, left with both appliances standalone and powered after the test."""
    yield lab256
    reset_pair(lab256)


def images_identical(lab: Any) -> bool:
    return filecmp.cmp(lab.home("a1") / "disk.img", lab.home("a2") / "disk.img", shallow=False)


def first_difference(lab: Any) -> str:
    a = (lab.home("a1") / "disk.img").read_bytes()
    b = (lab.home("a2") / "disk.img").read_bytes()
    for off in range(0, len(a), BLOCK):
        if a[off:off + BLOCK] != b[off:off + BLOCK]:
            return f"first differing block at offset {off}"
    return "no difference"


def test_filesystem_writes_are_on_both_disks(pair: Any) -> None:
    start_ha(pair, "a2")
    start_primary_with_fs(pair)
    wait_status(pair, "a1", in_sync)
    # The data connection runs cubic (reno without it) at both ends whatever
    # the system default (docs/decisions.md 31); the control connection
    # keeps the default.
    want = sync_link_congestion_control()
    for node, side in (("a1", "dport"), ("a2", "sport")):
        out = pair.run(node, f"ss -tinH state established '( {side} = :7788 )'", check=True).stdout
        assert out.split().count(want) >= 1, out
    pair.run("a1", "for i in $(seq 1 16); do head -c 4M /dev/urandom > $MIRRORD_HOME/mnt/f$i; done; sync",
             check=True, timeout=180)
    s2 = status(pair, "a2")
    assert s2["mode"] == "secondary" and s2["disk"]["state"] == "UpToDate"
    stop_ha(pair, "a1")
    assert images_identical(pair), first_difference(pair)
    assert "mounted" not in pair.run("a1", "grep -c $MIRRORD_HOME/mnt /proc/mounts || true").stdout
    log = ha_log(pair, "a1")
    assert "Created an ext4 filesystem" in log and "Unmounted" in log


@pytest.mark.parametrize("round_", range(5))
def test_acknowledged_writes_survive_primary_crash(pair: Any, round_: int) -> None:
    start_ha(pair, "a2")
    start_ha(pair, "a1")
    wait_status(pair, "a1", in_sync)
    tag = f"r{round_}-{random.randrange(1 << 30)}"
    writer = pair.popen("a1", [sys.executable, WRITER, f"{pair.home('a1')}/dev/r0", "0", "60000", tag],
                        stdout=subprocess.PIPE, text=True)
    time.sleep(random.uniform(0.3, 2.0))
    pair.crash("a1")
    out, _ = writer.communicate(timeout=30)
    acked = [tuple(map(int, line.split()[1:])) for line in out.splitlines() if line.startswith("ACK ")]
    assert len(acked) > 20, f"the writer acknowledged only {len(acked)} writes before the crash"
    image = (pair.home("a2") / "disk.img").read_bytes()
    missing = [(b, n) for b, n in acked if image[b * BLOCK:(b + 1) * BLOCK] != block_bytes(tag, b, n)]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged writes missing on a2, e.g. {missing[:3]}"


def test_initial_sync_under_a_running_writer(pair: Any) -> None:
    start_ha(pair, "a1")
    writer = pair.popen("a1", [sys.executable, WRITER, f"{pair.home('a1')}/dev/r0", "0", "65536", "sync-race",
                               "random"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        start_ha(pair, "a2")
        wait_status(pair, "a2", lambda s: s["disk"]["state"] == "UpToDate" and s["disk"]["sync_percent"] >= 100)
        time.sleep(0.5)
        assert writer.poll() is None, f"the writer exited {writer.returncode} before the sync finished"
    finally:
        writer.kill()
        writer.wait(timeout=10)
    assert status(pair, "a1")["peer_connected"]
    assert images_identical(pair), first_difference(pair)


def test_secondary_with_smaller_disk_is_refused(pair: Any) -> None:
    pair.run("a2", "truncate -s 128M $MIRRORD_HOME/disk.img", check=True)
    try:
        before = (pair.home("a2") / "disk.img").read_bytes()
        start_ha(pair, "a2")
        start_ha(pair, "a1")
        s1 = wait_status(pair, "a1", lambda s: "smaller" in s.get("peer_error", ""), timeout=20)
        assert not s1["peer_connected"]
        assert "is smaller than the primary's" in ha_log(pair, "a2")
        assert status(pair, "a2")["disk"]["state"] == "UpToDate"
        assert (pair.home("a2") / "disk.img").read_bytes() == before
    finally:
        stop_all(pair)
        pair.run("a2", "truncate -s 256M $MIRRORD_HOME/disk.img", check=True)


HELLO_V99 = r"""
import json, socket, struct, sys
s = socket.create_connection(("198.19.0.2", 7788), 5, source_address=("198.19.0.1", 0))
body = json.dumps({"type": "hello", "protocol": 99, "version": "9.9", "node": "x", "role": "primary",
                   "volume": "r0", "disk_size": 4096 * 256, "settings": {}}).encode()
s.sendall(struct.pack(">I", len(body)) + body)
n, = struct.unpack(">I", s.recv(4))
print(json.loads(s.recv(n)))
"""


def test_protocol_version_mismatch_is_refused(pair: Any) -> None:
    start_ha(pair, "a2")
    done = pair.run("a1", [sys.executable, "-c", HELLO_V99], check=True)
    assert "'type': 'refuse'" in done.stdout and "Protocol version mismatch" in done.stdout
    assert f"the peer speaks 99, this appliance speaks {PROTOCOL_VERSION}" in ha_log(pair, "a2")


def test_disk_in_use_is_refused(pair: Any) -> None:
    holder = pair.popen("a2", "exec 3<>$MIRRORD_HOME/disk.img; exec sleep 60")
    try:
        assert pair.wait_for(lambda: "disk.img" in pair.run("a2", f"ls -l /proc/{holder.pid}/fd").stdout,
                             timeout=10), "the holder never opened disk.img"
        done = start_ha(pair, "a2", check=False)
        assert done.returncode == 3, done.stderr
        assert "is in use by process" in done.stderr
        assert not (pair.home("a2") / "ha.json").exists() or "secondary" not in status(pair, "a2")["mode"]
    finally:
        holder.kill()
        holder.wait()


def test_corrupt_frame_is_dropped_and_link_recovers(pair: Any) -> None:
    start_ha(pair, "a2")
    start_ha(pair, "a1")
    wait_status(pair, "a1", in_sync)
    done = pair.run("a1", "mirrord debug corrupt-next 1", check=True)
    assert "next 1 frame" in done.stdout
    good = block_bytes("corrupt-test", 100, 0)
    pair.run("a1", [sys.executable, WRITER, f"{pair.home('a1')}/dev/r0", "100", "1", "corrupt-test"], check=True)
    wait_status(pair, "a1", in_sync, timeout=60)
    assert "CRC" in ha_log(pair, "a2") or "crc" in ha_log(pair, "a2")
    image = (pair.home("a2") / "disk.img").read_bytes()
    assert image[100 * BLOCK:101 * BLOCK] == good
    stop_ha(pair, "a1")
    assert images_identical(pair), first_difference(pair)


def test_returning_secondary_gets_only_what_changed(pair: Any) -> None:
    start_ha(pair, "a2")
    start_ha(pair, "a1")
    wait_status(pair, "a1", in_sync)
    pair.crash("a2")
    # 4 MiB of 4 KiB writes at random offsets while the secondary is away.
    writer = pair.popen("a1", [sys.executable, WRITER, f"{pair.home('a1')}/dev/r0", "0", "65536", "away", "random"],
                        stdout=subprocess.PIPE, text=True)
    try:
        wait_status(pair, "a1", lambda s: s["replication"].get("dirty_blocks", 0) >= 1024, timeout=60)
    finally:
        writer.kill()
        writer.wait(timeout=10)
    s1 = status(pair, "a1")
    dirty = s1["replication"]["dirty_blocks"] * s1["replication"]["dirty_granularity"]
    assert s1["mode"] == "primary" and not s1["peer_connected"]
    pair.boot("a2")
    start_ha(pair, "a2")
    s1 = wait_status(pair, "a1", in_sync, timeout=60)
    sent = s1["replication"]["bytes_synced"]
    print(f"dirty {dirty} bytes, resync sent {sent} bytes")
    assert sent <= 1.05 * dirty, f"the resync sent {sent} bytes for {dirty} dirty bytes"
    assert "bitmap resync" in ha_log(pair, "a1")
    assert images_identical(pair), first_difference(pair)


def test_a_secondary_lost_before_it_saved_the_end_of_a_sync_is_synced_whole(pair: Any) -> None:
    """The secondary crashes after the primary saved a finished sync and before the secondary saved
    its sync_done (decision 44): it comes back at the sync identifier, the primary has written alone
    since, and a checksum sync (r80) must bring every block, also those written during it."""
    start_ha(pair, "a2")
    start_ha(pair, "a1")
    wait_status(pair, "a1", in_sync)
    pair.crash("a2")
    a1_gen = VolumeMeta.load(Home(pair.home("a1")), "r0").gen
    assert a1_gen.history, a1_gen  # the initial sync's identifier
    # a2's metadata as it was before it saved the sync_done: at the sync identifier, Inconsistent.
    VolumeMeta.load(Home(pair.home("a2")), "r0").update(
        Home(pair.home("a2")), "r0", gen=Generations(current=a1_gen.history[0]), disk_state=DiskState.INCONSISTENT)
    pair.run("a1", [sys.executable, WRITER, f"{pair.home('a1')}/dev/r0", "1000", "2048", "alone"], check=True)
    writer = pair.popen("a1", [sys.executable, WRITER, f"{pair.home('a1')}/dev/r0", "0", "65536", "during", "random"],
                        stdout=subprocess.PIPE, text=True)
    try:
        pair.boot("a2")
        start_ha(pair, "a2")
        wait_status(pair, "a1", in_sync, timeout=120)
    finally:
        writer.kill()
        writer.wait(timeout=10)
    log = ha_log(pair, "a1")
    resync = status(pair, "a1")["resync"]
    assert (resync["kind"], resync["rule"]) == ("checksum", "r80"), (resync, log)
    stop_ha(pair, "a1")
    assert images_identical(pair), first_difference(pair)


def test_frames_a_frozen_secondary_still_holds_never_land_over_the_resync(pair: Any, tmp_path: Path) -> None:
    """a2 freezes while a1 writes A: a2's socket keeps the frames of A that a1 had sent, a1 gives up
    on a2 and writes B over the same blocks alone. When a2 thaws, a1 reconnects and resyncs B; the
    old session's frames of A must not land after that (decision 47: the old receiver is stopped
    and joined before the new session is agreed). The writes are 128 KiB, copied into the socket
    (larger ones are spliced, and a1 reuses their pages once it gave up on a2: on one kernel the
    frames a2 still holds then change under it and fail their CRC check, so none would land)."""
    start_ha(pair, "a2")
    start_ha(pair, "a1")
    wait_status(pair, "a1", in_sync)
    writers, block = 64, 128 << 10  # 8 MiB in flight when the acks stop coming
    old, new = tmp_path / "a.bin", tmp_path / "b.bin"
    old.write_bytes(random.randbytes(writers * block))
    new.write_bytes(random.randbytes(writers * block))
    dd = f"dd bs={block} oflag=direct conv=notrunc status=none of={DEVICE}"
    pair.freeze("a2")
    try:
        pair.run("a1", f"for i in $(seq 0 {writers - 1}); do {dd} if={old} skip=$i seek=$i count=1 & done; wait",
                 check=True, timeout=60)
        s1 = status(pair, "a1")
        assert not s1["peer_connected"] and s1["replication"]["dirty_blocks"] > 0, s1
        pair.run("a1", f"{dd} if={new}", check=True, timeout=60)
    finally:
        pair.thaw("a2")
    wait_status(pair, "a1", in_sync, timeout=60)
    time.sleep(1.0)  # an old frame applied late would land by now
    stop_ha(pair, "a1")
    assert images_identical(pair), first_difference(pair)
    assert (pair.home("a2") / "disk.img").read_bytes()[:writers * block] == new.read_bytes()


def test_interrupted_sync_is_never_promoted_and_resumes(make_lab: Any, tmp_path: Path) -> None:
    with make_lab(tmp_path, "2G") as lab:
        # Written zeros, not holes: holes sync in no time (SYNC_ZERO), and this sync must take a while.
        subprocess.run(["dd", "if=/dev/zero", f"of={lab.home('a1') / 'disk.img'}", "bs=1M", "count=2048",
                        "conv=notrunc,fsync", "status=none"], check=True, timeout=120)
        start_ha(lab, "a1")
        start_ha(lab, "a2")
        wait_status(lab, "a1", lambda s: s["peer_connected"] and s["disk"]["sync_percent"] >= 25, timeout=60)
        lab.cut("a1", "all")
        at_cut = status(lab, "a1")["disk"]["sync_percent"]
        assert at_cut < 100, "the sync finished before the cut; nothing to resume"
        # a1 is silent on both networks, but a2's copy is incomplete: it must not take over.
        wait_status(lab, "a2", lambda s: s["mode"] == "inconsistent", timeout=30)
        time.sleep(3)
        s2 = status(lab, "a2")
        assert s2["mode"] == "inconsistent" and not s2["floating_ip_held"]
        assert "will not be promoted" in ha_log(lab, "a2")
        lab.heal("a1", "all")
        wait_status(lab, "a1", lambda s: s["peer_connected"], timeout=30)
        log = ha_log(lab, "a1")
        resumed = log[log.rindex("Connected to secondary"):].split("\n")[0]
        assert "bitmap resync" in resumed, resumed
        remaining = int(resumed.split("bitmap resync of ")[1].split()[0])
        assert remaining <= (1 - (at_cut - 5) / 100) * (2 << 30), f"resumed with {remaining} bytes after {at_cut} %"
        wait_status(lab, "a2", lambda s: s["mode"] == "secondary" and s["disk"]["state"] == "UpToDate", timeout=60)
        stop_all(lab)
        assert filecmp.cmp(lab.home("a1") / "disk.img", lab.home("a2") / "disk.img", shallow=False)
