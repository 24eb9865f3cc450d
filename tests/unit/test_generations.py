"""Generation identifiers: DRBD's rule table, the rules that move them, and whole stories of a pair."""

from __future__ import annotations

import itertools
import random

import pytest

from mirrord.replication import generations as g
from mirrord.replication.generations import Generations, Kind, Plan, Side, compare, relation

A, B, C, D, E, F, S = ("a" * 16, "b" * 16, "c" * 16, "d" * 16, "e" * 16, "f" * 16, "5" * 16)


def gen(current: str = "", bitmap: str = "", *history: str) -> Generations:
    return Generations(current, bitmap, tuple(history))


def sync_from(bitmap: str) -> str:
    """The sync identifier a source with this bitmap identifier starts under (derived from it)."""
    return g.next_sync_uuid(gen(F, bitmap))


#: Sync identifiers of starts that pushed A (or C) into history: what a lost start leaves behind.
SA, SC = sync_from(A), sync_from(C)


# (name, local, peer, kind, source, rule): relation() from the local side.
RELATIONS = [
    ("both just created", gen(), gen(), Kind.FULL, None, "r10"),
    ("I am just created", gen(), gen(A), Kind.FULL, "peer", "r20"),
    ("I am just created, peer has history", gen(), gen(A, B, C), Kind.FULL, "peer", "r20"),
    ("peer just created", gen(A), gen(), Kind.FULL, "local", "r30"),
    ("peer just created, I kept a bitmap", gen(A, B), gen(), Kind.FULL, "local", "r30"),
    ("same current", gen(A), gen(A), Kind.IN_SYNC, None, "r40"),
    ("same current, different histories", gen(A, "", B), gen(A, "", C), Kind.IN_SYNC, None, "r40"),
    ("same current, I kept a bitmap", gen(A, B), gen(A), Kind.IN_SYNC, None, "r40"),
    ("peer's bitmap is my current", gen(A), gen(B, A), Kind.BITMAP, "peer", "r50"),
    ("peer's bitmap is my current, peer has history", gen(A, "", C), gen(B, A, C), Kind.BITMAP, "peer", "r50"),
    ("interrupted sync: I hold the sync id", gen(S), gen(A, S, B), Kind.BITMAP, "peer", "r50"),
    ("peer's sync start never reached me", gen(A), gen(B, SA, A), Kind.BITMAP, "peer", "r51"),
    ("peer's sync start never reached me, histories", gen(A, "", C), gen(B, SA, A, C), Kind.BITMAP, "peer", "r51"),
    ("my current in peer's history[0]", gen(A), gen(B, C, A), Kind.FULL, "peer", "r60"),
    ("my current in peer's history[0], peer in sync", gen(A), gen(B, "", A), Kind.FULL, "peer", "r60"),
    ("my current in peer's history[1]", gen(A), gen(B, C, D, A), Kind.FULL, "peer", "r60"),
    ("my bitmap is peer's current", gen(B, A), gen(A), Kind.BITMAP, "local", "r70"),
    ("my bitmap is the sync id the peer holds", gen(A, S, B), gen(S), Kind.BITMAP, "local", "r70"),
    ("my sync start never reached the peer", gen(B, SA, A), gen(A), Kind.BITMAP, "local", "r71"),
    ("my sync start never reached the peer, it has a bitmap", gen(B, SA, A, C), gen(A, D, C), Kind.BITMAP, "local",
     "r71"),
    ("the peer holds my lost-looking sync identifier", gen(B, SA, A), gen(SA), Kind.BITMAP, "local", "r70"),
    # A restored disk that started serving: its bitmap counts from the restore, not from history[0].
    ("peer's current in my history[0], bitmap not derived from it", gen(B, C, A), gen(A), Kind.FULL, "local", "r80"),
    ("my bitmap derived from history[1], not history[0]", gen(B, SA, C, A), gen(A), Kind.FULL, "local", "r80"),
    ("my bitmap derived from history[0], peer at history[1]", gen(B, SC, C, A), gen(A), Kind.FULL, "local", "r80"),
    ("peer's current in my history[1]", gen(B, C, D, A), gen(A), Kind.FULL, "local", "r80"),
    ("peer's current in my history, no bitmap", gen(B, "", A), gen(A), Kind.FULL, "local", "r80"),
    ("peer's current in my history, no bitmap, peer has one", gen(B, "", A), gen(A, C), Kind.FULL, "local", "r80"),
    ("both bitmaps are the common ancestor", gen(B, A), gen(C, A), Kind.SPLIT_BRAIN, None, "r90"),
    ("common ancestor, histories differ", gen(B, A, D), gen(C, A, E), Kind.SPLIT_BRAIN, None, "r90"),
    ("histories share a generation", gen(B, C, A), gen(D, E, A), Kind.SPLIT_BRAIN, None, "r100"),
    ("my bitmap in peer's history", gen(B, A), gen(D, E, A), Kind.SPLIT_BRAIN, None, "r100"),
    ("peer's bitmap in my history", gen(D, E, A), gen(B, A), Kind.SPLIT_BRAIN, None, "r100"),
    ("history[1] matches", gen(B, "", C, A), gen(D, "", E, A), Kind.SPLIT_BRAIN, None, "r100"),
    ("nothing in common", gen(A), gen(B), Kind.UNRELATED, None, "r110"),
    ("a bitmap derived from the peer's current is not enough", gen(B, SA), gen(A), Kind.UNRELATED, None, "r110"),
    ("nothing in common, with bitmaps", gen(A, B), gen(C, D), Kind.UNRELATED, None, "r110"),
    ("nothing in common, with histories", gen(A, B, C), gen(D, E, F), Kind.UNRELATED, None, "r110"),
    ("empty bitmaps are not a common ancestor", gen(A, ""), gen(B, ""), Kind.UNRELATED, None, "r110"),
]


