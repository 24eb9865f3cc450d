"""Per-volume metadata kept beside the disk (never inside it), written crash-safely.

What a node must remember across crashes about its copy of the volume:

* ``disk_state``: ``UpToDate`` (a complete, current copy), ``Inconsistent``
  (a sync into it started and has not finished: parts are old, parts new),
  ``Outdated`` (complete but known to be behind the peer);
* ``epoch``: the highest primary term this copy has served or followed;
  each promotion takes a higher one, so two primaries can tell which is newer;
* ``gen``: the generation identifiers (see generations.py) that decide, on
  every connect, what must be synced or whether the copies split;
* ``primary_open``: set before this node serves as primary, cleared after a
  clean stop has persisted its dirty bitmap (``<volume>.bitmap`` beside this
  file). Found set at start, it means the node crashed as primary: the
  bitmap file is stale (DRBD's "crashed primary" flag);
* ``bitmap_trusted``: the persisted bitmap (plus the activity log after a
  crash) holds every block this copy changed since ``gen.bitmap``; false
  after a crash that nothing recorded, until a full sync starts afresh;
* ``split_brain``: the sentence of the last split brain (or unrelated data)
  detected with the peer, until a sync succeeds; ``startHA --discard-my-data``
  needs it;
* ``checksum_sync``: the sync identifier of the last sync that started by
  comparing checksums (a full sync between copies of one history): a sync
  resumed from it (the target at it, r70) or retried (r71) compares the rest
  too, instead of copying every block it marked;
* ``verify_found``: the disk is Inconsistent only because the primary's
  online verify found blocks here that differ from its own (decision 42),
  not because a sync into it was cut short: a whole copy but for those
  blocks, which ``startHA --force`` may serve (decision 48). Any other change
  of the disk state clears it;
* ``following``: set before this node follows a primary as its secondary,
  and when it recovers from a crash as primary; cleared when it serves as
  primary again. An UpToDate copy with it set was current when this node last
  heard its peer, and nothing says the peer did not go on acknowledging
  writes without it afterwards (as the primary this node followed, or as the
  secondary that took over after this node crashed). Unless the peer answers
  with an older copy, ``startHA`` will not serve it without ``--force``
  (DRBD's "Consistent").

The file is replaced atomically (temp + fsync + rename + directory fsync), so
after a crash it is either the old or the new version. A sync target marks
itself Inconsistent *before* the first sync byte lands, and UpToDate only
after the source says the sync is complete.

Meta files written before generation identifiers existed (``source`` and
``node_id`` keys, no ``gen``) are read as "just created": their disk state
is kept, and the first connect after the upgrade is a full sync from the
primary, as a new lineage was before.
"""

from __future__ import annotations

import enum
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from mirrord import atomicfile
from mirrord.paths import Home
from mirrord.replication import extents, generations
from mirrord.replication.generations import Generations, Kind, Plan


class DiskState(str, enum.Enum):
    UP_TO_DATE = "UpToDate"
    INCONSISTENT = "Inconsistent"
    OUTDATED = "Outdated"

    def __str__(self) -> str:
        return self.value


