"""The pair under torture: starting HA, reading modes, and bringing the pair back after a fault.

``recover`` is the operator of the runbook (docs/operations.md) as a loop:
power, cables and processes back; a node without HA runs ``startHA``; when
nobody serves (both appliances went down), the other appliance is started
as the secondary of the one that served last, then that one as primary
(its startHA refuses if the other's copy is newer; then the roles swap).
It ends when one appliance is a serving primary whose secondary is
connected and UpToDate, or fails, within a bounded time, with both ha.log
tails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

NODES = ("a1", "a2")
PUBLIC = {"a1": "198.18.0.11", "a2": "198.18.0.12"}
SYNC = {"a1": "198.19.0.1", "a2": "198.19.0.2"}
FLOATING = "198.18.0.10"
WITNESS = "198.18.0.100"  # the client namespace: without a witness, a cut of all links may make two primaries
PING_INTERVAL = 1.0
RECOVERY_BOUND = 180.0    # seconds for recover() before it gives up with the logs


def other(node: str) -> str:
    return "a2" if node == "a1" else "a1"


class PairError(AssertionError):
    """The pair did not reach the state the torture needs; the message carries both ha.log tails."""


class Pair:
    """Two appliances of a lab running HA with one mount point and one start/stop script."""

    def __init__(self, lab: Any, mount: Path, script: Path | None, say: Callable[[str], None] = print) -> None:
        self.lab = lab
        self.mount = mount              # one host directory; each node mounts the volume there in its own namespace
        self.script = script            # a path valid in both nodes, or None
        self.say = say
        self.named_primary = "a1"       # the appliance startHA calls --primary-ip
        self.last_primary = "a1"        # the appliance seen serving last: the newest data if both go down

    # commands ---------------------------------------------------------------

    def ha_args(self) -> str:
        p, s = self.named_primary, other(self.named_primary)
        args = (f"--primary-ip {PUBLIC[p]} --secondary-ip {PUBLIC[s]} --primary-sync-ip {SYNC[p]} "
                f"--secondary-sync-ip {SYNC[s]} --floating-ip {FLOATING}/24 --ping-interval {PING_INTERVAL:g} "
                f"--witness-ip {WITNESS} --disk $MIRRORD_HOME/disk.img")
        if self.script:
            args += f" --start-script {self.script} --stop-script {self.script}"
        return args

    def start_ha(self, node: str, mkfs: bool = False) -> bool:
        extra = " --mkfs ext4" if mkfs else ""
        done = self.lab.run(node, f"startHA {self.ha_args()} --mount {self.mount}{extra}", timeout=180)
        self.say(f"startHA on {node}: exit {done.returncode} {(done.stdout + done.stderr).strip()[-300:]}")
        return done.returncode == 0

    def stop_ha(self, node: str) -> None:
        done = self.lab.run(node, "stopHA", timeout=180)
        self.say(f"stopHA on {node}: exit {done.returncode} {(done.stdout + done.stderr).strip()[-200:]}")

    def status(self, node: str) -> dict[str, Any] | None:
        """HAstatus --json, or None when the node has no daemon (or no power)."""
        done = self.lab.run(node, "HAstatus --json", timeout=30)
        if done.returncode != 0:
            return None
        return json.loads(done.stdout)

    def alive(self, node: str) -> bool:
        return self.lab.run(node, "true", timeout=30).returncode == 0

    # states -----------------------------------------------------------------

    @staticmethod
    def serving(s: dict[str, Any] | None) -> bool:
        return bool(s and s["mode"] == "primary" and s.get("serving", True))

    @staticmethod
    def healthy(p: dict[str, Any] | None, s: dict[str, Any] | None) -> bool:
        return bool(Pair.serving(p) and p and p["peer_connected"] and p["disk"]["sync_percent"] >= 100.0
                    and s and s["mode"] == "secondary" and s["disk"]["state"] == "UpToDate")

    def start(self) -> None:
        """First start: a2 waits as secondary, a1 makes the filesystem and serves."""
        self.mount.mkdir(parents=True, exist_ok=True)
        if not (self.start_ha("a2") and self.start_ha("a1", mkfs=True)):
            raise PairError("startHA failed on a fresh pair:\n" + self.logs())
        self.recover()

    def logs(self, lines: int = 40) -> str:
        parts = []
        for node in NODES:
            path = self.lab.home(node) / "log" / "ha.log"
            # HAstatus polls would fill the excerpt: keep what the daemons and the other commands said
            text = [line for line in path.read_text(errors="replace").splitlines()
                    if " HAstatus[" not in line][-lines:] if path.exists() else ["(no ha.log)"]
            parts.append(f"--- {node} ha.log (last {lines} lines) ---\n" + "\n".join(text))
        return "\n".join(parts)

    # recovery ---------------------------------------------------------------

    def restore_hardware(self) -> None:
        for node in NODES:
            self.lab.thaw(node)
            if not self.alive(node):
                self.lab.boot(node)
            self.lab.heal(node, "all")

    def recover(self, bound: float = RECOVERY_BOUND) -> str:
        """Bring the pair back to a serving primary with an UpToDate secondary; returns the primary."""
        self.restore_hardware()
        deadline = time.monotonic() + bound
        tried: dict[str, float] = {}
        two_since = none_since = None
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            now = time.monotonic()
            last = {node: self.status(node) for node in NODES}
            primaries = [n for n in NODES if last[n] and last[n]["mode"] == "primary"]
            if len(primaries) == 2:
                two_since = two_since or now
                if now - two_since > 10 * PING_INTERVAL:  # one must step down within a few ticks
                    raise PairError(f"both appliances stay primary: {json.dumps(last)}\n{self.logs()}")
            elif len(primaries) == 1:
                two_since = none_since = None
                p = primaries[0]
                o = other(p)
                self.last_primary = p
                if self.healthy(last[p], last[o]):
                    return p
                mode = last[o]["mode"] if last[o] else None
                stuck = mode == "inconsistent" and not last[p]["peer_connected"]
                if (mode in (None, "standalone", "idle") or stuck) and now - tried.get(o, -1e9) > 10:
                    tried[o] = now
                    self.start_ha(o)
            else:
                none_since = none_since or now
                if now - none_since > 3 * PING_INTERVAL:  # no takeover under way: restart as an operator would
                    self.restart_both()
                    none_since = None
            time.sleep(0.3)
        raise PairError(f"the pair did not recover within {bound:g} s: {json.dumps(last)}\n{self.logs()}")

    def restart_both(self) -> None:
        """Nobody serves: as the operator's guide says (docs/operations.md, section 13), the other
        appliance first as the secondary of the one that served last, then that one, whose startHA
        compares the two copies over the heartbeats and refuses if the other's is newer (it took
        over before it went down too); then the other way round."""
        for first in (self.last_primary, other(self.last_primary)):
            self._stop_both()
            self.named_primary = first
            if self.start_ha(other(first)) and self.start_ha(first):
                return
        raise PairError(f"neither appliance could start as primary\n{self.logs()}")

    def _stop_both(self) -> None:
        for node in NODES:
            s = self.status(node)
            if s and s["mode"] != "standalone":
                self.stop_ha(node)
