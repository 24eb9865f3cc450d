"""The HA loop's brain: one tick turns facts into at most one mode event and one sentence.

:func:`decide` is pure. The daemon gathers :class:`Facts`, calls it, applies
the event (through :mod:`mirrord.modes`) and writes the sentence to ha.log
whenever it differs from the previous tick's, so ha.log reads as a story of
what changed and why, and tests assert on the same sentences.
"""

from __future__ import annotations

from dataclasses import dataclass

from mirrord.modes import Event, Mode
from mirrord.replication.meta import DiskState


@dataclass(frozen=True)
class Facts:
    mode: Mode
    peer_connected: bool
    disk_state: DiskState
    sync_percent: float
    sync_started: bool = False


@dataclass(frozen=True)
class Decision:
    event: Event | None
    sentence: str


def decide(f: Facts) -> Decision:
    if f.mode is Mode.SECONDARY:
        if f.disk_state is DiskState.INCONSISTENT and not f.peer_connected and f.sync_started:
            return Decision(Event.SYNC_INTERRUPTED,
                            f"Sync from the primary interrupted at {f.sync_percent:.1f} %: this appliance is now "
                            "inconsistent and will not be promoted until a sync completes.")
        if not f.peer_connected:
            return Decision(None, "Secondary: the primary is not connected; waiting for it.")
        if f.disk_state is DiskState.INCONSISTENT:
            return Decision(None, "Secondary: receiving the initial sync from the primary.")
        return Decision(None, "Secondary: in sync with the primary; every write is mirrored here.")
    if f.mode is Mode.INCONSISTENT:
        if f.peer_connected and f.disk_state is DiskState.UP_TO_DATE:
            return Decision(Event.SYNC_DONE, "Sync from the primary completed: secondary again, UpToDate.")
        if f.peer_connected:
            return Decision(None, "Inconsistent: the primary is back and a sync is running.")
        return Decision(None, "Inconsistent: waiting for the primary to finish the sync.")
    if f.mode is Mode.PRIMARY:
        if not f.peer_connected:
            return Decision(None, "Primary: the secondary is not connected; serving alone, writes are NOT "
                                  "mirrored (degraded).")
        if f.sync_percent < 100.0:
            return Decision(None, "Primary: the secondary is connected; initial sync running.")
        return Decision(None, "Primary: the secondary is connected and in sync; writes are mirrored.")
    if f.mode is Mode.IDLE:
        return Decision(None, "Idle: gave up the primary role; run startHA to become the new secondary.")
    return Decision(None, "Standalone: HA is not running on this appliance.")