@dataclass
class VolumeMeta:
    disk_state: DiskState = DiskState.UP_TO_DATE
    epoch: int = 0
    gen: Generations = field(default_factory=Generations)
    primary_open: bool = False
    bitmap_trusted: bool = True
    split_brain: str = ""
    following: bool = False
    checksum_sync: str = ""
    verify_found: bool = False

    @property
    def may_be_behind(self) -> bool:
        """The peer may have acknowledged writes this copy lacks since this node last heard it:
        ``following``, or a crash as primary that ``recover`` has not turned into it yet. Only
        for a copy nothing serves: a running primary has ``primary_open`` set."""
        return self.following or self.primary_open

    # The daemon's thread and the replication threads both change and save it.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, home: Home, volume: str) -> "VolumeMeta":
        """The saved metadata, or a new disk's (not saved here: reading must not change a refused command's node)."""
        data = atomicfile.read_json(home.meta_file(volume))
        if data is None:
            return cls()
        return cls(disk_state=DiskState(data["disk_state"]), epoch=int(data.get("epoch", 0)),
                   gen=Generations.from_json(data["gen"]) if "gen" in data else Generations(),
                   primary_open=bool(data.get("primary_open", False)),
                   bitmap_trusted=bool(data.get("bitmap_trusted", True)),
                   split_brain=str(data.get("split_brain", "")),
                   following=bool(data.get("following", False)),
                   checksum_sync=_identifier(data.get("checksum_sync", "")),
                   verify_found=bool(data.get("verify_found", False)))

    def _json(self, **changes: Any) -> dict[str, Any]:
        v = {**{k: getattr(self, k) for k in ("disk_state", "epoch", "gen", "primary_open", "bitmap_trusted",
                                            "split_brain", "following", "checksum_sync", "verify_found")},
             **changes}
        return {"disk_state": str(v["disk_state"]), "epoch": v["epoch"], "gen": v["gen"].to_json(),
                "primary_open": v["primary_open"], "bitmap_trusted": v["bitmap_trusted"],
                "split_brain": v["split_brain"], "following": v["following"], "checksum_sync": v["checksum_sync"],
                "verify_found": v["verify_found"]}

    def save(self, home: Home, volume: str) -> None:
        with self._lock:
            atomicfile.write_json(home.meta_file(volume), self._json())

    def update(self, home: Home, volume: str, **changes: Any) -> None:
        """Persist the changes, then make them visible here.

        Other threads read these fields without waiting (the heartbeats tell
        the peer the disk state, and a primary told "Outdated" goes on
        writing alone): they must never see a state the disk does not hold
        yet. A save that fails changes nothing.
        """
        update_together(home, [(self, volume, changes)])


    def recover(self, home: Home, volume: str, disk_size: int) -> str:
        """At start: if this node crashed as primary, what its bitmap is worth now (a sentence for ha.log)."""
        if not self.primary_open:
            return ""
        # The secondary may have taken over since: this copy is served again only when the
        # peer shows an older one, or by --force (why_not_primary).
        self.primary_open, self.following = False, True
        in_flight = extents.activity_log_extents(home, volume)
        if in_flight is None or self.gen.bitmap:
            # Without a record of the blocks it was writing (or of everything since it lost
            # its peer) no bitmap can say what differs: the next sync with it is a full one.
            self.bitmap_trusted = False
            self.save(home, volume)
            extents.forget_activity_log(home, volume)
            return ("This appliance crashed as primary and nothing recorded every block it changed: its dirty "
                    "bitmap cannot be trusted, so its next sync with the peer is a full one.")
        path = extents.bitmap_file(home, volume)
        saved = path.read_bytes() if path.exists() else b""
        atomicfile.write_bytes(path, extents.add_to_bitmap(saved, disk_size, in_flight))
        self.save(home, volume)
        extents.forget_activity_log(home, volume)
        return (f"This appliance crashed as primary: the {len(in_flight)} extent(s) named by its activity log "
                "are resynced at the next connect with the peer.")


def _identifier(value: object) -> str:
    """A saved sync identifier; anything else reads as none (the sync then copies what it marked)."""
    return value if isinstance(value, str) and generations.is_uuid(value) else ""


def update_together(home: Home, items: list[tuple[VolumeMeta, str, dict[str, Any]]]) -> None:
    """VolumeMeta.update for several volumes at once: every file is written before any change is
    visible, so a group's state (the worst of its volumes') never runs ahead of its disks. The
    locks are taken in the order given, which every caller keeps (a group's volume order).
    A new disk state clears ``verify_found`` unless the change sets it too."""
    items = [(meta, volume, {"verify_found": False, **changes} if "disk_state" in changes else changes)
             for meta, volume, changes in items]
    with ExitStack() as stack:
        for meta, _, _ in items:
            stack.enter_context(meta._lock)
        for meta, volume, changes in items:
            atomicfile.write_json(home.meta_file(volume), meta._json(**changes))
        for meta, _, changes in items:
            for name, value in changes.items():
                setattr(meta, name, value)


