"""Session-wide collector of the write-path figures, and the table made from them.

Ratios only mean something when every variant ran in the same session on the
same machine, so each benchmark records its figures here and the session end
(tests/bench/conftest.py) prints one markdown table and writes it to
``.benchmarks/latest-write-path.md``.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from write_targets import LABELS
from write_workloads import CONCURRENT_WRITERS, PARALLEL_WRITERS, GiB, LatencySummary


@dataclass
class Throughput:
    bytes_per_round: int
    seconds: list[float]

    @property
    def mean_bps(self) -> float:
        return self.bytes_per_round / statistics.fmean(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        return (self.bytes_per_round / max(self.seconds), self.bytes_per_round / min(self.seconds))


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    unit: str
    goal: str  # ">= 0.8", "<= 100"

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        op, bound = self.goal.split()
        return self.value >= float(bound) if op == ">=" else self.value <= float(bound)


@dataclass
class WritePathReport:
    throughput: dict[str, Throughput] = field(default_factory=dict)
    dsync_ns: dict[str, list[int]] = field(default_factory=dict)  # every timed 4 KiB write
    dsync_wall: dict[str, float] = field(default_factory=dict)
    ack_us: dict[str, list[float]] = field(default_factory=dict)  # mirrored: mean peer round trip per frame
    notes: dict[str, str] = field(default_factory=dict)
    full_sync: Throughput | None = None
    loopback: Throughput | None = None
    disk_read: Throughput | None = None  # the image read sequentially, not cached (what a sync reads)
    round_trip: LatencySummary | None = None  # 127.0.0.1 ping-pong
    concurrent: dict[str, LatencySummary] = field(default_factory=dict)  # CONCURRENT_WRITERS at once
    concurrent_cpu_s: dict[str, float] = field(default_factory=dict)  # their busy CPU-s per write, all cores
    parallel: dict[str, Throughput] = field(default_factory=dict)  # 1 MiB writes, PARALLEL_WRITERS at once
    cpu_s: dict[str, list[float]] = field(default_factory=dict)  # 1 MiB rounds: busy CPU-s, all cores
    started: float = field(default_factory=time.time)
    load_at_start: str = field(default_factory=lambda: loadavg())

    def add_throughput(self, key: str, bytes_per_round: int, seconds: list[float]) -> None:
        self.throughput.setdefault(key, Throughput(bytes_per_round, [])).seconds.extend(seconds)

    def add_cpu(self, key: str, bytes_per_round: int, busy_seconds: list[float]) -> None:
        self.cpu_s.setdefault(key, []).extend(b * GiB / bytes_per_round for b in busy_seconds)

    def add_dsync(self, key: str, latencies_ns: list[int], wall_seconds: float) -> None:
        self.dsync_ns.setdefault(key, []).extend(latencies_ns)
        self.dsync_wall[key] = self.dsync_wall.get(key, 0.0) + wall_seconds

    @property
    def dsync(self) -> dict[str, LatencySummary]:
        return {k: LatencySummary.of(v, self.dsync_wall[k]) for k, v in self.dsync_ns.items() if v}

    def empty(self) -> bool:
        return not (self.throughput or self.dsync_ns or self.full_sync or self.loopback or self.round_trip
                    or self.concurrent or self.parallel)

    # ---- derived figures ----------------------------------------------------

    def _tp(self, key: str) -> float | None:
        t = self.throughput.get(key)
        return t.mean_bps if t else None

    def _lat(self, key: str) -> float | None:
        d = self.dsync.get(key)
        return d.mean_us if d else None

    @staticmethod
    def _ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    @staticmethod
    def _diff(a: float | None, b: float | None) -> float | None:
        return a - b if a is not None and b is not None else None

    def sync_bound(self) -> float | None:
        """min(disk, link): the disk as a sync uses it (read, not cached) when measured, else (a)'s writes."""
        disk = self.disk_read.mean_bps if self.disk_read else self._tp("a")
        figures = [f for f in (disk, self.loopback.mean_bps if self.loopback else None) if f]
        return min(figures) if figures else None

    def cpu_per_gib(self, key: str) -> float | None:
        figures = self.cpu_s.get(key)
        return statistics.fmean(figures) if figures else None

    def cpu_ceiling(self) -> float | None:
        """The highest 1 MiB (d)/(c) this machine's cores allow: (d) cannot take less wall time
        than its CPU time spread over every core, whatever overlaps (both appliances run here)."""
        c, d = self._tp("c"), self.cpu_per_gib("d")
        return (os.cpu_count() or 1) * GiB / c / d if c and d else None

    def scaling(self, key: str) -> float | None:
        """writes/s of CONCURRENT_WRITERS concurrent O_DSYNC writers over one writer's, variant key."""
        one, many = self.dsync.get(key), self.concurrent.get(key)
        return many.writes_per_s / one.writes_per_s if one and many else None

    def scaling_ceiling(self, key: str) -> float | None:
        """The highest scaling the cores allow: writes/s at every core busy for the CPU time
        one concurrent write took (writer threads included), over one writer's writes/s."""
        one, cpu = self.dsync.get(key), self.concurrent_cpu_s.get(key)
        return (os.cpu_count() or 1) / cpu / one.writes_per_s if one and cpu else None

    def targets(self) -> list[Target]:
        """Issue 3's first targets, then issue 7's raised ones (same figures, higher bars)."""
        tp_cb = self._ratio(self._tp("c"), self._tp("b"))
        tp_dc = self._ratio(self._tp("d"), self._tp("c"))
        lat_dc = self._diff(self._lat("d"), self._lat("c"))
        return [
            Target("#3: 1 MiB throughput (c)/(b): mirrord alone vs C passthrough_ll", tp_cb, "", ">= 0.8"),
            Target("#3: 1 MiB throughput (d)/(c): mirrored (tmpfs peer) vs alone", tp_dc, "", ">= 0.8"),
            Target("#3: 4 KiB O_DSYNC mean latency (d)-(c): cost of the peer", lat_dc, "µs", "<= 100"),
            Target("#7: 1 MiB throughput (c)/(b)", tp_cb, "", ">= 1.0"),
            Target("#7: 1 MiB throughput (d)/(c)", tp_dc, "", ">= 0.9"),
            Target("#7: 4 KiB O_DSYNC mean latency (d)-(c)", lat_dc, "µs", "<= 40"),
            Target(f"#7: {CONCURRENT_WRITERS} concurrent 4 KiB O_DSYNC writers / one writer, writes/s, (d)",
                   self.scaling("d"), "", ">= 4"),
            Target("#5/#7: full sync / min(disk, loopback TCP)",
                   self._ratio(self.full_sync.mean_bps, self.sync_bound()) if self.full_sync else None, "", ">= 0.8"),
        ]

    def informative(self) -> list[tuple[str, float | None, str]]:
        rows = [
            ("1 MiB throughput (b)/(a): FUSE passthrough vs local", self._ratio(self._tp("b"), self._tp("a")), ""),
            ("1 MiB throughput (c)/(a): mirrord alone vs local", self._ratio(self._tp("c"), self._tp("a")), ""),
            ("1 MiB throughput (e)/(c): mirrored (root-disk peer) vs alone",
             self._ratio(self._tp("e"), self._tp("c")), ""),
            ("ceiling of 1 MiB (d)/(c) on this machine's cores: nproc × (c) seconds ÷ (d) CPU-seconds",
             self.cpu_ceiling(), ""),
            (f"1 MiB throughput (d)/(c) with {PARALLEL_WRITERS} writers at once",
             self._ratio(*(self.parallel[k].mean_bps if k in self.parallel else None for k in ("d", "c"))), ""),
            ("4 KiB latency (b)-(a): FUSE passthrough vs local", self._diff(self._lat("b"), self._lat("a")), "µs"),
            ("4 KiB latency (c)-(b): mirrord alone vs passthrough_ll", self._diff(self._lat("c"), self._lat("b")), "µs"),
            ("4 KiB latency (e)-(c): root-disk peer", self._diff(self._lat("e"), self._lat("c")), "µs"),
            ("4 KiB median latency (d)-(c): cost of the peer, robust to disk-flush stalls",
             self._diff(*(self.dsync[k].p50_us if k in self.dsync else None for k in ("d", "c"))), "µs"),
        ]
        if self.full_sync:
            rows.append(("full sync / min(disk, loopback TCP)",
                         self._ratio(self.full_sync.mean_bps, self.sync_bound()), ""))
        return rows

    # ---- rendering ------------------------------------------------------------

    def render(self) -> str:
        gib = lambda bps: f"{bps / GiB:.2f}"  # noqa: E731
        out = ["# mirrord write path: figures from one run", ""]
        out += [f"- {k}: {v}" for k, v in machine().items()]
        out += [f"- load average (1/5/15 min) at start: {self.load_at_start}; at end: {loadavg()}"
                " (anything else running on the 2 cores skews every figure)"]
        out += ["", "| variant | 1 MiB writes + fsync, GiB/s (min–max of rounds) "
                "| 4 KiB O_DSYNC writes/s | mean µs | p50 µs | p99 µs | peer ack µs | notes |",
                "|---|---|---|---|---|---|---|---|"]
        dsync = self.dsync
        for key, label in LABELS.items():
            t, d = self.throughput.get(key), dsync.get(key)
            if t is None and d is None:
                continue
            tp = f"{gib(t.mean_bps)} ({gib(t.spread[0])}–{gib(t.spread[1])})" if t else "–"
            lat = (f"{d.writes_per_s:.0f} | {d.mean_us:.0f} | {d.p50_us:.0f} | {d.p99_us:.0f}" if d
                   else "– | – | – | –")
            ack = f"{statistics.fmean(self.ack_us[key]):.0f}" if self.ack_us.get(key) else "–"
            out.append(f"| ({key}) {label} | {tp} | {lat} | {ack} | {self.notes.get(key, '')} |")
        if self.cpu_s:
            out += ["", "| 1 MiB writes + fsync: CPU of the whole machine (/proc/stat, not idle or iowait) "
                    "| CPU-seconds per GiB | cores busy on average |", "|---|---|---|"]
            for key, label in LABELS.items():
                cpu, tp = self.cpu_per_gib(key), self._tp(key)
                if cpu is not None and tp:
                    out.append(f"| ({key}) {label} | {cpu:.2f} | {cpu * tp / GiB:.2f} of {os.cpu_count()} |")
        if self.concurrent:
            out += ["", f"| {CONCURRENT_WRITERS} concurrent 4 KiB O_DSYNC writers | writes/s (all writers) | mean µs "
                    "| p99 µs | × one writer's writes/s | CPU µs per write, whole machine | × one writer the cores "
                    "allow |", "|---|---|---|---|---|---|---|"]
            fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
            for key, c in self.concurrent.items():
                cpu = self.concurrent_cpu_s.get(key)
                out.append(f"| ({key}) {LABELS[key]} | {c.writes_per_s:.0f} | {c.mean_us:.0f} | {c.p99_us:.0f} | "
                           f"{fmt(self.scaling(key), '.2f')} | {fmt(cpu and cpu * 1e6, '.0f')} | "
                           f"{fmt(self.scaling_ceiling(key), '.2f')} |")
        if self.parallel:
            out += ["", f"| 1 GiB as 1 MiB writes by {PARALLEL_WRITERS} writers at once + fsync | GiB/s (min–max) |",
                    "|---|---|"]
            for key, t in self.parallel.items():
                out.append(f"| ({key}) {LABELS[key]} | {gib(t.mean_bps)} ({gib(t.spread[0])}–{gib(t.spread[1])}) |")
        if self.round_trip:
            r = self.round_trip
            out += ["", f"127.0.0.1 TCP round trip (64-byte ping-pong, Python both ends): mean {r.mean_us:.0f} µs, "
                    f"p50 {r.p50_us:.0f} µs, p99 {r.p99_us:.0f} µs; a mirrored O_DSYNC write needs one "
                    "(WRITE with F_SYNC → WRITE_ACK; the FLUSH that follows stays local)."]
        if self.full_sync or self.loopback:
            out += ["", "| full sync (1 GiB) | GiB/s (min–max) |", "|---|---|"]
            for name, t in (("start_sync over 127.0.0.1, replica on tmpfs, primary image not cached",
                             self.full_sync),
                            ("primary image read sequentially, 1 MiB reads, not cached", self.disk_read),
                            ("loopback TCP blast (Python, 1 MiB sends)", self.loopback)):
                if t:
                    out.append(f"| {name} | {gib(t.mean_bps)} ({gib(t.spread[0])}–{gib(t.spread[1])}) |")
            if self.sync_bound():
                disk = "image read" if self.disk_read else "local disk (a)"
                out.append(f"| bound = min({disk}, loopback) | {gib(self.sync_bound() or 0)} |")
        out += ["", "| target | value | goal | met |", "|---|---|---|---|"]
        for t in self.targets():
            value = "–" if t.value is None else f"{t.value:.2f}{(' ' + t.unit) if t.unit else ''}"
            met = {True: "yes", False: "**no**", None: "not measured"}[t.met]
            out.append(f"| {t.name} | {value} | {t.goal} {t.unit} | {met} |")
        out += ["", "| other ratios (no target) | value |", "|---|---|"]
        for name, value, unit in self.informative():
            out.append(f"| {name} | {'–' if value is None else f'{value:.2f}'}{(' ' + unit) if unit and value is not None else ''} |")
        return "\n".join(out) + "\n"


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def machine() -> dict[str, str]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    except (OSError, ValueError, IndexError):
        pass
    root = run("findmnt", "-no", "SOURCE,FSTYPE", "/")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "make bench  (.venv/bin/python -m pytest -q tests/bench --benchmark-only -p no:cacheprovider)",
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "root filesystem": root,
        "libfuse": run("pkg-config", "--modversion", "fuse3"),
        "python": sys.version.split()[0],
        "mirrord commit": run("git", "describe", "--always", "--dirty"),
    }
