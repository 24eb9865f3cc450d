"""The nemesis: random faults with random timing against a pair under load, then recovery and a check.

One cycle: fio writes a verifiable file on the primary (acknowledged when
fio exits 0); the record writer starts on the primary; after a random delay
one fault from :data:`CATALOGUE` (chosen by the seeded ``random.Random``)
strikes and is lifted after a random hold; the writer is stopped; the pair
is brought back to "primary + UpToDate secondary" (:meth:`Pair.recover`);
then the two disk images must be identical (:meth:`Torture.check_disks`: a
secondary called UpToDate that differs is a loss that would only show at a
later failover), and the current primary's filesystem is scanned: every
record and fio file ever acknowledged must be there, intact and once.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import fiojob
from checker import Acked, Verdict, check
from pair import NODES, Pair, PairError, other

HERE = Path(__file__).resolve().parent
RECWRITER = str(HERE / "recwriter.py")
RECSCAN = str(HERE / "recscan.py")
WRITER_BOUND = 300.0   # seconds a writer may run at most (a cycle is much shorter)
BALLAST_MIB = 24       # written while the secondary is down before the mid-resync crash
FIO_KEPT = 3           # fio files kept (and verified again every cycle) before the oldest is removed
DISKS_SETTLE = 3.0     # seconds a difference between the in-sync images may last (a write in flight)
BLOCK = 4096


@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    inject: Callable[["Torture", str, str], str]   # (torture, primary, secondary) -> what happened


def _crash_primary(t: "Torture", p: str, s: str) -> str:
    t.lab.crash(p)
    return f"crashed {p} (primary), down {t.hold(1.0, 4.0):.1f} s"


def _crash_secondary(t: "Torture", p: str, s: str) -> str:
    t.lab.crash(s)
    return f"crashed {s} (secondary), down {t.hold(0.5, 4.0):.1f} s"


def _freeze(role: str) -> Callable[["Torture", str, str], str]:
    def inject(t: "Torture", p: str, s: str) -> str:
        node = p if role == "primary" else s
        t.lab.freeze(node)
        held = t.hold(0.3, 4.0)
        t.lab.thaw(node)
        return f"froze {node} ({role}) for {held:.1f} s"
    return inject


def _cut(which: str) -> Callable[["Torture", str, str], str]:
    def inject(t: "Torture", p: str, s: str) -> str:
        node = t.rng.choice((p, s))
        t.lab.cut(node, which)
        held = t.hold(0.5, 5.0)
        t.lab.heal(node, which)
        return f"cut {which} of {node} ({'primary' if node == p else 'secondary'}) for {held:.1f} s"
    return inject


def _disk_state(meta: Path) -> str | None:
    """The disk state in a node's volume metadata, read from the host (None while it is being replaced)."""
    try:
        return str(json.loads(meta.read_text())["disk_state"])
    except (OSError, ValueError, KeyError):
        return None


