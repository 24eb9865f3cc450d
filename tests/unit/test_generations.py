"""Generation identifiers: DRBD's rule table, the rules that move them, and whole stories of a pair."""

from __future__ import annotations

import itertools

import pytest

from mirrord.replication import generations as g
from mirrord.replication.generations import Generations, Kind, Plan, Side, compare, relation

A, B, C, D, E, F, S = ("a" * 16, "b" * 16, "c" * 16, "d" * 16, "e" * 16, "f" * 16, "5" * 16)


def gen(current: str = "", bitmap: str = "", *history: str) -> Generations:
    return Generations(current, bitmap, tuple(history))


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
    ("my current in peer's history[0]", gen(A), gen(B, C, A), Kind.FULL, "peer", "r60"),
    ("my current in peer's history[1]", gen(A), gen(B, C, D, A), Kind.FULL, "peer", "r60"),
    ("my bitmap is peer's current", gen(B, A), gen(A), Kind.BITMAP, "local", "r70"),
    ("my bitmap is the sync id the peer holds", gen(A, S, B), gen(S), Kind.BITMAP, "local", "r70"),
    ("peer's current in my history[0]", gen(B, C, A), gen(A), Kind.FULL, "local", "r80"),
    ("peer's current in my history[1]", gen(B, C, D, A), gen(A), Kind.FULL, "local", "r80"),
    ("peer's current in my history, no bitmap", gen(B, "", A), gen(A), Kind.FULL, "local", "r80"),
    ("both bitmaps are the common ancestor", gen(B, A), gen(C, A), Kind.SPLIT_BRAIN, None, "r90"),
    ("common ancestor, histories differ", gen(B, A, D), gen(C, A, E), Kind.SPLIT_BRAIN, None, "r90"),
    ("histories share a generation", gen(B, C, A), gen(D, E, A), Kind.SPLIT_BRAIN, None, "r100"),
    ("my bitmap in peer's history", gen(B, A), gen(D, E, A), Kind.SPLIT_BRAIN, None, "r100"),
    ("peer's bitmap in my history", gen(D, E, A), gen(B, A), Kind.SPLIT_BRAIN, None, "r100"),
    ("history[1] matches", gen(B, "", C, A), gen(D, "", E, A), Kind.SPLIT_BRAIN, None, "r100"),
    ("nothing in common", gen(A), gen(B), Kind.UNRELATED, None, "r110"),
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


def test_start_writing_alone() -> None:
    assert g.start_writing_alone(gen(), A) == gen(A)
    assert g.start_writing_alone(gen(A, "", C), B) == gen(B, A, C)
    assert g.start_writing_alone(gen(B, A), C) == gen(C, A, B)  # the bitmap still reaches back to A
    assert g.start_writing_alone(gen(C, A, B, D), E) == gen(E, A, C, B)  # history is bounded


def test_sync_rules() -> None:
    assert g.begin_sync_source(gen(B, A), S) == gen(B, S, A)
    assert g.begin_sync_source(gen(B), S) == gen(B, S)
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


def connect(primary: Node, secondary: Node, discard: bool = False, finish: bool = True) -> Plan:
    """The handshake and, unless refused, the sync (cut short if not ``finish``)."""
    plan = compare(primary.side(True), secondary.side(False, discard))
    theirs, mirrored = compare(secondary.side(False, discard), primary.side(True)), plan.mirrored()
    # The same decision from both sides (the reason is worded from each side's view).
    assert (theirs.kind, theirs.source, theirs.rule) == (mirrored.kind, mirrored.source, mirrored.rule)
    if plan.refused:
        return plan
    if plan.kind is not Kind.IN_SYNC:
        sync_id = next(Node._ids)
        primary.gen = g.begin_sync_source(primary.gen, sync_id)
        primary.trusted = primary.trusted or plan.kind is Kind.FULL
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
