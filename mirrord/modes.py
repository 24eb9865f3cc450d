"""The IWD appliance modes and the only ways to move between them.

This module is pure: it knows nothing of disks or networks. Every mode change
in the daemon goes through :func:`transition`, so the table below is the whole
truth about which changes exist. The reasons matter as much as the edges:

* ``inconsistent`` is a secondary whose copy is incomplete (a sync was cut
  short). It may only become ``secondary`` again by finishing a sync, never
  ``primary``: promoting it would serve half-copied data.
* ``idle`` is an old primary after a graceful ``failOver``. It keeps its
  metadata, so it can become ``secondary`` of the new primary with a bitmap
  resync, but it never becomes ``primary`` directly: the other appliance owns
  the data now.
* ``standalone`` is where every appliance starts, where ``stopHA`` leads from
  anywhere, and where an old primary comes back after a crash or a step-down.
"""

from __future__ import annotations

import enum

from mirrord.errors import Refused


class Mode(str, enum.Enum):
    STANDALONE = "standalone"
    PRIMARY = "primary"
    SECONDARY = "secondary"
    IDLE = "idle"
    INCONSISTENT = "inconsistent"

    def __str__(self) -> str:
        return self.value


class Event(str, enum.Enum):
    START_PRIMARY = "startHA as primary"
    START_SECONDARY = "startHA as secondary"
    SYNC_DONE = "initial sync complete"
    SYNC_INTERRUPTED = "sync interrupted"
    TAKEOVER = "takeover"
    FAILOVER_DEMOTE = "failOver (giving up primary)"
    FAILOVER_PROMOTE = "failOver (becoming primary)"
    STEP_DOWN = "step down"
    STOP = "stopHA"

    def __str__(self) -> str:
        return self.value


M, E = Mode, Event

#: (mode, event) -> next mode. Anything absent is refused.
TRANSITIONS: dict[tuple[Mode, Event], Mode] = {
    (M.STANDALONE, E.START_PRIMARY): M.PRIMARY,
    (M.STANDALONE, E.START_SECONDARY): M.SECONDARY,
    (M.IDLE, E.START_SECONDARY): M.SECONDARY,
    (M.INCONSISTENT, E.START_SECONDARY): M.SECONDARY,
    (M.SECONDARY, E.SYNC_INTERRUPTED): M.INCONSISTENT,
    (M.INCONSISTENT, E.SYNC_DONE): M.SECONDARY,
    (M.SECONDARY, E.SYNC_DONE): M.SECONDARY,
    (M.SECONDARY, E.TAKEOVER): M.PRIMARY,
    (M.SECONDARY, E.FAILOVER_PROMOTE): M.PRIMARY,
    (M.PRIMARY, E.FAILOVER_DEMOTE): M.IDLE,
    (M.PRIMARY, E.STEP_DOWN): M.STANDALONE,
    (M.SECONDARY, E.STEP_DOWN): M.STANDALONE,
    **{(mode, E.STOP): M.STANDALONE for mode in Mode},
}

_WHY_NOT: dict[tuple[Mode, Event], str] = {
    (M.INCONSISTENT, E.TAKEOVER): "its copy of the disk is incomplete (a sync was interrupted); "
    "finish the sync with startHA first",
    (M.INCONSISTENT, E.FAILOVER_PROMOTE): "its copy of the disk is incomplete (a sync was interrupted); "
    "finish the sync with startHA first",
    (M.IDLE, E.TAKEOVER): "an idle appliance gave up the primary role; run startHA on it to make it secondary",
    (M.PRIMARY, E.START_PRIMARY): "HA is already running here as primary; use configureHA to change settings "
    "or stopHA first",
    (M.PRIMARY, E.START_SECONDARY): "HA is already running here as primary; use failOver to switch roles "
    "or stopHA first",
    (M.SECONDARY, E.START_SECONDARY): "HA is already running here as secondary; use configureHA to change "
    "settings or stopHA first",
    (M.SECONDARY, E.START_PRIMARY): "HA is already running here as secondary; use failOver to switch roles "
    "or stopHA first",
    (M.STANDALONE, E.FAILOVER_DEMOTE): "HA is not running on this appliance; start it with startHA",
    (M.STANDALONE, E.FAILOVER_PROMOTE): "HA is not running on this appliance; start it with startHA",
}


def transition(mode: Mode, event: Event) -> Mode:
    """The mode after ``event``, or :class:`Refused` with one sentence saying why not."""
    try:
        return TRANSITIONS[(mode, event)]
    except KeyError:
        reason = _WHY_NOT.get((mode, event), f"that is not possible from mode {mode}")
        raise Refused(f"Cannot do {event} while {mode}: {reason}.") from None


def allowed(mode: Mode, event: Event) -> bool:
    return (mode, event) in TRANSITIONS