def _crash_secondary_mid_resync(t: "Torture", p: str, s: str) -> str:
    t.lab.crash(s)
    t.hold(0.5, 2.0)                 # the primary goes on alone: the returning secondary has work to catch up
    # Ballast written meanwhile makes that resync last long enough to be caught.
    t.lab.run(p, f"dd if=/dev/urandom of={t.pair.mount}/ballast bs=1M count={BALLAST_MIB} oflag=direct "
                 "conv=fsync status=none", timeout=120)
    t.lab.boot(s)
    meta = t.lab.home(s) / "r0.meta"
    rejoin = t.lab.popen(s, f"startHA {t.pair.ha_args()} --mount {t.pair.mount}", stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    # The secondary writes Inconsistent to its metadata before the first resync byte lands and
    # UpToDate when the resync ends: reading the file from the host catches that window.
    deadline = time.monotonic() + 20
    state = None
    while time.monotonic() < deadline and state != "Inconsistent":
        state = _disk_state(meta)
        time.sleep(0.002)
    t.lab.crash(s)
    rejoin.wait(timeout=60)
    caught = "mid-resync" if state == "Inconsistent" else f"with its disk {state} (the resync was not caught)"
    return f"crashed {s} (secondary), rejoined, crashed it again {caught}, down {t.hold(0.5, 2.0):.1f} s"


def _failover_under_load(t: "Torture", p: str, s: str) -> str:
    node = t.rng.choice(NODES)
    done = t.lab.run(node, "failOver", timeout=180)
    if done.returncode != 0:
        raise PairError(f"failOver on {node} exited {done.returncode}: {done.stdout}{done.stderr}\n{t.pair.logs()}")
    return f"failOver run on {node} ({'primary' if node == p else 'secondary'})"


def _double_fault(t: "Torture", p: str, s: str) -> str:
    t.lab.crash(s)
    alone = t.hold(0.5, 3.0)
    t.lab.crash(p)
    return f"crashed {s} (secondary), {alone:.1f} s later {p} (primary), down {t.hold(0.5, 2.0):.1f} s"


CATALOGUE: tuple[Fault, ...] = (
    Fault("crash-primary", "power loss of the primary", _crash_primary),
    Fault("crash-secondary", "power loss of the secondary", _crash_secondary),
    Fault("freeze-primary", "the primary hangs (lab freeze) for 0.3-4 s", _freeze("primary")),
    Fault("freeze-secondary", "the secondary hangs for 0.3-4 s", _freeze("secondary")),
    Fault("cut-sync", "the sync link of a random appliance down for 0.5-5 s", _cut("sync")),
    Fault("cut-public", "the public link of a random appliance down for 0.5-5 s", _cut("public")),
    Fault("cut-all", "every link of a random appliance down for 0.5-5 s (witness configured)", _cut("all")),
    Fault("crash-secondary-mid-resync", "the secondary crashes, rejoins, and crashes again while it resyncs",
          _crash_secondary_mid_resync),
    Fault("failover-under-load", "failOver on a random appliance while the writer writes", _failover_under_load),
    Fault("double-fault", "the secondary crashes, then the primary", _double_fault),
)


@dataclass
class CycleResult:
    cycle: int
    fault: str
    happened: str
    primary_before: str
    primary_after: str
    verdict: Verdict
    fio_ok: int
    seconds: float


@dataclass
class Torture:
    lab: Any
    pair: Pair
    rng: random.Random
    out_dir: Path                       # on the host, outside the appliances: the acknowledgements
    say: Callable[[str], None] = print
    acked: Acked = field(default_factory=Acked)
    fio_files: list[fiojob.FioFile] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    results: list[CycleResult] = field(default_factory=list)

    def hold(self, low: float, high: float) -> float:
        seconds = self.rng.uniform(low, high)
        time.sleep(seconds)
        return seconds

    def cycle(self, n: int) -> CycleResult:
        started = time.monotonic()
        fault = self.rng.choice(CATALOGUE)
        p = self.pair.recover(bound=60)
        s = other(p)
        fio_file = fiojob.FioFile(f"{self.pair.mount}/fio-c{n:04d}.dat", self.rng.randrange(1, 2**31))
        ok, why = fiojob.write(self.lab, p, fio_file)
        if not ok:
            raise PairError(f"cycle {n}: fio could not write on the healthy primary {p}: {why}")
        self.fio_files.append(fio_file)
        ack_path = self.out_dir / f"c{n:04d}.acks"
        with ack_path.open("w") as out:
            writer = self.lab.popen(p, [sys.executable, RECWRITER, str(self.pair.mount), str(n),
                                        str(WRITER_BOUND)], stdout=out, stderr=subprocess.STDOUT)
        self.hold(0.3, 2.5)
        happened = fault.inject(self, p, s)
        self.faults[fault.name] += 1
        self.say(f"cycle {n}: {fault.name}: {happened}")
        self._stop(writer, p)
        self.acked.add_output(ack_path.read_text())
        primary = self.pair.recover()
        self.check_disks(n, f"{fault.name}: {happened}")
        verdict = self.check(primary)
        fio_ok = self.check_fio(primary)
        result = CycleResult(n, fault.name, happened, p, primary, verdict, fio_ok, time.monotonic() - started)
        self.results.append(result)
        self.say(f"cycle {n}: primary {p} -> {primary}; {verdict.summary()}; fio files verified {fio_ok}; "
                 f"{result.seconds:.1f} s")
        if not verdict.ok:
            raise AssertionError(f"cycle {n} ({fault.name}: {happened}) lost data on {primary}: {verdict.summary()}\n"
                                 f"missing: {verdict.missing[:10]}\ncorrupted: {verdict.corrupted[:10]}\n"
                                 f"duplicated: {verdict.duplicated[:10]}\n{self.pair.logs()}")
        return result

    def _stop(self, writer: subprocess.Popen[Any], node: str) -> None:
        if writer.poll() is None:
            writer.kill()
        try:
            writer.wait(timeout=60)
        except subprocess.TimeoutExpired:  # an unkillable writer: its I/O hangs in the kernel
            raise PairError(f"the writer on {node} did not die within 60 s of SIGKILL\n{self.pair.logs()}") from None

    def check_disks(self, n: int, fault: str) -> None:
        """Both images identical, block for block. The pair is in sync and nothing writes but the
        filesystem's own background work (a journal commit), which is mirrored before it completes:
        a difference still there after DISKS_SETTLE seconds is one the secondary will keep."""
        a, b = (self.lab.home(node) / "disk.img" for node in NODES)
        one, two = a.read_bytes(), b.read_bytes()
        differ = [o for o in range(0, max(len(one), len(two)), BLOCK) if one[o:o + BLOCK] != two[o:o + BLOCK]]
        deadline = time.monotonic() + DISKS_SETTLE
        # Only the blocks that differed are read again: a write in flight at one block settles in
        # milliseconds, while the filesystem may keep writing elsewhere.
        while differ and time.monotonic() < deadline:
            time.sleep(0.2)
            with a.open("rb") as fa, b.open("rb") as fb:
                now = {o: (os.pread(fa.fileno(), BLOCK, o), os.pread(fb.fileno(), BLOCK, o)) for o in differ}
            differ = [o for o, (x, y) in now.items() if x != y]
        if differ:
            zero = bytes(BLOCK)

            def which(o: int) -> str:
                x, y = now[o]
                return "a1 zeros" if x == zero else "a2 zeros" if y == zero else "both data"

            where = ", ".join(f"{o} ({which(o)})" for o in differ[:12])
            raise AssertionError(f"cycle {n} ({fault}): the pair is in sync, but {len(differ)} blocks of 4 KiB differ "
                                 f"between the images, e.g. at {where}\n{self.pair.logs()}")

    def check(self, primary: str) -> Verdict:
        done = self.lab.run(primary, [sys.executable, RECSCAN, str(self.pair.mount)], timeout=300)
        if done.returncode != 0:
            raise PairError(f"the scan on {primary} failed: {done.stderr[-2000:]}\n{self.pair.logs()}")
        return check(self.acked, json.loads(done.stdout))

    def check_fio(self, primary: str) -> int:
        for f in self.fio_files:
            ok, why = fiojob.verify(self.lab, primary, f)
            if not ok:
                raise AssertionError(f"fio file {f.path} (fsync'd before the fault) fails verification on "
                                     f"{primary}: {why}\n{self.pair.logs()}")
        verified = len(self.fio_files)
        while len(self.fio_files) > FIO_KEPT:
            fiojob.remove(self.lab, primary, self.fio_files.pop(0))
        return verified

    def report(self, seed: int, seconds: float) -> dict[str, Any]:
        last = self.results[-1].verdict if self.results else None
        return {
            "seed": seed, "cycles": len(self.results), "seconds": round(seconds, 1),
            "faults": dict(sorted(self.faults.items())),
            "records_acknowledged": last.acknowledged if last else 0,
            "records_present": last.present if last else 0,
            "missing": len(last.missing) if last else 0, "corrupted": len(last.corrupted) if last else 0,
            "duplicated": len(last.duplicated) if last else 0, "torn_unacknowledged": len(last.torn) if last else 0,
            "fio_files_verified": sum(r.fio_ok for r in self.results),
            "takeovers": sum(r.primary_before != r.primary_after for r in self.results),
            "log": [f"{r.cycle}: {r.fault}: {r.happened} -> {r.primary_after}" for r in self.results],
        }