@pytest.mark.parametrize(("name", "mine", "theirs", "kind", "source", "rule"), RELATIONS, ids=[r[0] for r in RELATIONS])
def test_relation_table(name: str, mine: Generations, theirs: Generations, kind: Kind, source: str | None,
                        rule: str) -> None:
    plan = relation(mine, theirs)
    assert (plan.kind, plan.source, plan.rule) == (kind, source, rule)


@pytest.mark.parametrize(("name", "mine", "theirs", "kind", "source", "rule"), RELATIONS, ids=[r[0] for r in RELATIONS])
def test_relation_is_symmetric(name: str, mine: Generations, theirs: Generations, kind: Kind, source: str | None,
                               rule: str) -> None:
    there = relation(theirs, mine)
    assert there.kind is kind
    assert there.source == relation(mine, theirs).mirrored().source


def side(gen_: Generations, primary: bool, trusted: bool = True, discard: bool = False) -> Side:
    return Side(gen=gen_, primary=primary, bitmap_trusted=trusted, discard_my_data=discard)


# (name, local, peer, kind, source): compare() from the local side, roles and flags included.
COMPARISONS = [
    ("fresh pair: the primary is the source", side(gen(), True), side(gen(), False), Kind.FULL, "local"),
    ("fresh pair seen from the secondary", side(gen(), False), side(gen(), True), Kind.FULL, "peer"),
    ("fresh secondary", side(gen(A), True), side(gen(), False), Kind.FULL, "local"),
    ("returning secondary", side(gen(B, A), True), side(gen(A), False), Kind.BITMAP, "local"),
    ("returning secondary, untrusted bitmap", side(gen(B, A), True, trusted=False), side(gen(A), False),
     Kind.FULL, "local"),
    ("returning old primary that crashed unrecorded", side(gen(B, A), True), side(gen(A), False, trusted=False),
     Kind.FULL, "local"),
    ("in sync, untrusted bitmaps do not matter", side(gen(A), True, False), side(gen(A), False, False),
     Kind.IN_SYNC, None),
    ("secondary newer (bitmap)", side(gen(A), True), side(gen(B, A), False), Kind.STALE_PRIMARY, "peer"),
    ("secondary newer (history)", side(gen(A), True), side(gen(B, C, A), False), Kind.STALE_PRIMARY, "peer"),
    ("primary fresh, secondary has data", side(gen(), True), side(gen(A), False), Kind.STALE_PRIMARY, "peer"),
    ("split brain", side(gen(B, A), True), side(gen(C, A), False), Kind.SPLIT_BRAIN, None),
    ("split brain, primary asks to discard", side(gen(B, A), True, discard=True), side(gen(C, A), False),
     Kind.STALE_PRIMARY, "peer"),
    ("split brain, victim is the secondary", side(gen(B, A), True), side(gen(C, A), False, discard=True),
     Kind.BITMAP, "local"),
    ("split brain, victim seen from itself", side(gen(C, A), False, discard=True), side(gen(B, A), True),
     Kind.BITMAP, "peer"),
    ("split brain, victim's bitmap untrusted", side(gen(B, A), True),
     side(gen(C, A), False, trusted=False, discard=True), Kind.FULL, "local"),
    ("split brain, survivor's bitmap untrusted", side(gen(B, A), True, trusted=False),
     side(gen(C, A), False, discard=True), Kind.FULL, "local"),
    ("split brain, both discard", side(gen(B, A), True, discard=True), side(gen(C, A), False, discard=True),
     Kind.SPLIT_BRAIN, None),
    ("history split brain, victim", side(gen(B, C, A), True), side(gen(D, E, A), False, discard=True),
     Kind.FULL, "local"),
    ("unrelated", side(gen(A), True), side(gen(B), False), Kind.UNRELATED, None),
    ("unrelated, victim", side(gen(A), True), side(gen(B), False, discard=True), Kind.FULL, "local"),
    ("unrelated, both discard", side(gen(A), True, discard=True), side(gen(B), False, discard=True),
     Kind.UNRELATED, None),
    ("discard without a conflict changes nothing", side(gen(B, A), True), side(gen(A), False, discard=True),
     Kind.BITMAP, "local"),
    ("lost sync start", side(gen(B, SA, A), True), side(gen(A), False), Kind.BITMAP, "local"),
    ("lost sync start, untrusted bitmap", side(gen(B, SA, A), True, trusted=False), side(gen(A), False),
     Kind.FULL, "local"),
    ("lost sync start, secondary crashed as primary", side(gen(B, SA, A), True), side(gen(A), False, trusted=False),
     Kind.FULL, "local"),
    ("lost sync start on the secondary's side", side(gen(A), True), side(gen(B, SA, A), False),
     Kind.STALE_PRIMARY, "peer"),
]


