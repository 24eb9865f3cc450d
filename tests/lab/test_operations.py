"""Operator experience in the lab (issue 8): HAstatus's tree and --watch during a real sync, a rolling
upgrade with a second installed version, and what a restarted daemon does (never primary by itself).

The second version is a real second copy of the installed package whose ``__version__`` is bumped,
put first on PYTHONPATH for one appliance's commands (and so for the daemon startHA starts there);
the product itself has no switch for it (docs/decisions.md).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import mirrord
from hactl import (HA_ARGS, REAP_GRACE, forget_ha_state, ha_log, in_sync, start_ha, start_primary_with_fs, status,
                   stop_all, wait_status)

pytestmark = pytest.mark.lab

#: The sync link is shaped so an initial sync of the disk takes about half a minute (tc tbf, a real
#: qdisc). The replication socket's send buffer must drain within its TCP_USER_TIMEOUT (2 x
#: pingInterval), hence a ping interval of 3 s for this test.
SLOW_SYNC = "tc qdisc replace dev sync0 root tbf rate 32mbit burst 128kb latency 200ms"
SLOW_PING = "--ping-interval 3"
FAST_SYNC = "tc qdisc del dev sync0 root"


@pytest.fixture(scope="module")
def lab(make_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with make_lab(tmp_path_factory.mktemp("operations"), "128M") as handle:
        yield handle


@pytest.fixture
def pair(lab: Any) -> Iterator[Any]:
    """A pair in sync: a1 primary with an ext4 filesystem, a2 secondary; left standalone and forgotten."""
    try:
        start_ha(lab, "a2")
        start_primary_with_fs(lab)
        wait_status(lab, "a1", in_sync, timeout=120)
        yield lab
    finally:
        lab.reap(REAP_GRACE)
        lab.run("a1", f"{FAST_SYNC} 2>/dev/null; true")
        stop_all(lab)
        forget_ha_state(lab)


def test_hastatus_tree_and_watch_during_a_sync(lab: Any) -> None:
    # Written data, not holes: holes travel as zero ranges and would sync at once.
    subprocess.run(["dd", "if=/dev/urandom", f"of={lab.home('a1') / 'disk.img'}", "bs=1M", "count=64",
                    "conv=notrunc", "status=none"], check=True, timeout=120)
    lab.run("a1", SLOW_SYNC, check=True)
    try:
        start_ha(lab, "a2", SLOW_PING)
        lab.run("a1", "mkdir -p $MIRRORD_HOME/mnt", check=True)
        start_ha(lab, "a1", f"--mount $MIRRORD_HOME/mnt --mkfs ext4 {SLOW_PING}")
        wait_status(lab, "a1", lambda s: s["peer_connected"] and 0 < s["disk"]["sync_percent"] < 100, timeout=60)
        once = lab.run("a1", "HAstatus", timeout=60)
        assert once.returncode == 0, once.stderr
        assert re.search(r"replication:SyncSource peer-disk:Inconsistent done:\d+\.\d\d% rate:[\d.]+\w+/s "
                         r"eta:\d+:\d\d:\d\d", once.stdout), once.stdout
        assert "r0 mode:primary role:Primary" in once.stdout and "networks: public:ok sync:ok" in once.stdout
        secondary = lab.run("a2", "HAstatus", timeout=60)
        assert re.search(r"disk:Inconsistent.*replication:SyncTarget done:\d+\.\d\d%", secondary.stdout, re.S), \
            secondary.stdout
        watch = lab.run("a1", "HAstatus --watch --interval 1 --count 3", timeout=60)
        assert watch.returncode == 0, watch.stderr
        frames = watch.stdout.split("HAstatus --watch (every 1 s; Ctrl-C ends)")[1:]
        assert len(frames) == 3, watch.stdout
        assert all(re.search(r"\[#*\.*\] \d+\.\d\d%", frame) for frame in frames), watch.stdout
        assert "rate:" not in frames[0] and "rate:" in frames[-1], watch.stdout
        lab.run("a1", FAST_SYNC, check=True)
        wait_status(lab, "a1", in_sync, timeout=120)
        done = lab.run("a1", "HAstatus", timeout=60).stdout
        assert "replication:Established peer-disk:UpToDate" in done and "done:" not in done, done
    finally:
        lab.run("a1", f"{FAST_SYNC} 2>/dev/null; true")
        stop_all(lab)
        forget_ha_state(lab)


# -- upgrade ---------------------------------------------------------------------------------------


def installed_copy(root: Path, version: str) -> dict[str, str]:
    """A second installation of this mirrord (C extension included) that says it is ``version``."""
    site = root / f"mirrord-{version}"
    if not site.exists():
        shutil.copytree(Path(mirrord.__file__).parent, site / "mirrord",
                        ignore=shutil.ignore_patterns("__pycache__"))
        init = site / "mirrord" / "__init__.py"
        text, count = re.subn(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text())
        assert count == 1
        init.write_text(text)
    return {"PYTHONPATH": str(site)}


def upgrade(lab: Any, node: str, env: dict[str, str], root: Path, extra: str = "") -> subprocess.CompletedProcess[str]:
    """What a firmware upgrade does to the daemon: it stops, the new version is installed, startHA again.

    The commands run from the copy's own directory: `python -m` puts the working directory first on
    sys.path, and the tests' working directory holds the source tree's mirrord.
    """
    lab.run(node, "mirrord shutdown", timeout=120, check=True)
    return lab.run(node, f"startHA {HA_ARGS} {extra}", timeout=120, env=env, cwd=root)


def test_rolling_upgrade(pair: Any, tmp_path: Path) -> None:
    lab = pair
    old = mirrord.__version__
    major, minor, *_ = old.split(".")
    patch, series = f"{major}.{minor}.99", f"{major}.{int(minor) + 1}.0"
    lab.run("a1", "echo before-upgrade > $MIRRORD_HOME/mnt/marker && sync", check=True)

    assert lab.run("a1", "failOver", timeout=120).returncode == 0
    wait_status(lab, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=60)

    # An appliance of another release is refused: startHA hears the primary's version at once.
    done = upgrade(lab, "a1", installed_copy(tmp_path, series), tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"mirrord versions differ: the primary runs {old}, the secondary runs {series}" in done.stderr
    assert status(lab, "a1")["mode"] == "standalone"

    # The same release at another patch level pairs: the rolling procedure keeps the mirror.
    new = installed_copy(tmp_path, patch)
    done = upgrade(lab, "a1", new, tmp_path, "--mount $MIRRORD_HOME/mnt")
    assert done.returncode == 0, done.stderr
    wait_status(lab, "a2", in_sync, timeout=120)
    assert status(lab, "a1")["version"] == patch

    assert lab.run("a2", "failOver", timeout=120).returncode == 0
    wait_status(lab, "a1", lambda s: s["mode"] == "primary" and s["serving"], timeout=60)

    # A configured secondary does not listen first: the handshake refuses it, both logs name both versions.
    done = upgrade(lab, "a2", installed_copy(tmp_path, series), tmp_path)
    assert done.returncode == 0, done.stderr
    refusal = f"mirrord versions differ: the primary runs {patch}, the secondary runs {series}"
    s2 = wait_status(lab, "a2", lambda s: refusal in (s["peer_error"] or ""), timeout=60)
    assert s2["version"] == series and s2["mode"] == "secondary" and not s2["peer_connected"]
    assert refusal in ha_log(lab, "a2")
    lab.wait_for(lambda: refusal in ha_log(lab, "a1"), timeout=30)
    assert refusal in ha_log(lab, "a1"), "the primary's log names both versions too"
    assert status(lab, "a1")["degraded"]

    lab.run("a2", "stopHA", timeout=120, check=True)
    done = upgrade(lab, "a2", new, tmp_path)
    assert done.returncode == 0, done.stderr
    s1 = wait_status(lab, "a1", in_sync, timeout=120)
    assert s1["version"] == patch and status(lab, "a2")["version"] == patch
    assert lab.run("a1", "cat $MIRRORD_HOME/mnt/marker").stdout == "before-upgrade\n"


# -- restarts --------------------------------------------------------------------------------------


def daemon_pid(lab: Any, node: str) -> int:
    found = re.findall(r"daemon started \(pid (\d+)\)", ha_log(lab, node))
    assert found, f"no daemon start in {node}'s ha.log"
    return int(found[-1])


def kill_daemon(lab: Any, node: str) -> None:
    """kill -9: what an OOM kill or a crash of the daemon alone does (the machine stays up)."""
    pid = daemon_pid(lab, node)
    os.kill(pid, signal.SIGKILL)
    assert lab.wait_for(lambda: not Path(f"/proc/{pid}").exists()
                        or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), timeout=10), \
        f"{node}'s daemon (pid {pid}) outlived SIGKILL"


def systemd_start(lab: Any, node: str) -> None:
    """What systemd's Restart= does: `mirrord daemon` in the foreground, with no command given."""
    before = daemon_pid(lab, node)
    lab.popen(node, ["mirrord", "daemon"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert lab.wait_for(lambda: daemon_pid(lab, node) != before and lab.run(node, "HAstatus --json").returncode == 0,
                        timeout=30), f"no new daemon answered on {node}"


def test_restarted_daemons_never_come_back_primary(pair: Any) -> None:
    lab = pair
    # The primary's daemon dies: the secondary takes over; the restarted one comes back standalone,
    # releasing the floating IP and the mount its predecessor left behind.
    kill_daemon(lab, "a1")
    wait_status(lab, "a2", lambda s: s["mode"] == "primary" and s["serving"], timeout=60)
    systemd_start(lab, "a1")
    s1 = status(lab, "a1")
    assert s1["mode"] == "standalone" and not s1["floating_ip_held"], s1
    log = ha_log(lab, "a1")
    assert "A restarted primary never resumes by itself" in log
    assert "Released the floating IP 198.18.0.10/24 a previous daemon left behind" in log
    assert lab.run("a1", "mountpoint -q $MIRRORD_HOME/mnt").returncode != 0
    assert lab.run("a1", "ip -4 -o addr show dev eth0").stdout.count("198.18.0.10/") == 0

    # The operator's startHA makes it the new primary's secondary.
    start_ha(lab, "a1")
    wait_status(lab, "a2", in_sync, timeout=120)
    assert status(lab, "a1")["mode"] == "secondary"

    # The secondary's daemon dies, then comes back by itself as secondary and catches up.
    kill_daemon(lab, "a1")
    wait_status(lab, "a2", lambda s: s["degraded"] and s["serving"], timeout=60)
    # a2 serves the raw disk (no --mount): write to the exposed device beyond the filesystem's hot spots.
    lab.run("a2", "dd if=/dev/urandom of=$MIRRORD_HOME/dev/r0 bs=64k count=16 seek=1000 conv=notrunc,fsync "
                  "2>/dev/null", check=True)
    systemd_start(lab, "a1")
    wait_status(lab, "a2", in_sync, timeout=120)
    assert status(lab, "a1")["mode"] == "secondary"
    assert re.search(r"restarted while secondary, disk (UpToDate|Outdated|Inconsistent): resuming as secondary "
                     r"by itself", ha_log(lab, "a1"))

    # A clean restart (systemctl restart, a reboot) of the secondary resumes it the same way.
    lab.run("a1", "mirrord shutdown", timeout=120, check=True)
    systemd_start(lab, "a1")
    wait_status(lab, "a2", in_sync, timeout=120)
    s1 = status(lab, "a1")
    assert s1["mode"] == "secondary" and not s1["floating_ip_held"]

    # stopHA is final: after it a restart stays standalone.
    lab.run("a1", "stopHA", timeout=120, check=True)
    lab.run("a1", "mirrord shutdown", timeout=120, check=True)
    systemd_start(lab, "a1")
    assert status(lab, "a1")["mode"] == "standalone"
    assert "HA was not running before" in ha_log(lab, "a1")


# -- backup and restore ----------------------------------------------------------------------------


def test_backup_while_serving_then_restore(pair: Any) -> None:
    lab = pair
    archive = lab.home("a1") / "backup.tar"  # beside the appliance's state, not on the mirrored filesystem
    lab.run("a1", "mkdir $MIRRORD_HOME/mnt/kept && for i in $(seq 1 50); do echo file-$i > $MIRRORD_HOME/mnt/kept/$i; "
                  "done && sync", check=True)
    writer = lab.popen("a1", ["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > $MIRRORD_HOME/mnt/busy-$((i % 20)); "
                                          "done"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        done = lab.run("a1", f"mirrord backup {archive}", timeout=300)
        assert writer.poll() is None, "the writer kept running through the backup"
    finally:
        writer.kill()
        writer.wait(timeout=10)
    assert done.returncode == 0, done.stderr
    assert "consistent by fsfreeze" in done.stdout
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["disk.extents", "settings.json", "manifest.json"]
        assert tar.getmember("disk.extents").size < 128 << 20, "zero blocks are not stored"

    done = lab.run("a1", f"mirrord restore {archive}", timeout=60)
    assert done.returncode == 3 and "stop HA on both appliances first" in done.stderr, done.stderr

    stop_all(lab)
    # The data changes after the backup: files removed, a new one written.
    lab.run("a1", "mount -o loop $MIRRORD_HOME/disk.img $MIRRORD_HOME/mnt && rm -r $MIRRORD_HOME/mnt/kept && "
                  "echo after > $MIRRORD_HOME/mnt/after-backup", check=True)
    try:
        done = lab.run("a1", f"mirrord restore {archive}", timeout=60)
        assert done.returncode == 3 and "in use" in done.stderr, done.stderr
    finally:
        lab.run("a1", "umount $MIRRORD_HOME/mnt", check=True)
    done = lab.run("a1", f"mirrord restore {archive}", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Run startHA on the primary first, then on the secondary" in done.stdout
    fsck = lab.run("a1", "e2fsck -fn $MIRRORD_HOME/disk.img", timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    start_primary_with_fs(lab)
    start_ha(lab, "a2")
    wait_status(lab, "a1", in_sync, timeout=120)
    assert "checksum sync" in ha_log(lab, "a1").rsplit("Command: startHA", 1)[1]  # a full sync that compares first
    listing = lab.run("a1", "cat $MIRRORD_HOME/mnt/kept/1 $MIRRORD_HOME/mnt/kept/50; ls $MIRRORD_HOME/mnt").stdout
    assert listing.startswith("file-1\nfile-50\n") and "after-backup" not in listing, listing


# -- the restricted shell --------------------------------------------------------------------------


def read_until(fd: int, marker: str, timeout: float = 30.0) -> str:
    """What the pty printed up to and including ``marker`` (AssertionError after ``timeout``)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} never appeared; the terminal showed: {seen.decode(errors='replace')!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side closed
                chunk = b""
            assert chunk, f"the shell ended before {marker!r}: {seen.decode(errors='replace')!r}"
            seen += chunk
    return seen.decode(errors="replace")


def test_restricted_shell_through_a_terminal(lab: Any) -> None:
    lab.popen("a1", ["mirrord", "daemon"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert lab.wait_for(lambda: lab.run("a1", "HAstatus --json").returncode == 0, timeout=30), \
        "the daemon never answered"
    master, slave = os.openpty()
    proc = subprocess.Popen(lab.exec_argv("a1", ["mirrord", "shell"]), stdin=slave, stdout=slave, stderr=slave,
                            env=lab.env, start_new_session=True)
    os.close(slave)
    try:
        read_until(master, "HA> ")
        os.write(master, b"HAst\t")
        read_until(master, "HAstatus ")  # tab completed the command name
        os.write(master, b"\n")
        assert "r0 mode:standalone role:-" in read_until(master, "HA> ")
        os.write(master, b"HAstatus --wa\t")
        read_until(master, "--watch ")  # and its options
        os.write(master, b"\x15")  # Ctrl-U: drop the line
        for line, refusal in ((b"ls /", "Not an HA command: 'ls'"), (b"!sh", "Not an HA command: '!sh'"),
                              (b"HAstatus; id", "Not an HA command: 'HAstatus;'")):
            os.write(master, line + b"\n")
            assert refusal in read_until(master, "HA> ")
        os.write(master, b"exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
        lab.run("a1", "mirrord shutdown", timeout=60)
    history = (lab.home("a1") / "shell_history").read_text()
    assert "HAstatus" in history and "ls /" in history
