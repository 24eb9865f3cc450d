"""Automatic failover and failOver in the namespace lab (issue 4's acceptance tests)."""

from __future__ import annotations

import base64
import datetime
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from hactl import ha_log, in_sync, reset_pair, start_ha, status, stop_ha, wait_status
from writer import BLOCK, block_bytes

pytestmark = pytest.mark.lab
WRITER = str(Path(__file__).with_name("writer.py"))

APP = """#!/bin/sh
# A tiny application: serves the mirrored filesystem on the floating IP.
case "$1" in
start) python3 -m http.server --bind "$MIRRORD_FLOATING_IP" 8080 --directory "$MIRRORD_MOUNT" \\
           >/dev/null 2>&1 </dev/null &
       echo $! > "$MIRRORD_HOME/app.pid" ;;
stop)  [ -f "$MIRRORD_HOME/app.pid" ] && kill "$(cat "$MIRRORD_HOME/app.pid")"; rm -f "$MIRRORD_HOME/app.pid"
       # like Pacemaker's Filesystem agent: nothing may keep the mount busy
       fuser -k -m "$MIRRORD_MOUNT" >/dev/null 2>&1 ;;
esac
exit 0
"""

OCF_AGENT = """#!/bin/sh
# A minimal OCF resource agent: a marker file stands for the running application.
M="$MIRRORD_HOME/ocf-app.running"
case "$1" in
meta-data) echo '<?xml version="1.0"?><resource-agent name="marker"><version>1.0</version></resource-agent>'; exit 0 ;;
start)     touch "$M"; echo start >> "$MIRRORD_HOME/ocf.calls"; exit 0 ;;
stop)      rm -f "$M"; exit 0 ;;
monitor)   [ -f "$M" ] && exit 0; exit 7 ;;
esac
exit 3
"""

POLL = r"""
import sys, time, urllib.request
want, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        body = urllib.request.urlopen("http://198.18.0.10:8080/data.txt", timeout=0.3).read().decode()
        if body == want:
            print(time.time()); sys.exit(0)
    except OSError:
        pass
    time.sleep(0.02)
sys.exit(1)
"""