@pytest.mark.parametrize(("name", "local", "peer", "kind", "source"), COMPARISONS, ids=[c[0] for c in COMPARISONS])
def test_compare_table(name: str, local: Side, peer: Side, kind: Kind, source: str | None) -> None:
    plan = compare(local, peer)
    assert (plan.kind, plan.source) == (kind, source)


@pytest.mark.parametrize(("name", "local", "peer", "kind", "source"), COMPARISONS, ids=[c[0] for c in COMPARISONS])
def test_both_sides_reach_the_same_plan(name: str, local: Side, peer: Side, kind: Kind, source: str | None) -> None:
    assert compare(peer, local) == compare(local, peer).mirrored()


def test_resolution_is_marked_and_explains_a_full_sync() -> None:
    plan = compare(side(gen(B, C, A), True), side(gen(D, E, A), False, discard=True))
    assert plan.resolves and "no bitmap" in plan.why
    assert not compare(side(gen(B, A), True), side(gen(A), False)).resolves


@pytest.mark.parametrize("kind", sorted(g.REFUSED))
def test_refusals_name_the_resolving_command(kind: Kind) -> None:
    sentence = g.describe(Plan(kind, why="x"), command="startHA --discard-my-data")
    assert "startHA --discard-my-data" in sentence and "kept" in sentence
    assert sentence.count(". ") == 0 and sentence.endswith(".")  # one sentence


# -- the rules that move them ------------------------------------------------------------


def test_sync_identifiers_are_derived_from_the_bitmap_identifier() -> None:
    assert g.next_sync_uuid(gen(B, A)) == g.next_sync_uuid(gen(C, A, D)) == SA
    assert g.is_uuid(SA) and len({SA, SC, A, C}) == 4
    fresh = {g.next_sync_uuid(gen(B)) for _ in range(8)}  # nothing to derive from: random
    assert len(fresh) == 8 and all(map(g.is_uuid, fresh))


