"""Generation identifiers: on every connect, who is newer and how much must be copied.

This module is pure (no I/O); the handshake (primary.py / secondary.py)
feeds it both sides' identifiers and both sides get the same :class:`Plan`.

Why generation identifiers
--------------------------
Two copies of a volume meet after some time apart. Were they in sync when
they parted? Did one of them change alone (then a bitmap of what it changed
is enough to catch the other up)? Did *both* change alone (split brain: no
copy holds every acknowledged write, and no sync can be right)? Or have they
never been copies of each other at all? Timestamps cannot answer this (clocks
lie) and neither can a per-node term alone. DRBD answers it with a handful of
random identifiers per copy, and we use the same scheme:

* ``current`` names the data generation this disk holds. A primary that
  starts acknowledging writes its peer does not get (it starts or is promoted
  without its peer, or continues after losing it) moves to a new random one.
  ``""`` means "just created": this disk was never served by a primary under
  mirrord, so its content counts for nothing.
* ``bitmap`` is the generation the *peer* was at when this node started
  recording in its dirty bitmap the blocks the peer lacks. While it is set,
  the bitmap holds every block changed since that generation (if the bitmap
  was kept safely: see ``bitmap_trusted``).
* ``history`` holds older generations this disk went through (newest first),
  so a copy that fell further behind can still be recognised as an ancestor.

So the questions become comparisons of identifiers: the same ``current``:
nothing to do. The peer's ``bitmap`` is my ``current``: the peer changed
alone since we parted and its bitmap says exactly what; a bitmap resync from
the peer. My ``current`` is only in the peer's history: it is newer, but its
bitmap does not reach back to me; a full sync from it. Both ``bitmap``
identifiers are the same: we were in sync at that generation and *both*
changed alone since: split brain. Nothing in common: unrelated data.

A sync needs a trusted bitmap on its source (the file persisted on a clean
stop; a primary that crashed lost the writes it had recorded only in
memory) and, on its target, the list of the target's own changes the source
does not know about (blocks it wrote but never got acknowledged, as a
stepped-down or crashed primary; the victim's writes in a split brain).
Whichever is missing turns a bitmap resync into a full sync: never sync less
than may differ.

A sync moves the target to a *sync identifier* first (the source's bitmap
identifier becomes it too), so a sync that is cut short is recognised on the
next connect as "the same sync, resume from the bitmap". When it finishes,
the source moves its bitmap identifier into history and the target adopts the
source's identifiers: both hold the same ``current`` again.

A sync start can get lost. The source moves its bitmap identifier to the
sync identifier (the old one into history) *before* it dials the data
connection, so that a sync cut short is always resumable; if the data
connection fails before the target has noted the sync identifier, the next
connect finds the target still at the source's ``history[0]``. Read as
"the bitmap does not reach back to the target" (r80) that would be a full
sync, yet the bitmap still holds every block changed since the target's
generation: a sync clears a block's bit only when a target *at the sync
identifier* acknowledged it, and no copy ever got there (the target is the
only other copy; a copy never returns to a generation it left, and a data
handshake that undoes its move does so before any block lands).

The identifiers alone cannot tell this from a copy that merely has the
peer's generation in ``history[0]`` beside an unrelated bitmap identifier.
A restored disk that starts serving is one: ``(new, restored, [old])``,
whose bitmap counts from the restore, not from ``old``; a bitmap resync to
a peer at ``old`` would miss everything the restore changed. So, as in
DRBD, a sync identifier is *derived* from the bitmap identifier it replaces
(:func:`next_sync_uuid`; random when there is none), and rule r71 (r51 seen
from the target; DRBD's rules of the same numbers) asks for all three: my
bitmap identifier is set, it was derived from my ``history[0]``, and that is
the peer's current. Then a bitmap resync from me suffices, and it is
retried under the *same* sync identifier: the source's identifiers do not
change (:func:`begin_sync_source` of its own bitmap identifier) and the
target adopts the source's bitmap identifier, so a link that fails right
after every handshake neither pushes the target's generation out of the
history nor loses the recognition. No other step leaves that shape: the
only other derived identifier a copy holds is a sync target's current, and
:func:`begin_sync_target` drops the generation the target came from instead
of keeping it in history. The trust rules below still apply (an untrusted bitmap on either side makes it a
full sync), and a full sync marks every block before its sync identifier is
saved, so a trusted bitmap under a sync identifier always holds what that
sync must send.

In mirrord only the primary sends data. A plan whose source would be the
secondary (the primary's data is older) is refused like a split brain: the
operator decides. ``--discard-my-data`` on one side of a split brain (or of
unrelated data) turns it into a sync from the other side, the survivor.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from dataclasses import dataclass, replace
from typing import Any

#: How many older generations each copy remembers.
HISTORY = 2
_UUID = re.compile(r"^[0-9a-f]{16}$")


def new_uuid() -> str:
    return secrets.token_hex(8)


def is_uuid(value: object) -> bool:
    return isinstance(value, str) and bool(_UUID.match(value))


def _derived(bitmap: str) -> str:
    return hashlib.sha256(b"mirrord sync identifier " + bitmap.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Generations:
    current: str = ""
    bitmap: str = ""
    history: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"current": self.current, "bitmap": self.bitmap, "history": list(self.history)}

    @classmethod
    def from_json(cls, data: object) -> "Generations":
        """Validated: a malformed value from a peer or a file is a ValueError, never trusted."""
        if not isinstance(data, dict):
            raise ValueError("generation identifiers must be a JSON object")
        current, bitmap, history = data.get("current"), data.get("bitmap"), data.get("history")
        if not isinstance(history, list) or len(history) > HISTORY:
            raise ValueError(f"the generation history must be a list of at most {HISTORY} identifiers")
        for value in (current, bitmap, *history):
            if not isinstance(value, str) or not (value == "" or _UUID.match(value)):
                raise ValueError(f"{value!r} is not a generation identifier (16 hex digits or empty)")
        return cls(current=current, bitmap=bitmap, history=tuple(h for h in history if h))

    def known(self) -> set[str]:
        """Every generation this copy went through or kept a bitmap against."""
        return {g for g in (self.current, self.bitmap, *self.history) if g}


def _push(history: tuple[str, ...], uuid: str) -> tuple[str, ...]:
    if not uuid or (history and history[0] == uuid):
        return history
    return (uuid, *history)[:HISTORY]


# -- the rules that change them --------------------------------------------------------


def restored(g: Generations, uuid: str) -> Generations:
    """A disk restored from a backup: new data, tied to its peer only by what this copy held before.

    The old identifiers go into the history, so a peer still at one of them
    gets a full sync from this copy (r80 / r60), not a refusal as unrelated
    data; the sync compares checksums first, since most blocks of a restored
    disk usually equal the peer's.
    """
    return Generations(current=uuid, bitmap="", history=_push(_push(g.history, g.bitmap), g.current))


def start_writing_alone(g: Generations, uuid: str) -> Generations:
    """A primary starts acknowledging writes its peer does not get: a new data generation.

    The first time since it was in sync, the generation the peer still holds
    becomes the bitmap identifier (from now on the bitmap records what the
    peer lacks). If a bitmap identifier is set already, the bitmap still
    covers everything since that older generation: keep it.
    """
    if not g.current:
        return Generations(current=uuid, bitmap="", history=g.history)
    if not g.bitmap:
        return Generations(current=uuid, bitmap=g.current, history=g.history)
    return Generations(current=uuid, bitmap=g.bitmap, history=_push(g.history, g.current))


def next_sync_uuid(g: Generations) -> str:
    """The identifier a sync from this copy starts under: derived from the bitmap identifier it
    pushes into history, so that a start the target never noted is recognised (r71)."""
    return _derived(g.bitmap) if g.bitmap else new_uuid()


def sync_uuid_for(plan: "Plan", source: Generations, offered: str) -> str:
    """The identifier this plan's sync runs under: a lost start (r71 / r51) is retried under its own,
    the source's bitmap identifier; so is a full sync whose source last started a sync that never
    finished (see below); any other sync runs under the one the source offered."""
    if plan.rule in _LOST_START_RULES or (plan.kind is Kind.FULL and _unfinished_start(source)):
        return source.bitmap
    return offered


def _unfinished_start(source: Generations) -> bool:
    """The source's last step was a sync start that never finished: its bitmap identifier is the
    one derived from its ``history[0]``.

    A full sync marks every block before its identifier is saved, so it may run under any
    identifier the source's bitmap counts from; retrying it under the same one keeps the
    target's generation in the source's history however often the data connection fails right
    after the handshake (a new identifier each time pushed it out after two, and the next
    connect was refused as unrelated data).
    """
    return bool(source.bitmap) and bool(source.history) and source.bitmap == _derived(source.history[0])


def begin_sync_source(g: Generations, sync_uuid: str) -> Generations:
    """The source starts a (bitmap or full) sync: its bitmap now counts from the sync identifier
    (unchanged when a lost start is retried under the same one)."""
    if sync_uuid == g.bitmap:
        return g
    return Generations(current=g.current, bitmap=sync_uuid, history=_push(g.history, g.bitmap))


def begin_sync_target(g: Generations, sync_uuid: str) -> Generations:
    """The target, before the first byte lands: it holds part of the sync identifier's data now."""
    return Generations(current=sync_uuid, bitmap="", history=g.history)


