"""The namespace lab for the failover benchmarks: mirrord pairs, the test application, the probe.

The lab itself (``make_lab``, ``LabHandle``) and the HA helpers (``hactl``)
live in tests/lab; they are loaded here from their files under names of
their own (``mirrord_lab_fixtures``, ``mirrord_lab_hactl``), so that
tests/bench does not import a module called ``conftest`` and nothing is
added to sys.path.
"""

from __future__ import annotations

import importlib.util
import json
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from mirrord.net import lab as labmod

LAB_TESTS = Path(__file__).resolve().parents[1] / "lab"
PROBE = str(Path(__file__).with_name("failover_probe.py"))

VIP = "198.18.0.10"
VIP_PREFIX = 24
PUBLIC = {"a1": "198.18.0.11", "a2": "198.18.0.12"}
SYNC = {"a1": "198.19.0.1", "a2": "198.19.0.2"}
IFACE = "eth0"
APP_PORT = 8080


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


labfix = _load("mirrord_lab_fixtures", LAB_TESTS / "conftest.py")
hactl = _load("mirrord_lab_hactl", LAB_TESTS / "hactl.py")
make_lab = labfix.make_lab
require_lab_prerequisites = labfix.require_lab_prerequisites


# -- the application ------------------------------------------------------------------------




def install_app(lab: Any) -> None:
    hactl.install_named_app(lab, APP_PORT)


@contextmanager
def lab_with_app(tmp_path_factory: Any, name: str) -> Iterator[Any]:
    """A fresh lab (64 MiB disks) with the test application installed on both appliances."""
    require_lab_prerequisites()
    with make_lab(tmp_path_factory.mktemp(name), "64M") as handle:
        install_app(handle)
        yield handle


# -- mirrord pairs --------------------------------------------------------------------------


def ha_args(ping_interval: float) -> str:
    return (f"--primary-ip {PUBLIC['a1']} --secondary-ip {PUBLIC['a2']} "
            f"--primary-sync-ip {SYNC['a1']} --secondary-sync-ip {SYNC['a2']} "
            f"--floating-ip {VIP}/{VIP_PREFIX} --ping-interval {ping_interval:g} --disk $MIRRORD_HOME/disk.img "
            "--mount $MIRRORD_HOME/mnt --start-script $MIRRORD_HOME/app.sh --stop-script $MIRRORD_HOME/app.sh")


def start_mirrord_pair(lab: Any, ping_interval: float) -> None:
    """a2 secondary, a1 primary with a fresh ext4, in sync; the application runs on a1."""
    for node in ("a2", "a1"):
        lab.run(node, "mkdir -p $MIRRORD_HOME/mnt", check=True)
    for node, extra in (("a2", ""), ("a1", " --mkfs ext4")):
        done = lab.run(node, f"startHA {ha_args(ping_interval)}{extra}", timeout=120)
        assert done.returncode == 0, f"startHA on {node} exited {done.returncode}: {done.stdout}{done.stderr}"
    try:
        hactl.wait_status(lab, "a1", hactl.in_sync)
        hactl.wait_status(lab, "a2", lambda s: s["disk"]["state"] == "UpToDate")
    except AssertionError as exc:
        raise AssertionError(f"the pair (pingInterval {ping_interval:g} s) never got in sync: {str(exc)[:300]}\n"
                             f"--- a1 ha.log\n{ha_log_tail(lab, 'a1')}\n--- a2 ha.log\n{ha_log_tail(lab, 'a2')}") from None


def reset_nodes(lab: Any) -> None:
    """Both appliances powered, links healed, no HA, no daemon, no HA state (bounded)."""
    for node in ("a1", "a2"):
        lab.thaw(node)
        if lab.run(node, "true").returncode != 0:
            lab.boot(node)
        lab.heal(node, "all")
    hactl.stop_all(lab)
    hactl.forget_ha_state(lab)


def mac_of(lab: Any, node: str, iface: str = IFACE) -> str:
    done = lab.run(node, ["ip", "-j", "link", "show", "dev", iface], check=True)
    return str(json.loads(done.stdout)[0]["address"]).lower()


def holds_vip(lab: Any, node: str) -> bool:
    done = lab.run(node, ["ip", "-j", "-4", "addr", "show", "dev", IFACE], check=True)
    return any(a.get("local") == VIP for link in json.loads(done.stdout) for a in link.get("addr_info", []))