@pytest.mark.parametrize(("rule", "expected"), [("r71", SA), ("r51", SA), ("r70", S), ("r80", S), ("r30", S)])
def test_a_lost_start_is_retried_under_its_own_identifier(rule: str, expected: str) -> None:
    assert g.sync_uuid_for(Plan(Kind.BITMAP, rule=rule), gen(B, SA, A), S) == expected


def test_start_writing_alone() -> None:
    assert g.start_writing_alone(gen(), A) == gen(A)
    assert g.start_writing_alone(gen(A, "", C), B) == gen(B, A, C)
    assert g.start_writing_alone(gen(B, A), C) == gen(C, A, B)  # the bitmap still reaches back to A
    assert g.start_writing_alone(gen(C, A, B, D), E) == gen(E, A, C, B)  # history is bounded


def test_sync_rules() -> None:
    assert g.begin_sync_source(gen(B, A), S) == gen(B, S, A)
    assert g.begin_sync_source(gen(B), S) == gen(B, S)
    assert g.begin_sync_source(gen(B, SA, A), SA) == gen(B, SA, A)  # a lost start retried: nothing moves
    assert g.begin_sync_target(gen(A, "", C), S) == gen(S, "", C)
    assert g.finish_sync_source(gen(B, S, A)) == gen(B, "", S, A)
    assert g.finish_sync_source(gen(B)) == gen(B)


@pytest.mark.parametrize("value", [
    None, [], {"current": 1, "bitmap": "", "history": []}, {"current": "A" * 16, "bitmap": "", "history": []},
    {"current": "", "bitmap": "", "history": [A, B, C]}, {"current": "", "bitmap": "x", "history": []},
    {"current": "", "bitmap": "", "history": "ab"}, {"current": "", "bitmap": ""}, {"current": A + "0", "bitmap": "",
                                                                                  "history": []},
])
def test_malformed_identifiers_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        Generations.from_json(value)


def test_json_round_trip() -> None:
    for value in (gen(), gen(A), gen(A, B), gen(A, B, C, D)):
        assert Generations.from_json(value.to_json()) == value


# -- stories: the rules and the comparison together ------------------------------------------


class Node:
    """One appliance's identifiers and bitmap trust, moved by the same rules as the daemon."""

    _ids = (f"{i:016x}" for i in itertools.count(1))

    def __init__(self) -> None:
        self.gen = Generations()
        self.trusted = True

    def serve_alone(self) -> None:
        self.gen = g.start_writing_alone(self.gen, next(self._ids))

    def side(self, primary: bool, discard: bool = False) -> Side:
        return Side(self.gen, primary, self.trusted, discard)


def connect(primary: Node, secondary: Node, discard: bool = False, finish: bool = True, lost: bool = False) -> Plan:
    """The handshake and, unless refused, the sync (cut short if not ``finish``; if ``lost``, the
    data connection fails before the secondary notes the sync identifier)."""
    offered = g.next_sync_uuid(primary.gen)
    plan = compare(primary.side(True), secondary.side(False, discard))
    theirs, mirrored = compare(secondary.side(False, discard), primary.side(True)), plan.mirrored()
    # The same decision from both sides (the reason is worded from each side's view).
    assert (theirs.kind, theirs.source, theirs.rule) == (mirrored.kind, mirrored.source, mirrored.rule)
    if plan.refused:
        return plan
    if plan.kind is not Kind.IN_SYNC:
        # Both sides pick the sync identifier from what each saw in the handshake.
        sync_id = g.sync_uuid_for(plan, primary.gen, offered)
        assert g.sync_uuid_for(theirs, primary.gen, offered) == sync_id
        primary.gen = g.begin_sync_source(primary.gen, sync_id)
        primary.trusted = primary.trusted or plan.kind is Kind.FULL  # every block is marked first
        if lost:
            return plan
        secondary.gen = g.begin_sync_target(secondary.gen, sync_id)
    if finish:
        primary.gen = g.finish_sync_source(primary.gen)
        primary.trusted = True
        secondary.gen, secondary.trusted = primary.gen, True
    return plan


