"""`make demo`: the main job, end to end, in the namespace lab.

Two appliances come up, HA starts on both, a writer on the primary records
every write that was acknowledged, the primary loses power, the secondary
takes over, and every one of those writes is read back from the new primary. Each step prints what an
operator would type and what happened. The lab is removed at the end, also
when a step fails.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from typing import Any

LAB = "demo"
HA = ("--primary-ip 198.18.0.11 --secondary-ip 198.18.0.12 --primary-sync-ip 198.19.0.1 "
      "--secondary-sync-ip 198.19.0.2 --floating-ip 198.18.0.10/24 --ping-interval 1 "
      "--disk $MIRRORD_HOME/disk.img")
BLOCK = 4096
WRITER = r"""
import hashlib, mmap, os, sys
fd = os.open(os.environ["MIRRORD_HOME"] + "/dev/r0", os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
buf = mmap.mmap(-1, 4096)
n = 0
while True:
    head = f"demo block {n}\n".encode()
    buf.seek(0); buf.write((head + hashlib.sha256(head).digest() * 128)[:4096])
    os.pwrite(fd, buf, n * 4096)
    print(n, flush=True)
    n += 1
"""


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def mirrord(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "mirrord_cli", *args]
    if not capture:
        print("$ mirrord " + " ".join(args), flush=True)
    done = subprocess.run(argv, text=True, capture_output=capture, timeout=300)
    if check and done.returncode != 0:
        raise SystemExit(f"demo failed: `mirrord {' '.join(args)}` exited {done.returncode}"
                         + (f": {done.stderr.strip()}" if capture else ""))
    return done


def on(node: str, command: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    return mirrord("lab", "exec", "--name", LAB, node, "--", "sh", "-c", command, capture=capture)


def status(node: str) -> dict[str, Any]:
    return json.loads(on(node, "HAstatus --json", capture=True).stdout)


def wait(node: str, what: str, pred: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = status(node)
        if pred(s):
            return s
        time.sleep(0.5)
    raise SystemExit(f"demo failed: {node} did not reach '{what}' within {timeout:g} s")


def main() -> None:
    mirrord("lab", "down", "--name", LAB, check=False)
    try:
        step("Two appliances on one machine: a1 and a2, a client, a public network and a sync link")
        mirrord("lab", "up", "--name", LAB, "--disk-size", "256M")
        step("startHA on both appliances (the same command; each finds its role)")
        on("a2", f"startHA {HA}")
        on("a1", f"startHA {HA}")
        s = wait("a2", "initial sync complete", lambda s: s["disk"]["state"] == "UpToDate" and s["peer_connected"])
        print(f"a2: mode {s['mode']}, disk {s['disk']['state']}, sync {s['disk']['sync_percent']} %")
        step("A writer on a1 makes O_DSYNC writes and records each one only after it was acknowledged")
        argv = [sys.executable, "-m", "mirrord_cli", "lab", "exec", "--name", LAB, "a1", "--",
                sys.executable, "-c", WRITER]
        writer = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        time.sleep(3)
        step("Power loss on the primary a1")
        mirrord("lab", "crash", "--name", LAB, "a1")
        out, _ = writer.communicate(timeout=30)
        acked = [int(line) for line in out.split()]
        print(f"a1 acknowledged {len(acked)} writes before it died")
        step("a2 notices the silence on both networks and takes over")
        s = wait("a2", "primary and serving", lambda s: s["mode"] == "primary" and s["serving"], timeout=60)
        took = s.get("last_takeover") or {}
        print(f"a2 is primary; floating IP held: {s['floating_ip_held']}; "
              f"takeover took {took.get('serving_seconds', '?')} s after it decided")
        step("Every acknowledged write must be readable from the new primary")
        reader = ("import os, sys; fd = os.open(os.environ['MIRRORD_HOME'] + '/dev/r0', os.O_RDONLY); "
                  f"sys.stdout.buffer.write(os.pread(fd, {(max(acked) + 1) * BLOCK if acked else 0}, 0))")
        argv = [sys.executable, "-m", "mirrord_cli", "lab", "exec", "--name", LAB, "a2", "--",
                sys.executable, "-c", reader]
        image = subprocess.run(argv, capture_output=True, timeout=120, check=True).stdout
        lost = []
        for n in acked:
            head = f"demo block {n}\n".encode()
            if image[n * BLOCK:(n + 1) * BLOCK] != (head + hashlib.sha256(head).digest() * 128)[:BLOCK]:
                lost.append(n)
        print(f"checked {len(acked)} acknowledged writes on a2: {len(lost)} lost")
        print(on("a2", "HAstatus", capture=True).stdout)
        if lost or not acked:
            raise SystemExit("demo failed: acknowledged writes are missing on the survivor")
        print("demo passed: nothing acknowledged was lost")
    finally:
        step("Removing the lab")
        mirrord("lab", "down", "--name", LAB, check=False)


if __name__ == "__main__":
    main()
