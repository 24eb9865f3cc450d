"""HAstatus without --json: a compact tree in the style of ``drbdadm status``.

Everything here is pure: it turns the daemon's status JSON (one sample, or two
samples for a rate and an ETA) into text, so it is tested with status dicts
alone. Example of a primary whose secondary is syncing::

    r0 mode:primary role:Primary version:0.1.0
      disk:UpToDate /var/lib/mirrord/disk.img
      floating-ip:198.18.0.10/24 held-here:yes serving:yes
      peer 198.19.0.2 connection:Connected
        replication:SyncSource peer-disk:Inconsistent done:42.10% rate:12.0MiB/s eta:0:00:05
        [########............] 42.10%
      Primary: the secondary is connected; initial sync running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BAR_WIDTH = 40


@dataclass(frozen=True)
class Progress:
    """Sync speed measured between two status samples (None where it cannot be told)."""

    rate_bps: float | None
    eta_s: float | None


def syncing(s: dict[str, Any]) -> bool:
    """A sync is running: the peer is connected and the secondary's copy is not complete."""
    done = (s.get("disk") or {}).get("sync_percent")
    return bool(s.get("peer_connected")) and s.get("mode") in ("primary", "secondary", "inconsistent") \
        and isinstance(done, (int, float)) and done < 100.0


def in_sync(s: dict[str, Any]) -> bool:
    """The pair is connected and the secondary's copy complete (a failOver may run)."""
    done = (s.get("disk") or {}).get("sync_percent")
    return bool(s.get("peer_connected")) and s.get("mode") in ("primary", "secondary") \
        and isinstance(done, (int, float)) and done >= 100.0


def _moved_bytes(s: dict[str, Any]) -> int | None:
    """A counter that grows with the sync: bytes sent by the primary, applied by the secondary."""
    rep = s.get("replication") or {}
    value = rep.get("bytes_synced") if s.get("mode") == "primary" else rep.get("bytes_applied")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def progress(before: dict[str, Any], after: dict[str, Any], seconds: float) -> Progress:
    """Rate and ETA of the sync between two samples taken ``seconds`` apart."""
    if seconds <= 0 or not syncing(after) or not syncing(before) or before.get("mode") != after.get("mode"):
        return Progress(None, None)
    rate: float | None = None
    moved = (_moved_bytes(before), _moved_bytes(after))
    if moved[0] is not None and moved[1] is not None and moved[1] >= moved[0]:
        rate = (moved[1] - moved[0]) / seconds
    pct0 = float(before["disk"]["sync_percent"])
    pct1 = float(after["disk"]["sync_percent"])
    eta: float | None = None
    rep = after.get("replication") or {}
    left = _dirty_bytes(rep)
    if after.get("mode") == "primary" and left is not None and rate:
        eta = left / rate
    elif pct1 > pct0:
        eta = (100.0 - pct1) / ((pct1 - pct0) / seconds)
    return Progress(rate, eta)


def _dirty_bytes(rep: dict[str, Any]) -> int | None:
    blocks, size = rep.get("dirty_blocks"), rep.get("dirty_granularity")
    if isinstance(blocks, int) and isinstance(size, int):
        return blocks * size
    return None


def human_rate(bps: float) -> str:
    for unit, scale in (("GiB/s", 1 << 30), ("MiB/s", 1 << 20), ("KiB/s", 1 << 10)):
        if bps >= scale:
            return f"{bps / scale:.1f}{unit}"
    return f"{bps:.0f}B/s"


def human_eta(seconds: float) -> str:
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def progress_bar(percent: float, width: int = BAR_WIDTH) -> str:
    percent = min(100.0, max(0.0, percent))
    filled = int(width * percent / 100.0)
    return f"[{'#' * filled}{'.' * (width - filled)}] {percent:.2f}%"


def _replication_state(s: dict[str, Any]) -> tuple[str, str]:
    """(replication, the peer's disk) as DRBD names them, from this appliance's side."""
    mode = s.get("mode")
    done = float((s.get("disk") or {}).get("sync_percent") or 0.0)
    if mode == "primary":
        return ("SyncSource", "Inconsistent") if done < 100.0 else ("Established", "UpToDate")
    return ("SyncTarget", "UpToDate") if done < 100.0 else ("Established", "UpToDate")


def _networks(s: dict[str, Any]) -> str | None:
    """One entry per heartbeat network; None when there are no heartbeats (standalone)."""
    beats = s.get("heartbeat") or {}
    if not beats:
        return None
    ping = float((s.get("settings") or {}).get("ping_interval") or 1.0)
    parts = []
    for name in sorted(beats):
        silent = (beats[name] or {}).get("silent_for")
        if silent is None:
            parts.append(f"{name}:never-heard")
        elif silent >= ping:
            parts.append(f"{name}:SILENT {silent:.1f}s")
        else:
            parts.append(f"{name}:ok")
    return " ".join(parts)