def in_sync_pair() -> tuple[Node, Node]:
    a1, a2 = Node(), Node()
    a1.serve_alone()
    assert connect(a1, a2).kind is Kind.FULL
    return a1, a2


def test_story_secondary_away_and_back() -> None:
    a1, a2 = in_sync_pair()
    a1.serve_alone()  # the supervisor resumes degraded
    assert connect(a1, a2).kind is Kind.BITMAP
    assert a1.gen.current == a2.gen.current and not a1.gen.bitmap


def test_story_restart_of_both_is_a_bitmap_resync() -> None:
    a1, a2 = in_sync_pair()
    a1.serve_alone()  # startHA again: a primary always starts without its peer
    assert connect(a1, a2).kind is Kind.BITMAP


def test_story_takeover_then_old_primary_rejoins() -> None:
    a1, a2 = in_sync_pair()
    a2.serve_alone()  # takeover after a1 crashed while in sync
    assert connect(a2, a1).kind is Kind.BITMAP
    a1b, a2b = in_sync_pair()
    a2b.serve_alone()
    a1b.trusted = False  # crashed as primary and no activity log
    assert connect(a2b, a1b).kind is Kind.FULL


def test_story_failover_and_back() -> None:
    a1, a2 = in_sync_pair()
    a2.serve_alone()  # failOver: a2 promoted, a1 idle
    assert connect(a2, a1).kind is Kind.BITMAP
    a1.serve_alone()  # failOver back
    assert connect(a1, a2).kind is Kind.BITMAP


def test_story_interrupted_sync_resumes_even_after_a_clean_restart() -> None:
    a1, a2 = in_sync_pair()
    a1.serve_alone()
    assert connect(a1, a2, finish=False).kind is Kind.BITMAP
    assert connect(a1, a2, finish=False).kind is Kind.BITMAP  # cut again
    a1.serve_alone()  # stopHA/startHA on the primary: its bitmap was saved
    assert connect(a1, a2).kind is Kind.BITMAP


def test_story_interrupted_initial_sync_resumes() -> None:
    a1, a2 = Node(), Node()
    a1.serve_alone()
    assert connect(a1, a2, finish=False).kind is Kind.FULL
    assert connect(a1, a2).kind is Kind.BITMAP


def test_story_lost_sync_starts_stay_bitmap_resyncs() -> None:
    a1, a2 = in_sync_pair()
    a1.serve_alone()
    assert connect(a1, a2, lost=True).rule == "r70"
    held = a2.gen
    for _ in range(3):  # the link fails right after every handshake: nothing is pushed out of history
        plan = connect(a1, a2, lost=True)
        assert (plan.kind, plan.rule) == (Kind.BITMAP, "r71") and a2.gen == held
        assert a1.gen.history[0] == held.current
    assert connect(a1, a2).rule == "r71"
    assert a1.gen.current == a2.gen.current and not a1.gen.bitmap


def test_story_lost_start_then_a_sync_cut_short_resumes() -> None:
    a1, a2 = in_sync_pair()
    a1.serve_alone()
    connect(a1, a2, lost=True)
    assert connect(a1, a2, finish=False).rule == "r71"  # now the secondary holds the sync identifier
    assert connect(a1, a2, lost=True).rule == "r70"
    assert connect(a1, a2, lost=True).rule == "r71"
    assert connect(a1, a2).kind is Kind.BITMAP


def test_story_lost_start_of_a_full_sync_from_an_untrusted_bitmap() -> None:
    a1, a2 = in_sync_pair()
    a1.serve_alone()
    a1.trusted = False  # crashed as primary, nothing recorded
    assert connect(a1, a2, lost=True).kind is Kind.FULL
    # The full sync marked every block before its identifier was saved: that bitmap is trusted now.
    assert connect(a1, a2).kind is Kind.BITMAP


def test_story_lost_start_then_the_primary_restarts() -> None:
    """Still a full sync: the restart pushes a generation between the lost start and the secondary's."""
    a1, a2 = in_sync_pair()
    a1.serve_alone()
    connect(a1, a2, lost=True)
    a1.serve_alone()
    plan = connect(a1, a2)
    assert (plan.kind, plan.rule) == (Kind.FULL, "r80")


