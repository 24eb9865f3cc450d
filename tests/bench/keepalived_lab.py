"""keepalived (VRRPv3) in the namespace lab: the baseline the failover benchmark compares with.

Each appliance runs its own keepalived from a config file, pid files and a
log of ours in a temporary directory, so two instances on one host never
share a file::

    keepalived -n -l -D -G -P -f CFG -p PID -r VRRP_PID

(``-n`` stay in the foreground, ``-l`` log to the console, ``-D`` detailed
log, ``-G`` no syslog, ``-P`` VRRP subsystem only). One VRRP instance:
unicast adverts over the public network to the peer's own address, the
floating IP 198.18.0.10/24 on eth0, priority 150 on a1 and 100 on a2, both
starting in BACKUP (a1 wins the election), ``advert_int`` = the interval
under test. A VRRP backup declares the master dead after the RFC 5798
Master_Down_Interval = 3 x advert_int + (256 - priority) x advert_int / 256.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from failover_lab import IFACE, PUBLIC, VIP, VIP_PREFIX, holds_vip

PRIORITY = {"a1": 150, "a2": 100}
VIRTUAL_ROUTER_ID = 51
STOP_TIMEOUT = 10.0


def keepalived_binary() -> str | None:
    return shutil.which("keepalived") or next(
        (p for p in ("/usr/sbin/keepalived", "/sbin/keepalived") if os.path.exists(p)), None)


def master_down_interval(advert_int: float, priority: int = PRIORITY["a2"]) -> float:
    """RFC 5798 6.1: how long a backup waits for adverts before it takes over."""
    return 3 * advert_int + (256 - priority) * advert_int / 256


def config(node: str, advert_int: float) -> str:
    peer = "a2" if node == "a1" else "a1"
    return f"""\
global_defs {{
    router_id mirrord_bench_{node}
    vrrp_version 3
}}

vrrp_instance mirrord_bench {{
    state BACKUP
    interface {IFACE}
    virtual_router_id {VIRTUAL_ROUTER_ID}
    priority {PRIORITY[node]}
    advert_int {advert_int:g}
    unicast_src_ip {PUBLIC[node]}
    unicast_peer {{
        {PUBLIC[peer]}
    }}
    virtual_ipaddress {{
        {VIP}/{VIP_PREFIX} dev {IFACE}
    }}
}}
"""


@dataclass
class Keepalived:
    node: str
    proc: subprocess.Popen[Any]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(lab: Any, node: str, advert_int: float, workdir: Path) -> Keepalived:
    """keepalived in ``node`` with a config of its own under ``workdir``; its output goes to a log there."""
    binary = keepalived_binary()
    assert binary is not None, "keepalived is not installed"
    d = workdir / node
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "keepalived.conf"
    cfg.write_text(config(node, advert_int))
    for stale in ("keepalived.pid", "vrrp.pid"):
        (d / stale).unlink(missing_ok=True)
    log = d / "keepalived.log"
    out = log.open("ab")
    try:
        proc = lab.popen(node, [binary, "-n", "-l", "-D", "-G", "-P", "-f", str(cfg),
                                "-p", str(d / "keepalived.pid"), "-r", str(d / "vrrp.pid")],
                         stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()
    return Keepalived(node, proc, log)


def stop(lab: Any, k: Keepalived) -> None:
    """SIGTERM (keepalived then drops the floating IP), SIGKILL if it does not end in time.

    Bounded; if the node still holds the floating IP afterwards, it is rebooted
    (a lab boot kills every process of the node and removes every added address).
    """
    if k.alive():
        k.proc.terminate()
        try:
            k.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            k.proc.kill()
            k.proc.wait(timeout=5)
    if lab.run(k.node, "true").returncode == 0 and (holds_vip(lab, k.node) or _vrrp_left(k)):
        lab.boot(k.node)


def _vrrp_left(k: Keepalived) -> bool:
    """keepalived's VRRP child still running (its pid file names it; the lab shares the host's pids)."""
    pidfile = k.log.parent / "vrrp.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
        return b"keepalived" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return False


def wait_master(lab: Any, master: Keepalived, backup: Keepalived, timeout: float) -> None:
    """Until ``master`` holds the floating IP and ``backup`` does not (bounded)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for k in (master, backup):
            assert k.alive(), f"keepalived in {k.node} exited {k.proc.returncode}:\n{k.log_tail()}"
        if holds_vip(lab, master.node) and not holds_vip(lab, backup.node):
            return
        time.sleep(0.1)
    raise AssertionError(f"keepalived in {master.node} never became master alone within {timeout:g} s:\n"
                         f"{master.node}: {master.log_tail()}\n{backup.node}: {backup.log_tail()}")
