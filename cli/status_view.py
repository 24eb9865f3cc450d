"""HAstatus without --json: a compact tree in the spirit of ``drbdadm status``."""

from __future__ import annotations

from typing import Any


def render_status(summary: str, s: dict[str, Any]) -> str:
    disk = s.get("disk") or {}
    settings = s.get("settings") or {}
    lines = [f"mode: {s.get('mode')}" + (f"  (configured as the {s['side']})" if s.get("side") else "")]
    if settings:
        lines.append(f"  floating-ip: {settings.get('floating_ip')}  held-here: {'yes' if s.get('floating_ip_held') else 'no'}")
    state = disk.get("state")
    done = disk.get("sync_percent")
    syncing = s.get("peer_connected") and done is not None and done < 100
    lines.append(f"  disk: {disk.get('path') or '-'}  disk:{state}" + (f"  done:{done:.2f}%" if syncing else ""))
    peer = "connected" if s.get("peer_connected") else "not connected"
    lines.append(f"  peer: {peer}" + (f"  ({s['peer_error']})" if s.get("peer_error") and not s.get("peer_connected") else ""))
    if summary:
        lines.append(f"  {summary}")
    return "\n".join(lines)