def _volume_line(v: dict[str, Any], mode: str) -> str:
    line = f"    volume:{v.get('name')} disk:{v.get('state') or '-'} {v.get('disk')}"
    if v.get("mount"):
        line += f" mount:{v['mount']}"
    if mode in ("primary", "secondary", "inconsistent"):
        if not v.get("peer_connected"):
            line += " connection:down"
        elif float(v.get("sync_percent") or 0.0) < 100.0:
            line += f" done:{float(v['sync_percent']):.2f}%"
    return line


def render_status(summary: str, s: dict[str, Any], speed: Progress | None = None, bar: bool = False) -> str:
    """The tree; ``speed`` adds rate and ETA to a running sync, ``bar`` a progress bar (--watch)."""
    disk = s.get("disk") or {}
    settings = s.get("settings") or {}
    mode = s.get("mode") or "unknown"
    volume = settings.get("volume") or "r0"
    role = "Primary" if mode == "primary" else "Secondary" if mode in ("secondary", "inconsistent") else "-"
    head = f"{volume} mode:{mode} role:{role}"
    if s.get("version"):
        head += f" version:{s['version']}"
    lines = [head]
    volumes = s.get("volumes") or []
    if len(volumes) > 1:  # one line per volume, as drbdadm status lists a resource's volumes
        lines.append(f"  disk:{disk.get('state') or '-'} ({len(volumes)} volumes, the worst counts)")
        lines += [_volume_line(v, mode) for v in volumes]
    else:
        lines.append(f"  disk:{disk.get('state') or '-'}" + (f" {disk['path']}" if disk.get("path") else ""))
    if settings.get("floating_ip"):
        serving = f" serving:{'yes' if s.get('serving') else 'no'}" if mode == "primary" else ""
        lines.append(f"  floating-ip:{settings['floating_ip']} held-here:{'yes' if s.get('floating_ip_held') else 'no'}"
                     + serving)
    if mode == "standalone" and disk.get("following") and disk.get("state") == "UpToDate":
        lines.append("  last the secondary's copy, or crashed as primary: the peer may have written without it "
                     "since; startHA makes it primary only if the peer answers with an older copy, or with --force")
    if s.get("split_brain"):
        detail = s["split_brain"] if isinstance(s["split_brain"], str) else "both copies changed independently"
        lines.append(f"  SPLIT BRAIN: {detail}; neither copy is synced over the other")
    if mode != "standalone":
        lines += _peer_lines(s, speed, bar)
    if s.get("degraded"):
        lines.append("  DEGRADED: the secondary is not connected; writes are NOT mirrored")
    if s.get("settings_mismatch"):
        lines.append(f"  settings differ from the peer's: {', '.join(s['settings_mismatch'])} (run configureHA on both)")
    if s.get("witness_ok") is False:
        lines.append("  witness: not answering")
    app = s.get("app") or {}
    if app.get("monitored"):
        lines.append(f"  app: {'healthy' if app.get('healthy') else 'NOT healthy'} restarts:{app.get('restarts', 0)}")
    if s.get("busy"):
        lines.append(f"  busy: {s['busy']}")
    if summary:
        lines.append(f"  {summary}")
    return "\n".join(lines)


def _peer_lines(s: dict[str, Any], speed: Progress | None, bar: bool) -> list[str]:
    beats = s.get("heartbeat") or {}
    peer_ip = (beats.get("sync") or {}).get("peer") or (beats.get("public") or {}).get("peer") or "peer"
    if not s.get("peer_connected"):
        connection = "Connecting" if s.get("mode") == "primary" else "WFConnection"
        lines = [f"  peer {peer_ip} connection:{connection}"]
        if s.get("peer_error"):
            lines.append(f"    last error: {s['peer_error']}")
    else:
        replication, peer_disk = _replication_state(s)
        done = float((s.get("disk") or {}).get("sync_percent") or 0.0)
        detail = f"replication:{replication}"
        if s.get("mode") == "primary":
            detail += f" peer-disk:{peer_disk}"
        if syncing(s):
            detail += f" done:{done:.2f}%"
            if speed is not None and speed.rate_bps is not None:
                detail += f" rate:{human_rate(speed.rate_bps)}"
            if speed is not None and speed.eta_s is not None:
                detail += f" eta:{human_eta(speed.eta_s)}"
        lines = [f"  peer {peer_ip} connection:Connected", f"    {detail}"]
        if bar and syncing(s):
            lines.append(f"    {progress_bar(done)}")
    networks = _networks(s)
    if networks:
        lines.append(f"    networks: {networks}")
    return lines