def finish_sync_source(g: Generations) -> Generations:
    """Every block is on the target: the bitmap identifier goes into history."""
    return Generations(current=g.current, bitmap="", history=_push(g.history, g.bitmap))


# -- the decision ------------------------------------------------------------------------


class Kind(str, enum.Enum):
    IN_SYNC = "in sync"
    BITMAP = "bitmap"
    FULL = "full"
    SPLIT_BRAIN = "split brain"
    UNRELATED = "unrelated"
    STALE_PRIMARY = "stale primary"

    def __str__(self) -> str:
        return self.value


#: DRBD numbers the rules from one side: "I am just created" (r20) is "the peer is" (r30) seen from the peer.
_MIRROR_RULE = {"r20": "r30", "r30": "r20", "r50": "r70", "r70": "r50", "r51": "r71", "r71": "r51",
                "r60": "r80", "r80": "r60"}

#: A bitmap resync after a sync start the target never noted (see the module's essay).
_LOST_START_RULES = frozenset({"r51", "r71"})
_LOST_START_WHY = "the last sync start never reached the target"

#: Full-sync rules where the two disks share no history: a new disk (r10-r30) or unrelated data
#: (r110). Every other full sync is between copies of one history, most of whose blocks are equal.
FRESH_OR_UNRELATED = frozenset({"r10", "r20", "r30", "r110"})

