"""The HA loop's brain: one tick turns facts into at most one action and one sentence.

:func:`decide` is pure. The daemon gathers :class:`Facts`, calls it, runs the
action (slow ones beside the loop, never inside it) and writes the sentence
to ha.log whenever it differs from the previous tick's, so ha.log reads as a
story of what changed and why, and tests assert on the same sentences.

Why the rules are what they are
-------------------------------
*Takeover* needs the primary silent on **both** networks for a whole
``pingInterval``: one silent network is a broken cable, not a dead primary.
It needs a completed sync from that primary since startHA (a secondary that
never received one holds someone else's data), an UpToDate disk (an Inconsistent or Outdated copy would serve
old or half-copied data) and at least one of our own links up (a node whose
cables are all out is the isolated one, not the survivor).

*Fencing.* The C data path suspends I/O the moment it loses the secondary:
the writes in flight are not acknowledged until this loop decides. The
primary may continue alone (resume degraded) only when the secondary can no
longer be promoted behind its back:

* it is heard on some network and says its disk is not UpToDate (it marked
  itself Outdated at our request, or it is Inconsistent), or
* it has been silent on both networks for ``pingInterval`` and a witness, if
  one is configured, still answers us. Without a witness this is the one
  window that remains: a secondary cut off on both networks but alive will
  take over while we continue, and writes acknowledged here after the cut
  are not on its disk. docs/operations.md says so; configure a witness.

If the other appliance says it is primary with a term (epoch) at least as
high as ours, the primary steps down at once. So it does after its own
process was stopped for longer than ``pingInterval`` (a hung machine that
wakes up cannot know what happened meanwhile) if the replication link is
gone and the secondary was UpToDate: a secondary that takes over stops
acknowledging first, so a link that still acknowledges proves it did not,
and one that was not UpToDate could not. (The daemon lets the process
settle for a moment after a stall before it gathers these facts, so the
data path has seen the peer's goodbye.) Stepping down means the held writes
fail and nothing more is acknowledged. Terms settle who yields when both
are primary for a moment (a hung primary wakes up and
says "primary" once before it notices): every promotion takes a term higher
than any it has heard of, so the newer primary never yields to the older.
After a partition both may have been primary for long and both copies
changed: the generation identifiers say split brain. The older term still
steps down, which only stops serving: the handshake refuses to sync over
either copy until an operator runs ``startHA --discard-my-data`` on one.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from mirrord.modes import Mode
from mirrord.replication.meta import DiskState


class Action(str, enum.Enum):
    NONE = "none"
    TAKEOVER = "take over"
    STEP_DOWN = "step down"
    RESUME_DEGRADED = "resume degraded"
    RESUME_MIRRORED = "release the held writes: the peer caught up"
    REQUEST_OUTDATE = "ask the peer to outdate itself"
    OUTDATE_SELF = "mark own disk Outdated"
    SYNC_INTERRUPTED = "sync interrupted"
    SYNC_DONE = "sync done"
    RESTART_APP = "restart the application"
    HAND_OVER = "hand over to the secondary"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Facts:
    mode: Mode
    disk_state: DiskState
    peer_connected: bool = False          # replication link up
    sync_percent: float = 0.0
    sync_started: bool = False
    synced: bool = True                   # secondary: a sync from the primary completed this session
    ping_interval: float = 1.0
    silent_sync: float = math.inf         # seconds since the peer was last heard on each network
    silent_public: float = math.inf
    peer_mode: str | None = None          # what the peer's latest heartbeat says it is
    peer_disk: str | None = None          # the disk state the peer's latest heartbeat reports
    epoch: int = 0                        # primary terms: each promotion takes a higher number
    peer_epoch: int = 0
    peer_wants_outdate: bool = False      # the primary asks us (secondary) to mark our disk Outdated
    request_predates_link: bool = False   # ... but we saw that request before our current link began
    clock_gap: float = 0.0                # longest stall of this process since the previous tick
    split_brain: bool = False             # the generation identifiers say both copies changed alone
    my_links_up: bool = True
    links_up_for: float = math.inf        # seconds since our own links came back up (inf: never down)
    io_suspended: bool = False            # the C data path holds writes after losing the peer
    link_synced: bool = False             # primary: every volume's current link finished its sync (and flush)
    verifying: bool = False               # primary: mirrord verify runs, and no hand-over may (decision 42)
    witness_ok: bool | None = None        # None: no witness configured
    busy: str | None = None               # a slow action already running beside the loop
    app_healthy: bool | None = None       # the OCF monitor's last answer (None: no monitor or not yet)
    app_restarts: int = 0
    restart_limit: int = 3


@dataclass(frozen=True)
class Decision:
    action: Action
    sentence: str


def _silence(f: Facts) -> float:
    return min(f.silent_sync, f.silent_public)


def _heard(f: Facts) -> bool:
    return _silence(f) < f.ping_interval


def _fmt(seconds: float) -> str:
    return "never heard" if math.isinf(seconds) else f"{seconds:.1f} s"


def decide(f: Facts) -> Decision:
    if f.busy:
        return Decision(Action.NONE, f"Busy: {f.busy}.")
    if f.mode is Mode.SECONDARY:
        return _secondary(f)
    if f.mode is Mode.INCONSISTENT:
        return _inconsistent(f)
    if f.mode is Mode.PRIMARY:
        return _primary(f)
    if f.mode is Mode.IDLE:
        return Decision(Action.NONE, "Idle: gave up the primary role; run startHA to become the new secondary.")
    return Decision(Action.NONE, "Standalone: HA is not running on this appliance.")


def _secondary(f: Facts) -> Decision:
    if f.disk_state is DiskState.INCONSISTENT and f.sync_started and not f.peer_connected:
        return Decision(Action.SYNC_INTERRUPTED, f"Sync from the primary interrupted at {f.sync_percent:.1f} %: "
                        "this appliance is now inconsistent and will not be promoted until a sync completes.")
    silence = _silence(f)
    if silence >= f.ping_interval:
        # Sentences that repeat while the state lasts carry no changing figures (ha.log
        # gets a line when the sentence changes); only the one-off takeover says how long.
        why = f"The primary has been silent on both networks for longer than pingInterval ({f.ping_interval:g} s)"
        if f.peer_mode in ("standalone", "idle"):
            return Decision(Action.NONE, f"{why}, but its last word was that it left HA ({f.peer_mode}): "
                                         "not taking over.")
        if not f.synced:
            return Decision(Action.NONE, f"{why}, but this appliance has not completed a sync from it since "
                                         "startHA: its disk may hold other data; not taking over.")
        if f.disk_state is not DiskState.UP_TO_DATE:
            return Decision(Action.NONE, f"{why}, but this disk is {f.disk_state}: not taking over.")
        if not f.my_links_up:
            return Decision(Action.NONE, f"{why}, but this appliance's own links are down: it is the isolated one; "
                                         "not taking over.")
        if f.links_up_for < 2 * f.ping_interval:
            # The silence went on while we could hear nothing: only silence heard with our links up
            # counts, or the isolated one takes over the moment its cables are back (the primary
            # went on alone meanwhile: a split brain).
            return Decision(Action.NONE, f"{why}, but this appliance's own links were down until just now: "
                                         "listening for the primary before deciding.")
        if f.witness_ok is False:
            return Decision(Action.NONE, f"{why}, but the witness does not answer either: this appliance may be "
                                         "the isolated one; not taking over.")
        return Decision(Action.TAKEOVER, f"The primary has been silent on both networks for {_fmt(silence)} "
                        f"(pingInterval {f.ping_interval:g} s): taking over as primary.")
    # The primary asks only after losing the link, so our own view of the link is stale. Not so
    # when the link we hold began after we first saw the request: the primary reconnected and
    # synced us since (the heartbeat saying it no longer asks can arrive after the sync's end).
    stale_request = f.request_predates_link and f.peer_connected
    if f.peer_wants_outdate and not stale_request and f.disk_state is DiskState.UP_TO_DATE:
        return Decision(Action.OUTDATE_SELF, "The primary lost the replication link and continues alone: marking "
                        "this disk Outdated so it is never promoted with old data.")
    # No figures in these sentences: they describe a lasting state and are logged when it changes.
    one_silent = ""
    if f.silent_sync >= f.ping_interval:
        one_silent = " The primary is silent on the sync network but heard on the public one; not acting."
    elif f.silent_public >= f.ping_interval:
        one_silent = " The primary is silent on the public network but heard on the sync one; not acting."
    if not f.peer_connected:
        return Decision(Action.NONE, f"Secondary ({f.disk_state}): the primary is not replicating to us.{one_silent}")
    if f.disk_state is DiskState.INCONSISTENT:
        return Decision(Action.NONE, f"Secondary: receiving a sync from the primary; this disk is Inconsistent until it "
                                     f"completes.{one_silent}")
    return Decision(Action.NONE, f"Secondary: in sync with the primary; every write is mirrored here.{one_silent}")


def _inconsistent(f: Facts) -> Decision:
    if f.peer_connected and f.disk_state is DiskState.UP_TO_DATE:
        return Decision(Action.SYNC_DONE, "Sync from the primary completed: secondary again, UpToDate.")
    if f.peer_connected:
        return Decision(Action.NONE, "Inconsistent: the primary is back and a sync is running.")
    return Decision(Action.NONE, "Inconsistent: waiting for the primary to finish the sync; never promoted meanwhile.")


def _primary(f: Facts) -> Decision:
    if f.clock_gap >= f.ping_interval:
        stalled = f"This appliance was stalled for {f.clock_gap:.1f} s, longer than pingInterval {f.ping_interval:g} s"
        if f.peer_connected and not f.io_suspended:
            return Decision(Action.NONE, f"{stalled}, but the secondary still acknowledges our writes: it did not "
                                         "take over.")
        if f.peer_disk == str(DiskState.UP_TO_DATE):
            return Decision(Action.STEP_DOWN, f"{stalled} and the replication link is gone: the secondary may "
                                              "have taken over. Stepping down.")
        # A secondary that was not UpToDate could not have taken over: the rules below apply.
    if f.peer_mode == "primary" and _heard(f) and f.peer_epoch >= f.epoch and f.split_brain:
        return Decision(Action.STEP_DOWN, f"The other appliance says it is primary with term {f.peer_epoch} "
                        f"(ours is {f.epoch}) and both copies changed on their own (split brain): stepping down "
                        "at once; this copy is kept as it is and nothing is synced until an operator resolves it.")
    if f.peer_mode == "primary" and _heard(f) and f.peer_epoch >= f.epoch:
        return Decision(Action.STEP_DOWN, f"The other appliance says it is primary with term {f.peer_epoch} "
                        f"(ours is {f.epoch}): stepping down at once; nothing more is acknowledged here.")
    if f.io_suspended:
        # The link came back before the secondary's "Outdated" reached us, and the resync on the
        # new link (which ends with a flush) sent every held write's range again: they are on both
        # disks. Waiting for an Outdated that the caught-up secondary will never report would hold
        # them forever (it rightly ignores a request older than its link).
        if f.peer_connected and f.link_synced:
            return Decision(Action.RESUME_MIRRORED, "The secondary reconnected and its resync is done: the held "
                            "writes are on both disks; releasing them.")
        silence = _silence(f)
        if _heard(f) and f.peer_disk is not None and f.peer_disk != str(DiskState.UP_TO_DATE):
            return Decision(Action.RESUME_DEGRADED, f"The secondary's disk is {f.peer_disk}, so it cannot be "
                            "promoted: continuing alone (degraded); writes are NOT mirrored until it reconnects.")
        if _heard(f):
            return Decision(Action.REQUEST_OUTDATE, "Replication link lost but the secondary is alive: writes are "
                            "held until it confirms its disk is Outdated.")
        if silence >= f.ping_interval:
            if f.witness_ok is False:
                return Decision(Action.STEP_DOWN, f"The secondary is silent on both networks ({_fmt(silence)}) and "
                                "the witness does not answer: this appliance is isolated. Stepping down.")
            return Decision(Action.RESUME_DEGRADED, f"The secondary is silent on both networks ({_fmt(silence)}): "
                            "taking it for dead and continuing alone (degraded); writes are NOT mirrored.")
        return Decision(Action.NONE, "Replication link lost: writes are held while the secondary is checked.")
    if f.app_healthy is False:
        if f.app_restarts < f.restart_limit:
            return Decision(Action.RESTART_APP, f"The application failed its monitor: restarting it "
                            f"({f.app_restarts + 1} of {f.restart_limit}).")
        if f.peer_connected and f.sync_percent >= 100.0 and f.verifying:
            return Decision(Action.NONE, f"The application failed again after {f.restart_limit} restarts: "
                            "handing over to the secondary once mirrord verify has finished.")
        if f.peer_connected and f.sync_percent >= 100.0:
            return Decision(Action.HAND_OVER, f"The application failed again after {f.restart_limit} restarts: "
                            "handing over to the secondary.")
        return Decision(Action.NONE, f"The application failed again after {f.restart_limit} restarts and no "
                        "secondary is in sync to take over: it stays down here; repair it and run stopHA/startHA.")
    if not f.peer_connected:
        return Decision(Action.NONE, "Primary: the secondary is not connected; serving alone, writes are NOT "
                                     "mirrored (degraded).")
    if f.sync_percent < 100.0:
        return Decision(Action.NONE, "Primary: the secondary is connected; initial sync running.")
    return Decision(Action.NONE, "Primary: the secondary is connected and in sync; writes are mirrored.")
