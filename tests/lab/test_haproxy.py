"""HAProxy in front of the pair, routed by the status endpoint (DESIGN.md §5, "Status endpoint").

A real HAProxy (the Debian package) runs in the lab's client namespace with
both appliances' own addresses as servers, health-checked with
``option httpchk GET /primary`` on port 9187. The application (started by
mirrord's start script on the primary only) serves the mirrored filesystem on
0.0.0.0:8080 and names its appliance in an ``X-Served-By`` header. After the
crash of a1, HAProxy must send the requests to a2, which serves the data
written on a1 before the crash.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hactl import ha_log, in_sync, install_named_app, reset_pair, start_ha, status, wait_status
from under_ci import skip_or_fail

pytestmark = pytest.mark.lab

FRONTEND = "198.18.0.100:8000"
APPLIANCE = {"a1": "198.18.0.11", "a2": "198.18.0.12"}
STATUS_PORT = 9187
APP_PORT = 8080
FAILOVER_BOUND = 30.0  # seconds: crash of a1 -> HAProxy serves the data from a2



HAPROXY_CFG = f"""\
global
    maxconn 256

defaults
    mode http
    timeout connect 200ms
    timeout client 5s
    timeout server 5s
    timeout check 150ms
    retries 2
    option redispatch

frontend mirrord_app
    bind {FRONTEND}
    default_backend appliances

backend appliances
    option httpchk GET /primary
    http-check expect status 200
    server a1 {APPLIANCE['a1']}:{APP_PORT} check port {STATUS_PORT} inter 200 fall 2 rise 1
    server a2 {APPLIANCE['a2']}:{APP_PORT} check port {STATUS_PORT} inter 200 fall 2 rise 1
"""

# Runs in the client namespace: GETs through HAProxy until the condition holds, or the deadline.
#   argv: url want_body want_server consecutive deadline
# prints one JSON object: {"ok": bool, "elapsed": s, "seen": [[status, served_by], ...last 20]}
POLL = r"""
import json, sys, time, urllib.error, urllib.request
url, want, server, need, deadline = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
start = time.monotonic(); run = 0; seen = []
while time.monotonic() - start < deadline:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            code, by, body = r.status, r.headers.get("X-Served-By"), r.read().decode()
    except urllib.error.HTTPError as e:
        code, by, body = e.code, e.headers.get("X-Served-By"), ""
    except OSError as e:
        code, by, body = None, None, type(e).__name__
    seen = (seen + [[code, by]])[-20:]
    run = run + 1 if (code == 200 and by == server and body == want) else 0
    if run >= need:
        print(json.dumps({"ok": True, "elapsed": time.monotonic() - start, "seen": seen})); sys.exit(0)
    time.sleep(0.02)
print(json.dumps({"ok": False, "elapsed": time.monotonic() - start, "seen": seen})); sys.exit(1)
"""

# HEAD (and GET) of a status endpoint path from the client namespace: prints {"HEAD": code, "GET": code}.
STATUS = r"""
import json, sys, urllib.error, urllib.request
codes = {}
for method in ("HEAD", "GET"):
    try:
        with urllib.request.urlopen(urllib.request.Request(sys.argv[1], method=method), timeout=3) as r:
            codes[method] = r.status
    except urllib.error.HTTPError as e:
        codes[method] = e.code
print(json.dumps(codes))
"""

APP_ARGS = "--mount $MIRRORD_HOME/mnt --start-script $MIRRORD_HOME/app.sh --stop-script $MIRRORD_HOME/app.sh"


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if found is None:
        message = "HAProxy is not installed (Debian package haproxy)"
        skip_or_fail(message)
    return found


@pytest.fixture(scope="module")
def lab(make_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with make_lab(tmp_path_factory.mktemp("haproxy"), "64M") as handle:
        install_named_app(handle, APP_PORT)
        yield handle


@pytest.fixture
def haproxy(lab: Any, tmp_path: Path) -> Iterator[Any]:
    """A function that starts HAProxy in the client namespace; it is stopped after the test, whatever happens."""
    binary = haproxy_binary()
    started: list[subprocess.Popen[Any]] = []
    log = tmp_path / "haproxy.log"

    def start() -> subprocess.Popen[Any]:
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG)
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"haproxy -c rejected the config: {check.stdout}{check.stderr}"
        with log.open("wb") as out:
            proc = lab.popen("client", [binary, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        host, port = FRONTEND.split(":")
        assert lab.wait_for(lambda: proc.poll() is not None or lab.tcp_open("client", host, int(port), 0.5),
                            timeout=15), "HAProxy never listened on its frontend"
        assert proc.poll() is None, f"HAProxy exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def pair(lab: Any) -> Iterator[Any]:
    yield lab
    reset_pair(lab)


def status_codes(lab: Any, node: str, path: str) -> dict[str, int]:
    done = lab.run("client", [sys.executable, "-c", STATUS, f"http://{APPLIANCE[node]}:{STATUS_PORT}{path}"],
                   timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def poll_through_haproxy(lab: Any, want: str, server: str, consecutive: int, deadline: float) -> dict[str, Any]:
    done = lab.run("client", [sys.executable, "-c", POLL, f"http://{FRONTEND}/data.txt", want, server,
                              str(consecutive), str(deadline)], timeout=deadline + 30)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_haproxy_follows_the_primary_across_a_crash(pair: Any, haproxy: Any) -> None:
    for node in ("a2", "a1"):
        pair.run(node, "mkdir -p $MIRRORD_HOME/mnt", check=True)
    start_ha(pair, "a2", APP_ARGS)
    start_ha(pair, "a1", APP_ARGS + " --mkfs ext4")
    wait_status(pair, "a1", lambda s: in_sync(s) and s["serving"])
    wait_status(pair, "a2", lambda s: s["disk"]["state"] == "UpToDate")
    data = f"written on a1 before the crash, {time.time():.6f}"
    pair.run("a1", f"printf '%s' '{data}' > $MIRRORD_HOME/mnt/data.txt && sync", check=True)

    # The status endpoint, as HAProxy's check sees it: 200 only on the serving primary.
    assert status_codes(pair, "a1", "/primary") == {"HEAD": 200, "GET": 200}
    assert status_codes(pair, "a2", "/primary") == {"HEAD": 503, "GET": 503}
    assert status_codes(pair, "a2", "/secondary") == {"HEAD": 200, "GET": 200}

    haproxy()
    before = poll_through_haproxy(pair, data, "a1", consecutive=10, deadline=15)
    assert before["ok"], f"HAProxy never routed every request to a1: {before}"

    crashed = time.monotonic()
    pair.crash("a1")
    after = poll_through_haproxy(pair, data, "a2", consecutive=3, deadline=FAILOVER_BOUND)
    elapsed = time.monotonic() - crashed
    assert after["ok"], (f"HAProxy did not serve a1's data from a2 within {FAILOVER_BOUND:g} s of the crash: "
                         f"{after}\n{ha_log(pair, 'a2')[-3000:]}")
    print(f"crash of a1 -> HAProxy serves the data from a2: {elapsed:.2f} s (3 replies in a row)")
    s2 = status(pair, "a2")
    assert s2["mode"] == "primary" and s2["serving"], s2
    assert status_codes(pair, "a2", "/primary") == {"HEAD": 200, "GET": 200}