@pytest.fixture(scope="module")
def lab(make_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with make_lab(tmp_path_factory.mktemp("failover"), "128M") as handle:
        for node in ("a1", "a2"):
            for name, text in (("app.sh", APP), ("ocf.sh", OCF_AGENT)):
                script = handle.home(node) / name
                script.write_text(text)
                script.chmod(0o755)
        yield handle


@pytest.fixture
def pair(lab: Any) -> Iterator[Any]:
    yield lab
    reset_pair(lab)


APP_ARGS = "--mount $MIRRORD_HOME/mnt --start-script $MIRRORD_HOME/app.sh --stop-script $MIRRORD_HOME/app.sh"


def start_pair(lab: Any) -> None:
    for node in ("a2", "a1"):
        lab.run(node, "mkdir -p $MIRRORD_HOME/mnt", check=True)
    start_ha(lab, "a2", APP_ARGS)
    start_ha(lab, "a1", APP_ARGS + " --mkfs ext4")
    wait_status(lab, "a1", in_sync)
    wait_status(lab, "a2", lambda s: s["disk"]["state"] == "UpToDate")


def test_crash_of_the_primary_moves_the_service(pair: Any) -> None:
    start_pair(pair)
    pair.run("a1", "echo acknowledged-data > $MIRRORD_HOME/mnt/data.txt && sync", check=True)
    assert pair.run("client", [sys.executable, "-c", POLL, "acknowledged-data\n", "10"]).returncode == 0
    crashed = time.time()
    pair.crash("a1")
    done = pair.run("client", [sys.executable, "-c", POLL, "acknowledged-data\n", "30"], timeout=60)
    assert done.returncode == 0, "a2 never served the data after the crash of a1"
    elapsed = float(done.stdout) - crashed
    print(f"crash of a1 -> first good reply from a2: {elapsed:.2f} s")
    s2 = status(pair, "a2")
    assert s2["mode"] == "primary" and s2["floating_ip_held"] and s2["serving"]
    assert "taking over as primary" in ha_log(pair, "a2")
    with zipfile.ZipFile(pair.home("a2") / "log" / "trace.zip") as z:
        names = set(z.namelist())
    assert {"198.18.0.12_ha.log", "198.18.0.12_ha.out", "198.18.0.12_ha.result", "198.18.0.11_ha.log"} <= names
    with zipfile.ZipFile(pair.home("a2") / "log" / "trace.zip") as z:
        a1_log = z.read("198.18.0.11_ha.log").decode()
    assert "HA started: this appliance (198.18.0.11) is the primary" in a1_log
    # The dead primary's log is there up to its last moments: every line it wrote
    # until half a second before the power went is in the survivor's trace.
    on_disk = (pair.home("a1") / "log" / "ha.log").read_text().splitlines()
    cutoff = datetime.datetime.fromtimestamp(crashed - 0.5, datetime.timezone.utc)
    older = [line for line in on_disk
             if datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")) < cutoff]
    assert older and all(line in a1_log for line in older)
    # The old primary comes back standalone and never claims anything by itself.
    pair.boot("a1")
    assert pair.run("a1", "HAstatus --json").returncode == 3  # no daemon until an operator starts HA
    start_ha(pair, "a1", APP_ARGS)
    s1 = wait_status(pair, "a1", lambda s: s["mode"] == "secondary" and s["disk"]["state"] == "UpToDate")
    assert not s1["floating_ip_held"]


def test_one_network_down_is_not_a_takeover(pair: Any) -> None:
    start_pair(pair)
    pair.cut("a1", "sync")
    pair.run("a1", "echo during-cut > $MIRRORD_HOME/mnt/cut.txt && sync", check=True, timeout=60)
    s1 = wait_status(pair, "a1", lambda s: s["degraded"] and s["serving"], timeout=30)
    assert s1["mode"] == "primary"
    time.sleep(2.5)
    s2 = status(pair, "a2")
    assert s2["mode"] == "secondary" and s2["disk"]["state"] == "Outdated", ha_log(pair, "a2")[-3000:] + ha_log(pair, "a1")[-3000:]
    assert "silent on the sync network" in ha_log(pair, "a2")
    pair.heal("a1", "sync")
    wait_status(pair, "a1", in_sync, timeout=60)
    wait_status(pair, "a2", lambda s: s["disk"]["state"] == "UpToDate")
    pair.cut("a1", "public")
    time.sleep(2.5)
    assert status(pair, "a2")["mode"] == "secondary"
    assert status(pair, "a1")["mode"] == "primary"
    pair.heal("a1", "public")
    time.sleep(0.5)
    pair.cut("a1", "all")
    s2 = wait_status(pair, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=30)
    assert s2["floating_ip_held"]


def test_hung_primary_is_replaced_and_steps_down(pair: Any) -> None:
    start_pair(pair)
    writer = pair.popen("a1", [sys.executable, WRITER, f"{pair.home('a1')}/mnt/blocks", "0", "4000", "freeze"],
                        stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    pair.freeze("a1")
    wait_status(pair, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=30)
    thawed = time.monotonic()
    pair.thaw("a1")
    s1 = wait_status(pair, "a1", lambda s: s["mode"] == "standalone", timeout=10)
    print(f"a1 stepped down {time.monotonic() - thawed:.2f} s after the thaw")
    assert not s1["floating_ip_held"]
    writer.kill()
    out, _ = writer.communicate(timeout=10)
    acked = [tuple(map(int, line.split()[1:])) for line in out.splitlines() if line.startswith("ACK ")]
    assert acked, "the writer acknowledged nothing before the freeze"
    # Every write a1 acknowledged is in the file on a2's (now mounted) filesystem.
    data = pair.run("a2", "cat $MIRRORD_HOME/mnt/blocks | base64 -w0", check=True, timeout=60).stdout
    blob = base64.b64decode(data)
    missing = [(b, n) for b, n in acked if blob[b * BLOCK:(b + 1) * BLOCK] != block_bytes("freeze", b, n)]
    assert not missing, f"{len(missing)} acknowledged writes missing on a2, e.g. {missing[:3]} ({len(blob)} bytes)"
    assert "stalled" in ha_log(pair, "a1") or "says it is primary" in ha_log(pair, "a1")


def test_failover_round_trip_under_a_writer(pair: Any) -> None:
    start_pair(pair)
    acked_all: list[tuple[int, int, str]] = []
    for rnd, (old, new) in enumerate((("a1", "a2"), ("a2", "a1"))):
        tag = f"fo{rnd}"
        writer = pair.popen(old, [sys.executable, WRITER, f"{pair.home(old)}/mnt/w{rnd}", "0", "2000", tag],
                            stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        done = pair.run(old, "failOver", timeout=120)
        writer.kill()
        out, _ = writer.communicate(timeout=10)
        assert done.returncode == 0, done.stderr
        acked = [(int(l.split()[1]), int(l.split()[2]), tag) for l in out.splitlines() if l.startswith("ACK ")]
        # Else the no-loss check below holds for no writes at all.
        assert len(acked) > 20, f"round {rnd}: the writer acknowledged only {len(acked)} writes before failOver"
        acked_all += acked
        s_new = wait_status(pair, new, lambda s: s["mode"] == "primary" and s["serving"], timeout=30)
        s_old = status(pair, old)
        assert s_old["mode"] == "idle" and not s_old["floating_ip_held"] and s_new["floating_ip_held"]
        start_ha(pair, old, APP_ARGS)
        wait_status(pair, old, lambda s: s["mode"] == "secondary" and s["disk"]["state"] == "UpToDate", timeout=60)
    s1 = status(pair, "a1")
    assert s1["mode"] == "primary"
    for rnd in range(2):
        tag = f"fo{rnd}"
        blob = pair.run("a1", f"base64 -w0 $MIRRORD_HOME/mnt/w{rnd}", check=True, timeout=60).stdout
        data = base64.b64decode(blob)
        missing = [(b, n) for b, n, t in acked_all if t == tag and data[b * BLOCK:(b + 1) * BLOCK] != block_bytes(t, b, n)]
        assert not missing, f"round {rnd}: {len(missing)} acknowledged writes lost"


def test_failing_ocf_application_is_restarted_then_failed_over(pair: Any) -> None:
    ocf = "--mount $MIRRORD_HOME/mnt --start-script $MIRRORD_HOME/ocf.sh --stop-script $MIRRORD_HOME/ocf.sh " \
          "--restart-limit 1"
    for node in ("a2", "a1"):
        pair.run(node, "mkdir -p $MIRRORD_HOME/mnt", check=True)
    start_ha(pair, "a2", ocf)
    start_ha(pair, "a1", ocf + " --mkfs ext4")
    wait_status(pair, "a1", lambda s: in_sync(s) and s["app"]["healthy"] is True, timeout=30)
    pair.run("a1", "rm $MIRRORD_HOME/ocf-app.running", check=True)
    wait_status(pair, "a1", lambda s: s["app"]["restarts"] == 1 and s["app"]["healthy"] is True, timeout=30)
    assert (pair.home("a1") / "ocf.calls").read_text().count("start") == 2
    assert "The application failed its monitor: restarting it (1 of 1)." in ha_log(pair, "a1")
    pair.run("a1", "rm $MIRRORD_HOME/ocf-app.running", check=True)
    s2 = wait_status(pair, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=30)
    assert s2["floating_ip_held"]
    assert status(pair, "a1")["mode"] == "idle"
    assert "handing over to the secondary" in ha_log(pair, "a1")
    assert (pair.home("a2") / "ocf-app.running").exists()


def test_stopping_the_primary_daemon_hands_over(pair: Any) -> None:
    start_pair(pair)
    pair.run("a1", "echo before-stop > $MIRRORD_HOME/mnt/data.txt && sync", check=True)
    done = pair.run("a1", "mirrord shutdown", timeout=120)  # what systemctl stop does: SIGTERM-like stop
    assert done.returncode == 0, done.stderr
    s2 = wait_status(pair, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=30)
    assert s2["floating_ip_held"]
    assert pair.run("a2", "cat $MIRRORD_HOME/mnt/data.txt", check=True).stdout == "before-stop\n"


# The same settings with the roles swapped: how an operator makes a2 the primary once a1 is gone.
A2_AS_PRIMARY = ("--primary-ip 198.18.0.12 --secondary-ip 198.18.0.11 --primary-sync-ip 198.19.0.2 "
                 "--secondary-sync-ip 198.19.0.1 --floating-ip 198.18.0.10/24 --ping-interval 1 "
                 "--disk $MIRRORD_HOME/disk.img " + APP_ARGS)


def test_a_secondary_that_lost_power_serves_its_copy_only_when_forced(pair: Any) -> None:
    """Decision 41: a2 loses power, a1 acknowledges writes alone, then a1 dies too. When a2 is
    powered on, nothing tells it that it missed those writes: a startHA naming it primary must
    refuse, and serve its copy only with --force."""
    start_pair(pair)
    pair.run("a1", "echo mirrored > $MIRRORD_HOME/mnt/before.txt && sync", check=True)
    pair.crash("a2")
    # a1 holds writes until a2 is silent for pingInterval, then goes on alone.
    pair.run("a1", "echo alone > $MIRRORD_HOME/mnt/after.txt && sync", check=True, timeout=60)
    assert status(pair, "a1")["degraded"]
    pair.crash("a1")
    pair.boot("a2")
    refused = pair.run("a2", f"startHA {A2_AS_PRIMARY}", timeout=120)
    assert refused.returncode == 3, f"{refused.stdout}{refused.stderr}"
    assert "was last the secondary's copy" in refused.stdout + refused.stderr
    s2 = status(pair, "a2")
    assert s2["mode"] == "standalone" and not s2["floating_ip_held"] and s2["disk"]["following"]
    assert pair.run("a2", "mountpoint -q $MIRRORD_HOME/mnt").returncode != 0
    forced = pair.run("a2", f"startHA {A2_AS_PRIMARY} --force", timeout=120)
    assert forced.returncode == 0, f"{forced.stdout}{forced.stderr}"
    s2 = wait_status(pair, "a2", lambda s: s["mode"] == "primary" and s["serving"])
    assert not s2["disk"]["following"]
    # What --force serves: the copy a2 had, without the write a1 acknowledged alone.
    assert pair.run("a2", "cat $MIRRORD_HOME/mnt/before.txt", check=True).stdout == "mirrored\n"
    assert pair.run("a2", "test -e $MIRRORD_HOME/mnt/after.txt").returncode != 0
    assert "startHA --force: serving this appliance's copy" in ha_log(pair, "a2")


def test_a_crashed_primary_serves_again_only_where_the_peer_is_not_newer(pair: Any) -> None:
    """Decision 45: a1 crashes, a2 takes over and acknowledges a write, then a2 dies too. a1 must not
    come back as primary with the copy it had: while a2 is silent its startHA refuses, and once a2
    answers (as a1's secondary) their generation identifiers show a2's copy newer, so it still
    refuses. The roles swapped, a2 serves its newer copy and a1 is synced."""
    start_pair(pair)
    pair.run("a1", "echo mirrored > $MIRRORD_HOME/mnt/before.txt && sync", check=True)
    pair.crash("a1")
    wait_status(pair, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=60)
    pair.run("a2", "echo taken-over > $MIRRORD_HOME/mnt/after.txt && sync", check=True, timeout=60)
    pair.crash("a2")
    pair.boot("a1")
    alone = start_ha(pair, "a1", APP_ARGS, check=False)
    assert alone.returncode == 3 and "crashed as primary" in alone.stdout + alone.stderr, alone
    s1 = status(pair, "a1")
    assert s1["mode"] == "standalone" and s1["disk"]["following"] and not s1["floating_ip_held"]
    pair.boot("a2")
    start_ha(pair, "a2", APP_ARGS)  # named the secondary: it waits for a1
    older = start_ha(pair, "a1", APP_ARGS, check=False)
    assert older.returncode == 3 and "The peer holds newer data" in older.stdout + older.stderr, older
    assert status(pair, "a1")["mode"] == "standalone"
    stop_ha(pair, "a2")
    for node in ("a1", "a2"):  # a1 first, now as a2's secondary
        done = pair.run(node, f"startHA {A2_AS_PRIMARY}", timeout=120)
        assert done.returncode == 0, f"startHA on {node}: {done.stdout}{done.stderr}"
    wait_status(pair, "a2", in_sync, timeout=120)
    assert pair.run("a2", "cat $MIRRORD_HOME/mnt/after.txt", check=True).stdout == "taken-over\n"
