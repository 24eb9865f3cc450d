"""Session-wide collector of the failover figures (mirrord against keepalived), and the table made from them.

Ratios only mean something when both systems ran in the same session on the
same machine, so each benchmark records its crashes here; at session end the
collector (registered as a plugin by the ``failover_report`` fixture of
test_failover_speed.py) prints one markdown table and writes it to
``.benchmarks/latest-failover.md``.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SYSTEMS = ("mirrord", "keepalived")
IP_GOAL = 1.0      # mirrord IP takeover / keepalived's at the same interval: <= 1
REPLY_GOAL = 1.0   # first good reply - IP takeover: <= 1 s
FAST_INTERVAL, FAST_GOAL = 0.1, 0.35  # issue 7: at pingInterval 0.1 s the IP moves within 0.35 s (median)


@dataclass
class Row:
    ip_s: list[float] = field(default_factory=list)
    arp_s: list[float] = field(default_factory=list)
    reply_s: list[float] = field(default_factory=list)
    links_down_s: list[float] = field(default_factory=list)
    takeover: list[dict[str, Any]] = field(default_factory=list)  # mirrord: a2's last_takeover
    detect_s: list[float] = field(default_factory=list)           # mirrord: crash -> takeover began (from ha.log)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, unit: str = " s") -> str:
    return "–" if value is None else f"{value:.2f}{unit}"


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) if values else "–"


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


@dataclass
class FailoverReport:
    rows: dict[tuple[str, float], Row] = field(default_factory=dict)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    load_start: str = field(default_factory=lambda: _loadavg())
    notes: list[str] = field(default_factory=list)

    def row(self, system: str, interval: float) -> Row:
        return self.rows.setdefault((system, interval), Row())

    def empty(self) -> bool:
        return not any(r.ip_s for r in self.rows.values())

    def intervals(self) -> list[float]:
        return sorted({i for _, i in self.rows}, reverse=True)

    def ratio(self, interval: float) -> float | None:
        m = _median(self.row("mirrord", interval).ip_s)
        k = _median(self.row("keepalived", interval).ip_s)
        return None if m is None or not k else m / k

    def render(self) -> str:
        lines = [f"Run {self.started}; load average {self.load_start} at start, {_loadavg()} at end; "
                 f"kernel {platform.release()}; {_version(['keepalived', '--version'])}.",
                 "Seconds from the crash instant (a1 frozen by `lab crash`); median of the runs, runs in brackets.",
                 "",
                 "| interval | system | floating IP answers from a2 | first good reply from a2 | reply − IP | "
                 "a2's own view: detection / IP / serving |",
                 "|---|---|---|---|---|---|"]
        for interval in self.intervals():
            for system in SYSTEMS:
                r = self.rows.get((system, interval))
                if r is None or not r.ip_s:
                    continue
                ip, reply = _median(r.ip_s), _median(r.reply_s)
                gap = _median([b - a for a, b in zip(r.ip_s, r.reply_s)]) if r.reply_s else None
                own = "–"
                if r.takeover:
                    det = _median(r.detect_s)
                    own = (f"{_fmt(det)} / +{_median([t['ip_seconds'] for t in r.takeover]):.2f} s / "
                           f"+{_median([t['serving_seconds'] for t in r.takeover]):.2f} s")
                lines.append(f"| {interval:g} s | {system} | {_fmt(ip)} ({_runs(r.ip_s)}) | "
                             f"{_fmt(reply)} ({_runs(r.reply_s)}) | {_fmt(gap)} | {own} |")
        lines += ["", "| target | interval | value | goal | met? |", "|---|---|---|---|---|"]
        for interval in self.intervals():
            ratio = self.ratio(interval)
            lines.append(f"| IP takeover mirrord / keepalived | {interval:g} s | "
                         f"{'–' if ratio is None else f'{ratio:.2f}'} | ≤ {IP_GOAL:g} | {_met(ratio, IP_GOAL)} |")
        for interval in self.intervals():
            r = self.rows.get(("mirrord", interval))
            gap = _median([b - a for a, b in zip(r.ip_s, r.reply_s)]) if r and r.reply_s else None
            lines.append(f"| mirrord first good reply − IP takeover | {interval:g} s | {_fmt(gap)} | "
                         f"≤ {REPLY_GOAL:g} s | {_met(gap, REPLY_GOAL)} |")
        fast = _median(self.rows[("mirrord", FAST_INTERVAL)].ip_s) if ("mirrord", FAST_INTERVAL) in self.rows else None
        if fast is not None:
            lines.append(f"| mirrord crash → IP answers from a2 (median) | {FAST_INTERVAL:g} s | {_fmt(fast)} | "
                         f"≤ {FAST_GOAL:g} s | {_met(fast, FAST_GOAL)} |")
        if self.notes:
            lines += [""] + [f"* {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    # -- pytest plugin hook (the fixture registers this object) -------------------------------
    def pytest_terminal_summary(self, terminalreporter: Any, config: Any) -> None:
        if self.empty():
            return
        text = self.render()
        path = Path(config.rootpath) / ".benchmarks" / "latest-failover.md"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        terminalreporter.write_sep("-", "mirrord failover against keepalived (this run)")
        terminalreporter.write_line(text)
        terminalreporter.write_line(f"written to {path}")


def _met(value: float | None, goal: float) -> str:
    if value is None:
        return "–"
    return "yes" if value <= goal else "**no**"


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"