def test_story_lost_start_of_an_initial_sync() -> None:
    a1, a2 = Node(), Node()
    a1.serve_alone()
    assert connect(a1, a2, lost=True).rule == "r30"
    assert connect(a1, a2, lost=True).rule == "r30"  # a new disk gets everything anyway
    assert connect(a1, a2).kind is Kind.FULL


def test_story_partition_is_a_split_brain_until_resolved() -> None:
    a1, a2 = in_sync_pair()
    a1.serve_alone()  # continued alone
    a2.serve_alone()  # took over
    assert connect(a2, a1).kind is Kind.SPLIT_BRAIN
    assert connect(a1, a2).kind is Kind.SPLIT_BRAIN
    plan = connect(a2, a1, discard=True)
    assert plan.kind is Kind.BITMAP and plan.resolves
    a2.serve_alone()
    assert connect(a2, a1).kind is Kind.BITMAP  # an ordinary pair again


def test_story_stale_primary_started_while_the_other_was_down() -> None:
    a1, a2 = in_sync_pair()
    a2.serve_alone()  # took over, then was stopped
    a1.serve_alone()  # old primary started alone on old data
    assert connect(a1, a2).kind is Kind.SPLIT_BRAIN


def test_story_two_disks_used_apart_are_unrelated() -> None:
    a1, a2 = Node(), Node()
    a1.serve_alone()
    a2.serve_alone()
    a1.serve_alone()
    assert connect(a1, a2).kind is Kind.UNRELATED
    assert connect(a1, a2, discard=True).kind is Kind.FULL


@pytest.mark.parametrize("secondary_served_after", [False, True])
def test_story_restore_on_the_primary_gives_the_secondary_a_full_sync(secondary_served_after: bool) -> None:
    a1, a2 = in_sync_pair()
    if secondary_served_after:  # a failOver and back before the backup was restored
        a2.serve_alone()
        connect(a2, a1)
    a1.gen = g.restored(a1.gen, next(Node._ids))  # mirrord restore, HA stopped on both
    a1.serve_alone()  # startHA on the primary first
    plan = connect(a1, a2)  # then on the secondary
    assert plan.kind is Kind.FULL and plan.source == "local" and plan.rule not in g.FRESH_OR_UNRELATED, plan
    assert a1.gen.current == a2.gen.current


def test_restored_keeps_the_old_identifiers_in_the_history() -> None:
    old = Generations("a" * 16, "b" * 16, ("c" * 16,))
    new = g.restored(old, "d" * 16)
    assert new.current == "d" * 16 and not new.bitmap and new.history[:2] == ("a" * 16, "b" * 16)
    assert len(new.history) <= g.HISTORY


# -- a model of the data: no plan may ever sync less than differs ---------------------------

BLOCKS = 8


class Copy:
    """One appliance's identifiers and disk (block -> version), the primary's dirty bitmap of what
    its peer may lack, and whether that bitmap can be trusted."""

    def __init__(self) -> None:
        self.gen, self.trusted = Generations(), True
        self.disk: dict[int, int] = {}
        self.dirty: set[int] = set()