#: Kinds that refuse the connection and keep both copies untouched.
REFUSED = frozenset({Kind.SPLIT_BRAIN, Kind.UNRELATED, Kind.STALE_PRIMARY})


@dataclass(frozen=True)
class Side:
    """What one side brings to the handshake."""

    gen: Generations
    primary: bool
    #: its dirty bitmap holds every block it changed since ``gen.bitmap`` (or since it was last in sync):
    #: sent as the source's bitmap, or as the target's own changes. False after a crash as primary
    #: that nothing recorded.
    bitmap_trusted: bool = True
    discard_my_data: bool = False


@dataclass(frozen=True)
class Plan:
    kind: Kind
    source: str | None = None  # "local" or "peer": who sends; None when nothing is sent
    rule: str = ""             # which comparison decided (for logs and tests)
    why: str = ""              # why a bitmap resync became a full one, why refused, or why a bitmap suffices after all
    resolves: bool = False     # a split brain / unrelated pair resolved by --discard-my-data

    @property
    def refused(self) -> bool:
        return self.kind in REFUSED

    def mirrored(self) -> "Plan":
        """The same plan seen from the other side."""
        flip = {"local": "peer", "peer": "local", None: None}
        return replace(self, source=flip[self.source], rule=_MIRROR_RULE.get(self.rule, self.rule))


def relation(mine: Generations, theirs: Generations) -> Plan:
    """DRBD's comparison (drbd_uuid_compare), rule numbers kept for reference."""
    if not mine.current and not theirs.current:
        return Plan(Kind.FULL, None, "r10")  # both just created: the primary decides below
    if not mine.current:
        return Plan(Kind.FULL, "peer", "r20")
    if not theirs.current:
        return Plan(Kind.FULL, "local", "r30")
    if mine.current == theirs.current:
        return Plan(Kind.IN_SYNC, None, "r40")
    if mine.current == theirs.bitmap:
        return Plan(Kind.BITMAP, "peer", "r50")
    if _lost_start(theirs, mine.current):
        return Plan(Kind.BITMAP, "peer", "r51", _LOST_START_WHY)
    if mine.current in theirs.history:
        return Plan(Kind.FULL, "peer", "r60", "the peer's bitmap does not reach back to this copy's generation")
    if mine.bitmap and mine.bitmap == theirs.current:
        return Plan(Kind.BITMAP, "local", "r70")
    if _lost_start(mine, theirs.current):
        return Plan(Kind.BITMAP, "local", "r71", _LOST_START_WHY)
    if theirs.current in mine.history:
        return Plan(Kind.FULL, "local", "r80", "this copy's bitmap does not reach back to the peer's generation")
    if mine.bitmap and mine.bitmap == theirs.bitmap:
        return Plan(Kind.SPLIT_BRAIN, None, "r90")
    if (mine.known() - {mine.current}) & (theirs.known() - {theirs.current}):
        return Plan(Kind.SPLIT_BRAIN, None, "r100")
    return Plan(Kind.UNRELATED, None, "r110")