def why_not_primary(state: DiskState, may_be_behind: bool, force: bool, peer: Plan | None,
                    verify_found: bool = False) -> str:
    """Why startHA must not serve this copy as primary ("" if it may); ``state`` is the worst over
    the pair's volumes, ``may_be_behind`` any volume's ``following`` (or ``primary_open``, a crash
    as primary not recovered yet), ``peer`` how this copy relates to the peer's when the peer
    answers (``generations.relation`` of the identifiers its heartbeats carry), else None.

    Only the operator knows whether the other appliance is gone for good, so a copy that may
    lack acknowledged writes is served on their word alone (``--force``), never by default.
    When the peer answers, its identifiers settle it (the handshake will compare the same
    ones): the same generation, a newer copy here, or two new disks may serve; a copy older
    than the peer's is refused. Two copies that changed apart (split brain, unrelated data)
    settle nothing: the rules for a silent peer apply, and ``--force`` may pick this copy
    (the handshake then keeps both). Half-copied data is refused even then: no copy of the
    data it holds exists anywhere. ``verify_found``: every Inconsistent volume is so only because
    a verify found blocks that differ (a whole copy but for those), which ``--force`` may serve.
    """
    if state is DiskState.INCONSISTENT and not verify_found:
        return ("This appliance's disk is Inconsistent: a sync into it was cut short, so it holds parts of two "
                "versions and cannot become primary, not even with --force. Make it the secondary of the "
                "appliance that was primary.")
    if state is DiskState.INCONSISTENT and not force:
        return ("This appliance's disk is Inconsistent: the primary's online verify found blocks on it that differ "
                "from the primary's, and they were not resent yet. Start HA on the appliance that was primary "
                "(this one then becomes its secondary and gets them); only if it is lost for good, run startHA "
                "--force here to serve this copy, those blocks as they are.")
    if peer is not None and (peer.kind is Kind.IN_SYNC or peer.source == "local" or peer.rule == "r10"):
        return ""
    if peer is not None and peer.source == "peer":
        return ("The peer holds newer data than this appliance (their generation identifiers say so, rule "
                f"{peer.rule}: it served without this one since they last met), so this appliance cannot become "
                "primary. Make the peer primary: stopHA on the peer, then startHA naming it primary, here "
                "first (this appliance becomes its secondary and is synced) and then on the peer.")
    if peer is not None and (state is DiskState.OUTDATED or may_be_behind) and not force:
        what = ("Outdated" if state is DiskState.OUTDATED
                else "last the secondary's copy, or this appliance crashed as primary")
        return (f"The peer answers, but its generation identifiers show that the two copies changed apart "
                f"({peer.kind}), and this appliance's disk is {what}: it may lack writes the peer acknowledged. "
                "Decide which copy to keep: startHA --force on that appliance (allowed while the peer answers, "
                "since the copies diverged), then startHA --discard-my-data on the other once it reports the "
                "split brain (its disk is saved first).")
    if state is DiskState.OUTDATED and not force:
        return ("This appliance's disk is Outdated: it lacks the writes the other appliance acknowledged after "
                "this one stopped following it, so it cannot become primary. Start HA on that appliance first "
                "(this one then becomes its secondary and is synced); only if it is lost for good, run startHA "
                "--force here to serve this older copy.")
    if may_be_behind and not force:
        return ("This appliance's disk was last the secondary's copy, or this appliance crashed as primary, and "
                "its peer does not answer: nothing says the peer did not acknowledge writes without this one "
                "since. Start HA on the other appliance first, as this one's secondary (this startHA then "
                "compares the two copies and makes this one primary only if its copy is not older) or as "
                "primary if it took over; only if it is lost for good, run startHA --force here to serve this "
                "copy.")
    if force and state is DiskState.UP_TO_DATE and not may_be_behind:
        return ("--force is not needed: this appliance's disk is UpToDate and it was the primary's copy; run "
                "startHA without --force.")
    return ""