class Story:
    """A primary and a secondary moved by random operations, the identifiers by the daemon's rules."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.p, self.s = Copy(), Copy()
        self.versions = itertools.count(1)
        self.p.gen = g.start_writing_alone(self.p.gen, g.new_uuid())

    def write_alone(self, recorded: bool = True) -> None:
        if not self.p.gen.bitmap:  # the supervisor lets it write alone: a new data generation
            self.p.gen = g.start_writing_alone(self.p.gen, g.new_uuid())
        block = self.rng.randrange(BLOCKS)
        self.p.disk[block] = next(self.versions)
        if recorded:
            self.p.dirty.add(block)
        else:  # a crash of the primary that nothing recorded
            self.p.trusted = False

    def restart(self) -> None:
        self.p.gen = g.start_writing_alone(self.p.gen, g.new_uuid())

    def restore(self) -> None:
        for block in self.rng.sample(range(BLOCKS), 3):
            self.p.disk[block] = next(self.versions)
        self.p.gen, self.p.dirty, self.p.trusted = g.restored(self.p.gen, g.new_uuid()), set(), True
        self.restart()

    def connect(self, outcome: str) -> Plan:
        """outcome: "lost" (before the secondary notes the sync identifier), "cut" (part sent), "unsaved"
        (all sent and the primary finished, but the secondary crashed before it saved sync_done) or "done"."""
        p, s = self.p, self.s
        offered = g.next_sync_uuid(p.gen)
        plan = compare(Side(p.gen, True, p.trusted), Side(s.gen, False, s.trusted))
        if plan.refused or plan.kind is Kind.IN_SYNC:
            return plan
        if plan.kind is Kind.FULL:
            p.dirty = set(range(BLOCKS))
        p.gen = g.begin_sync_source(p.gen, g.sync_uuid_for(plan, p.gen, offered))
        p.trusted = p.trusted or plan.kind is Kind.FULL
        if outcome == "lost":
            return plan
        s.gen = g.begin_sync_target(s.gen, p.gen.bitmap)
        sent = set(self.rng.sample(sorted(p.dirty), len(p.dirty) // 2)) if outcome == "cut" else set(p.dirty)
        for block in sent:
            s.disk[block] = p.disk.get(block, 0)
        p.dirty -= sent
        if outcome in ("unsaved", "done"):
            p.gen = g.finish_sync_source(p.gen)
            if outcome == "done":
                s.gen = p.gen
            assert all(s.disk.get(b, 0) == p.disk.get(b, 0) for b in range(BLOCKS)), (plan, p.gen)
        return plan


STEPS = ("write", "write", "unrecorded", "restart", "restore", "lost", "lost", "cut", "unsaved", "done")


def play(seed: int) -> set[str]:
    """A random story; every finished sync asserts the disks are equal. Returns the rules seen."""
    story = Story(seed)
    rules: set[str] = set()
    for step in ["done", *(story.rng.choice(STEPS) for _ in range(14)), "done"]:
        if step in ("lost", "cut", "unsaved", "done"):
            plan = story.connect(step)
            rules.add(plan.rule)
            # Nothing here changes data on both sides: no story may end in a refusal.
            assert not plan.refused or plan.kind is Kind.UNRELATED, plan
        elif step == "write":
            story.write_alone()
        elif step == "unrecorded":
            story.write_alone(recorded=False)
        else:
            getattr(story, step)()
    return rules


@pytest.mark.parametrize("seed", range(300))
def test_no_plan_syncs_less_than_differs(seed: int) -> None:
    play(seed)


def test_the_stories_reach_every_rule_of_a_returning_secondary() -> None:
    assert {"r40", "r70", "r71", "r80"} <= set().union(*map(play, range(300)))


def test_story_lost_starts_of_a_full_sync_keep_the_secondary_in_the_history() -> None:
    """A restored primary owes its secondary a full sync (r80); the data connection fails right after
    the handshake three times. Each retry runs under the same sync identifier, so the secondary's
    generation stays in the primary's history and the fourth connect still syncs (it used to be
    refused as unrelated data from the third on)."""
    story = Story(7)
    story.connect("done")
    story.restore()
    for _ in range(3):
        plan = story.connect("lost")
        assert (plan.kind, plan.rule) == (Kind.FULL, "r80"), plan
        assert story.s.gen.current in story.p.gen.history
    plan = story.connect("done")  # asserts the disks are equal
    assert (plan.kind, plan.rule) == (Kind.FULL, "r80"), plan


@pytest.mark.parametrize(("source", "retried"), [
    (Generations(C, g._derived(B), (B, A)), True),    # last step: a sync start derived from history[0]
    (Generations(C, g._derived(A), (B, A)), False),   # derived from an older generation
    (Generations(C, B, (A,)), False),                 # a random bitmap identifier (writing alone)
    (Generations(C, "", (B,)), False),                # no bitmap
    (Generations(C, g._derived(B), ()), False),       # no history
])
def test_a_full_sync_reuses_only_an_unfinished_start(source: Generations, retried: bool) -> None:
    offered = "f" * 16
    full, bitmap = Plan(Kind.FULL, "local", "r80"), Plan(Kind.BITMAP, "local", "r70")
    assert g.sync_uuid_for(full, source, offered) == (source.bitmap if retried else offered)
    assert g.sync_uuid_for(bitmap, source, offered) == offered