def ha_log_tail(lab: Any, node: str, lines: int = 40) -> str:
    """The last lines of a node's ha.log, without the HAstatus polling."""
    return "\n".join([l for l in hactl.ha_log(lab, node).splitlines() if " HAstatus[" not in l][-lines:])


# -- one crash, measured ---------------------------------------------------------------------


@dataclass
class Crash:
    """One crash of a1, seen from the client. Seconds count from the crash instant: the moment
    a1's processes were frozen by `lab crash` (no heartbeat or VRRP advert leaves a1 after it)."""
    ip_s: float                      # -> first echo reply from a2's MAC (the floating IP answers from a2)
    arp_s: float | None              # -> first ARP frame announcing the floating IP at a2's MAC
    reply_s: float | None            # -> first good application reply (the file, served by a2)
    links_down_s: float              # -> a1's last echo reply: its links went down (the lab's crash takes
                                     #    a while between freezing the node and taking its links down)
    command_s: float                 # `lab crash` started -> frozen (CLI start-up)
    raw: dict[str, Any] = field(default_factory=dict)


class FreezeWatch:
    """Polls a node's freezer cgroup from the host every millisecond: when did ``lab crash`` freeze it?"""

    def __init__(self, lab: Any, node: str) -> None:
        self.path = labmod.CGROUP_ROOT / lab.name / node / "freezer.state"
        self.frozen_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        end = time.monotonic() + 60.0
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                state = self.path.read_text().strip()
            except OSError:
                state = ""
            if state in ("FREEZING", "FROZEN"):
                self.frozen_at = time.monotonic()
                return
            time.sleep(0.001)

    def __enter__(self) -> "FreezeWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)


class ProbeRun:
    """The probe process in the client namespace, from READY to its JSON (always stopped)."""

    def __init__(self, lab: Any, old_mac: str, new_mac: str, http: str = "", want: str = "",
                 deadline: float = 30.0) -> None:
        argv = [sys.executable, PROBE, "--vip", VIP, "--iface", IFACE, "--old-mac", old_mac,
                "--new-mac", new_mac, "--deadline", str(deadline)]
        if http:
            argv += ["--http", http, "--want", want]
        self.deadline = deadline
        self.proc: subprocess.Popen[str] = lab.popen("client", argv, stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc.stdout is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line = self.proc.stdout.readline()
                if line.strip() == "READY":
                    return
                if not line:
                    break
                raise AssertionError(f"probe: {line.strip()}")
        self.stop()
        _, err = self.proc.communicate(timeout=10)
        raise AssertionError(f"the probe never saw a1 answer for {VIP}: {err[-2000:]}")

    def result(self) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=self.deadline + 15)
        finally:
            self.stop()
        lines = [l for l in out.splitlines() if l.startswith("{")]
        assert lines, f"the probe printed no result (exit {self.proc.returncode}): {err[-2000:]}"
        return json.loads(lines[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def crash_a1(lab: Any, probe: ProbeRun, explain: Callable[[], str] = lambda: "") -> Crash:
    """Crash a1 while the probe runs; the times of the first answers from a2.

    ``explain()`` is added to failure messages (e.g. a2's ha.log tail).
    """
    with FreezeWatch(lab, "a1") as watch:
        t_cmd = time.monotonic()
        lab.crash("a1")
        t_done = time.monotonic()
    r = probe.result()
    assert watch.frozen_at is not None, "never saw a1's freezer cgroup frozen during `lab crash`"
    t0 = watch.frozen_at
    last_old = r.get("last_old_echo")
    assert last_old is not None and t_cmd - 1.0 < last_old < t_done + 0.05, \
        f"a1 did not answer up to the crash (last echo {last_old}, crash {t_cmd:.3f}..{t_done:.3f}): {r}"
    assert r.get("first_new_echo") is not None, f"{VIP} never answered from a2 after the crash: {r}\n{explain()}"

    def since(key: str) -> float | None:
        t = r.get(key)
        return None if t is None else round(t - t0, 4)

    return Crash(ip_s=since("first_new_echo") or 0.0, arp_s=since("first_new_arp"),
                 reply_s=since("first_new_http"), links_down_s=round(last_old - t0, 4),
                 command_s=round(t0 - t_cmd, 4), raw={**r, "frozen_at": t0, "crash_command_s": round(t_done - t_cmd, 4)})
