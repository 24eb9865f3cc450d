"""Driving the HA commands inside lab nodes, as an operator would."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

PING_INTERVAL = "1"

HA_ARGS = (
    "--primary-ip 198.18.0.11 --secondary-ip 198.18.0.12 "
    "--primary-sync-ip 198.19.0.1 --secondary-sync-ip 198.19.0.2 "
    f"--floating-ip 198.18.0.10/24 --ping-interval {PING_INTERVAL} --disk $MIRRORD_HOME/disk.img"
)


def sync_link_congestion_control() -> str:
    """What the data path sets on the sync link: cubic, reno on a kernel without it (decisions.md 31)."""
    available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    return "cubic" if "cubic" in available else "reno"


def start_ha(lab: Any, node: str, extra: str = "", check: bool = True) -> Any:
    done = lab.run(node, f"startHA {HA_ARGS} {extra}", timeout=120)
    if check:
        assert done.returncode == 0, f"startHA on {node} exited {done.returncode}: {done.stdout}{done.stderr}"
    return done


def start_primary_with_fs(lab: Any) -> None:
    lab.run("a1", "mkdir -p $MIRRORD_HOME/mnt", check=True)
    start_ha(lab, "a1", "--mount $MIRRORD_HOME/mnt --mkfs ext4")


def stop_ha(lab: Any, node: str) -> None:
    done = lab.run(node, "stopHA", timeout=120)
    assert done.returncode == 0, f"stopHA on {node}: {done.stdout}{done.stderr}"


def status(lab: Any, node: str) -> dict[str, Any]:
    done = lab.run(node, "HAstatus --json", timeout=30)
    assert done.returncode == 0, f"HAstatus on {node}: {done.stderr}"
    return json.loads(done.stdout)


def wait_status(lab: Any, node: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = status(lab, node)
        if pred(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"{node} never reached the expected state; last status: {json.dumps(last, indent=1)}")


def in_sync(s: dict[str, Any]) -> bool:
    return bool(s["peer_connected"]) and s["disk"]["sync_percent"] >= 100.0


def ha_log(lab: Any, node: str) -> str:
    path = lab.home(node) / "log" / "ha.log"
    return path.read_text() if path.exists() else ""


def stop_all(lab: Any) -> None:
    """Best-effort: leave both appliances standalone with no daemon (for the next test)."""
    for node in ("a1", "a2"):
        lab.run(node, "HAstatus >/dev/null 2>&1 && stopHA; true", timeout=120)
        lab.run(node, "mirrord shutdown >/dev/null 2>&1; true", timeout=30)


# A popen'd daemon may hand the service over before it stops (as on systemctl stop).
REAP_GRACE = 60.0


def reset_pair(lab: Any) -> None:
    """After a test: both appliances powered, thawed, cabled, standalone, with no HA state,
    and nothing the test started with lab.popen still running (a writer left by a failed
    assertion would keep the disk busy for the next test)."""
    for node in ("a1", "a2"):
        lab.thaw(node)  # a frozen process cannot act on its SIGTERM
    lab.reap(REAP_GRACE)
    for node in ("a1", "a2"):
        if lab.run(node, "true").returncode != 0:  # a crashed node: power it back
            lab.boot(node)
        lab.heal(node, "all")
    stop_all(lab)
    forget_ha_state(lab)


def forget_ha_state(lab: Any) -> None:
    """Make both appliances new machines again (their disks keep their bytes): the next test starts clean."""
    for node in ("a1", "a2"):
        for name in ("ha.json", "state.json"):
            (lab.home(node) / name).unlink(missing_ok=True)
        for pattern in ("r*.meta", "r*.bitmap", "r*.al"):  # every volume's metadata
            for path in lab.home(node).glob(pattern):
                path.unlink()


# -- an application that names the appliance that answered (HAProxy test, failover bench) --

APP_SERVER = r'''
"""Serves the mirrored filesystem on 0.0.0.0:PORT; every answer says which appliance gave it."""
import functools, http.server, sys
node, directory, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class Handler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        self.send_header("X-Served-By", node)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("0.0.0.0", port), functools.partial(Handler, directory=directory)).serve_forever()
'''

APP_SCRIPT = """#!/bin/sh
# A file server on every address of the appliance, naming the appliance that answered.
case "$1" in
start) {python} {home}/app_server.py {node} "$MIRRORD_MOUNT" {port} >/dev/null 2>&1 </dev/null &
       echo $! > {home}/app.pid ;;
stop)  [ -f {home}/app.pid ] && kill "$(cat {home}/app.pid)"; rm -f {home}/app.pid
       fuser -k -m "$MIRRORD_MOUNT" >/dev/null 2>&1 ;;
esac
exit 0
"""


def install_named_app(lab: Any, port: int) -> None:
    """app_server.py and app.sh (start/stop script) in both appliances' homes."""
    for node in ("a1", "a2"):
        home = lab.home(node)
        (home / "app_server.py").write_text(APP_SERVER)
        script = home / "app.sh"
        script.write_text(APP_SCRIPT.format(python=sys.executable, home=home, node=node, port=port))
        script.chmod(0o755)