def _lost_start(source: Generations, target_current: str) -> bool:
    """The source's last sync start never reached a target still at ``target_current``."""
    return bool(source.bitmap) and source.history[:1] == (target_current,) \
        and source.bitmap == _derived(target_current)


def _role(side: str, local: Side, peer: Side) -> Side:
    return local if side == "local" else peer


def compare(local: Side, peer: Side) -> Plan:
    """What to do when ``local`` meets ``peer``; ``compare(peer, local)`` is the mirrored plan."""
    plan = relation(local.gen, peer.gen)
    if plan.rule == "r10":
        plan = replace(plan, source="local" if local.primary else "peer")
    if plan.kind in (Kind.SPLIT_BRAIN, Kind.UNRELATED):
        plan = _resolve(plan, local, peer)
        if plan.refused:
            return plan
    if plan.kind is Kind.IN_SYNC:
        return plan
    assert plan.source is not None
    source = _role(plan.source, local, peer)
    target = _role("peer" if plan.source == "local" else "local", local, peer)
    if not source.primary:
        return Plan(Kind.STALE_PRIMARY, plan.source, plan.rule,
                    "the secondary holds newer data than the primary")
    if plan.kind is Kind.BITMAP and not source.bitmap_trusted:
        return replace(plan, kind=Kind.FULL, why="the source's dirty bitmap cannot be trusted "
                       "(it crashed as primary)")
    if plan.kind is Kind.BITMAP and not target.bitmap_trusted:
        return replace(plan, kind=Kind.FULL, why="the target crashed as primary and the blocks it "
                       "had in flight are not known")
    return plan


def _resolve(plan: Plan, local: Side, peer: Side) -> Plan:
    """--discard-my-data on exactly one side: the other side's data wins."""
    if local.discard_my_data == peer.discard_my_data:
        why = "both appliances asked to discard their own data" if local.discard_my_data else ""
        return replace(plan, why=why)
    survivor = "peer" if local.discard_my_data else "local"
    kind = Kind.BITMAP if plan.rule == "r90" else Kind.FULL
    why = "" if kind is Kind.BITMAP else "the two copies share no bitmap to resync from"
    return Plan(kind, survivor, plan.rule, why, resolves=True)


def describe(plan: Plan, *, here: str = "this appliance", command: str) -> str:
    """One sentence for ha.log and HAstatus; ``command`` is what resolves a refusal."""
    if plan.kind is Kind.SPLIT_BRAIN:
        return (f"Split brain: both appliances changed the data on their own since they were last in sync, so "
                f"nothing is synced and both copies are kept until you run {command} on the appliance whose "
                "changes to discard (its disk is saved first).")
    if plan.kind is Kind.UNRELATED:
        return (f"Unrelated data: the two disks were never copies of each other, so nothing is synced and both "
                f"are kept until you run {command} on the appliance that should become a copy of the other "
                "(its disk is saved first).")
    if plan.kind is Kind.STALE_PRIMARY:
        return (f"The secondary's data is newer than the primary's ({plan.why}), so nothing is synced and both "
                f"copies are kept until you run {command} on the appliance whose changes to discard.")
    if plan.kind is Kind.IN_SYNC:
        return f"{here.capitalize()} and the peer hold the same data generation."
    who = "this appliance" if plan.source == "local" else "the peer"
    what = "bitmap resync" if plan.kind is Kind.BITMAP else "full sync"
    detail = f" ({plan.why})" if plan.why else ""
    resolved = " to resolve the split brain" if plan.resolves else ""
    return f"A {what} from {who}{resolved}{detail}."
