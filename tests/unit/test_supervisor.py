"""decide() table: every mode against the facts that matter to it."""

from __future__ import annotations

import itertools
import math

import pytest

from mirrord.modes import Mode
from mirrord.replication.meta import DiskState
from mirrord.supervisor import Action, Facts, decide

UP, INC, OUT = DiskState.UP_TO_DATE, DiskState.INCONSISTENT, DiskState.OUTDATED
P = 1.0  # ping interval


def facts(mode: Mode, **kw: object) -> Facts:
    base: dict[str, object] = dict(disk_state=UP, peer_connected=True, sync_percent=100.0, ping_interval=P,
                                   silent_sync=0.1, silent_public=0.1, peer_mode="primary", peer_disk="UpToDate")
    base.update(kw)
    return Facts(mode=mode, **base)  # type: ignore[arg-type]


SILENCES = [0.0, 0.5, 0.99, 1.0, 3.0, math.inf]


@pytest.mark.parametrize(("s_sync", "s_pub"), list(itertools.product(SILENCES, SILENCES)))
def test_secondary_takes_over_only_when_silent_on_both(s_sync: float, s_pub: float) -> None:
    d = decide(facts(Mode.SECONDARY, silent_sync=s_sync, silent_public=s_pub, peer_connected=False))
    both = s_sync >= P and s_pub >= P
    assert (d.action is Action.TAKEOVER) == both
    if both:
        assert "silent on both networks" in d.sentence and "taking over" in d.sentence
    elif s_sync >= P:
        assert "silent on the sync network" in d.sentence and "not acting" in d.sentence
    elif s_pub >= P:
        assert "silent on the public network" in d.sentence and "not acting" in d.sentence


@pytest.mark.parametrize("disk", [INC, OUT])
@pytest.mark.parametrize("started", [True, False])
def test_secondary_with_bad_disk_never_takes_over(disk: DiskState, started: bool) -> None:
    d = decide(facts(Mode.SECONDARY, disk_state=disk, silent_sync=math.inf, silent_public=math.inf,
                     peer_connected=False, sync_started=started))
    assert d.action is not Action.TAKEOVER
    if disk is INC and started:
        assert d.action is Action.SYNC_INTERRUPTED and "will not be promoted" in d.sentence
    else:
        assert str(disk) in d.sentence and "not taking over" in d.sentence


def test_interrupted_sync_is_noticed_before_anything_else() -> None:
    d = decide(facts(Mode.SECONDARY, disk_state=INC, sync_started=True, peer_connected=False, synced=False,
                     silent_sync=9, silent_public=9))
    assert d.action is Action.SYNC_INTERRUPTED


def test_isolated_secondary_does_not_take_over() -> None:
    d = decide(facts(Mode.SECONDARY, silent_sync=5, silent_public=5, peer_connected=False, my_links_up=False))
    assert d.action is Action.NONE and "isolated" in d.sentence


@pytest.mark.parametrize(("links_up_for", "expected"), [
    (0.0, Action.NONE),         # its cables just came back: the silence was heard with them out
    (1.9, Action.NONE),         # under two pingIntervals since: the primary may not have been heard yet
    (2.0, Action.TAKEOVER),     # silent for two pingIntervals with our links up
    (math.inf, Action.TAKEOVER),
])
def test_a_secondary_whose_links_just_came_back_listens_before_taking_over(links_up_for: float,
                                                                           expected: Action) -> None:
    """Found by the torture (cut-all of the secondary): the moment its links were back, the
    secondary took over on a silence counted across its isolation, while the primary, which had
    reached the witness, went on alone: a split brain."""
    d = decide(facts(Mode.SECONDARY, silent_sync=4, silent_public=4, peer_connected=False, witness_ok=True,
                     links_up_for=links_up_for))
    assert d.action is expected, d.sentence
    if expected is Action.NONE:
        assert "listening for the primary" in d.sentence


@pytest.mark.parametrize(("witness", "expected"), [(None, Action.TAKEOVER), (True, Action.TAKEOVER),
                                                   (False, Action.NONE)])
def test_witness_gates_takeover(witness: bool | None, expected: Action) -> None:
    d = decide(facts(Mode.SECONDARY, silent_sync=5, silent_public=5, peer_connected=False, witness_ok=witness))
    assert d.action is expected


def test_secondary_interrupted_sync_while_primary_heard() -> None:
    d = decide(facts(Mode.SECONDARY, disk_state=INC, peer_connected=False, sync_started=True, sync_percent=42.0))
    assert d.action is Action.SYNC_INTERRUPTED and "42.0 %" in d.sentence


@pytest.mark.parametrize(("connected", "disk", "wants", "expected"), [
    (False, UP, True, Action.OUTDATE_SELF),
    (True, UP, True, Action.OUTDATE_SELF),
    (False, OUT, True, Action.NONE),
    (False, UP, False, Action.NONE),
])
def test_secondary_outdates_itself_when_asked(connected: bool, disk: DiskState, wants: bool,
                                              expected: Action) -> None:
    d = decide(facts(Mode.SECONDARY, peer_connected=connected, disk_state=disk, peer_wants_outdate=wants))
    assert d.action is expected


@pytest.mark.parametrize(("connected", "predates", "expected"), [
    (True, True, Action.NONE),           # a new link (and sync) since the request: it is stale (torture, seed 20261122)
    (True, False, Action.OUTDATE_SELF),  # our link may be the one the primary lost
    (False, True, Action.OUTDATE_SELF),  # that newer link is gone as well
    (False, False, Action.OUTDATE_SELF),
])
def test_an_outdate_request_seen_before_the_current_link_is_stale(connected: bool, predates: bool,
                                                                   expected: Action) -> None:
    d = decide(facts(Mode.SECONDARY, peer_connected=connected, disk_state=UP, peer_wants_outdate=True,
                     request_predates_link=predates))
    assert d.action is expected


def test_secondary_states_in_sentences() -> None:
    assert "in sync" in decide(facts(Mode.SECONDARY)).sentence
    assert "receiving a sync" in decide(facts(Mode.SECONDARY, disk_state=INC)).sentence
    assert "not replicating" in decide(facts(Mode.SECONDARY, peer_connected=False)).sentence


@pytest.mark.parametrize(("connected", "disk", "expected"), [
    (True, UP, Action.SYNC_DONE), (True, INC, Action.NONE), (False, INC, Action.NONE), (False, UP, Action.NONE)])
def test_inconsistent(connected: bool, disk: DiskState, expected: Action) -> None:
    d = decide(facts(Mode.INCONSISTENT, peer_connected=connected, disk_state=disk, silent_sync=9, silent_public=9))
    assert d.action is expected
    assert d.action is not Action.TAKEOVER


@pytest.mark.parametrize("gap", [0.0, 0.5, 0.99, 1.0, 2.5, 30.0])
def test_primary_steps_down_after_a_stall_that_broke_the_link(gap: float) -> None:
    d = decide(facts(Mode.PRIMARY, peer_mode="secondary", clock_gap=gap, peer_connected=False, io_suspended=True))
    assert (d.action is Action.STEP_DOWN) == (gap >= P)


@pytest.mark.parametrize(("connected", "suspended", "peer_disk", "expected"), [
    (True, False, "UpToDate", Action.NONE),          # still acknowledged: no takeover happened
    (False, True, "UpToDate", Action.STEP_DOWN),
    (False, False, "UpToDate", Action.STEP_DOWN),
    (True, True, "UpToDate", Action.STEP_DOWN),
    (False, True, "Inconsistent", Action.RESUME_DEGRADED),  # could not have taken over: fencing rules apply
    (False, True, None, Action.REQUEST_OUTDATE),
])
def test_what_a_stall_means(connected: bool, suspended: bool, peer_disk: str | None, expected: Action) -> None:
    d = decide(facts(Mode.PRIMARY, peer_mode="secondary", clock_gap=2.0, peer_connected=connected,
                     io_suspended=suspended, peer_disk=peer_disk))
    assert d.action is expected


@pytest.mark.parametrize(("mine", "theirs", "expected"), [
    (1, 2, Action.STEP_DOWN), (2, 2, Action.STEP_DOWN), (3, 2, Action.NONE)])
def test_the_newer_primary_never_yields(mine: int, theirs: int, expected: Action) -> None:
    d = decide(facts(Mode.PRIMARY, peer_mode="primary", epoch=mine, peer_epoch=theirs))
    assert d.action is expected


@pytest.mark.parametrize(("peer_mode", "silent", "expected"), [
    ("primary", 0.1, Action.STEP_DOWN),
    ("primary", 5.0, Action.NONE),       # an old heartbeat saying primary is not news
    ("secondary", 0.1, Action.NONE),
    ("standalone", 0.1, Action.NONE),
    (None, math.inf, Action.NONE),
])
def test_primary_hears_another_primary(peer_mode: str | None, silent: float, expected: Action) -> None:
    d = decide(facts(Mode.PRIMARY, peer_mode=peer_mode, silent_sync=silent, silent_public=silent))
    assert d.action is expected


FENCING = [
    # heard?, peer disk, witness, expected
    (True, "UpToDate", None, Action.REQUEST_OUTDATE),
    (True, "Outdated", None, Action.RESUME_DEGRADED),
    (True, "Inconsistent", None, Action.RESUME_DEGRADED),
    (True, None, None, Action.REQUEST_OUTDATE),
    (False, "UpToDate", None, Action.RESUME_DEGRADED),
    (False, "UpToDate", True, Action.RESUME_DEGRADED),
    (False, "UpToDate", False, Action.STEP_DOWN),
]


@pytest.mark.parametrize(("heard", "peer_disk", "witness", "expected"), FENCING)
def test_primary_fencing(heard: bool, peer_disk: str | None, witness: bool | None, expected: Action) -> None:
    silent = 0.1 if heard else 2.0
    d = decide(facts(Mode.PRIMARY, peer_connected=False, io_suspended=True, peer_mode="secondary",
                     peer_disk=peer_disk, silent_sync=silent, silent_public=silent, witness_ok=witness))
    assert d.action is expected


@pytest.mark.parametrize("peer_disk", ["UpToDate", "Outdated", None])
@pytest.mark.parametrize(("connected", "synced"), [(True, True), (True, False), (False, True), (False, False)])
def test_primary_suspended_releases_held_writes_once_the_peer_caught_up(
        connected: bool, synced: bool, peer_disk: str | None) -> None:
    """Found by the torture test: the link came back and the resync finished before the
    secondary's "Outdated" reached the primary; the caught-up secondary then ignores the old
    request, so waiting for Outdated held the writes forever. A finished resync on the new
    link (which ends with a flush) puts every held write on both disks: release them, and
    without writing alone."""
    d = decide(facts(Mode.PRIMARY, peer_connected=connected, link_synced=synced, io_suspended=True,
                     peer_mode="secondary", peer_disk=peer_disk))
    if connected and synced:
        assert d.action is Action.RESUME_MIRRORED and "releasing them" in d.sentence
    else:
        assert d.action in (Action.REQUEST_OUTDATE, Action.RESUME_DEGRADED)


def test_primary_suspended_steps_down_before_releasing_anything() -> None:
    d = decide(facts(Mode.PRIMARY, peer_connected=True, link_synced=True, io_suspended=True, peer_mode="primary",
                     peer_epoch=9, epoch=3))
    assert d.action is Action.STEP_DOWN


def test_primary_fencing_waits_while_peer_fades() -> None:
    d = decide(facts(Mode.PRIMARY, peer_connected=False, io_suspended=True, peer_mode="secondary",
                     silent_sync=0.5, silent_public=3.0))
    assert d.action is Action.REQUEST_OUTDATE  # heard on sync half a second ago: alive


def test_primary_sentences() -> None:
    assert "degraded" in decide(facts(Mode.PRIMARY, peer_connected=False, peer_mode="secondary")).sentence
    assert "initial sync" in decide(facts(Mode.PRIMARY, peer_mode="secondary", sync_percent=50)).sentence
    assert "mirrored" in decide(facts(Mode.PRIMARY, peer_mode="secondary")).sentence


@pytest.mark.parametrize("mode", list(Mode))
def test_busy_means_no_action(mode: Mode) -> None:
    d = decide(facts(mode, busy="taking over", silent_sync=9, silent_public=9, clock_gap=9))
    assert d.action is Action.NONE and d.sentence == "Busy: taking over."


@pytest.mark.parametrize("mode", [Mode.STANDALONE, Mode.IDLE])
def test_passive_modes_never_act(mode: Mode) -> None:
    for gap, silent in itertools.product([0, 9], [0.1, math.inf]):
        d = decide(facts(mode, clock_gap=gap, silent_sync=silent, silent_public=silent, peer_mode="primary"))
        assert d.action is Action.NONE


def test_never_synced_secondary_does_not_take_over() -> None:
    d = decide(facts(Mode.SECONDARY, silent_sync=math.inf, silent_public=math.inf, peer_connected=False,
                     synced=False))
    assert d.action is Action.NONE and "has not completed a sync" in d.sentence


@pytest.mark.parametrize("last", ["standalone", "idle"])
def test_primary_that_left_ha_is_not_replaced(last: str) -> None:
    d = decide(facts(Mode.SECONDARY, silent_sync=5, silent_public=5, peer_connected=False, peer_mode=last))
    assert d.action is Action.NONE and "left HA" in d.sentence


@pytest.mark.parametrize(("healthy", "restarts", "connected", "sync", "expected"), [
    (None, 0, True, 100.0, Action.NONE),
    (True, 0, True, 100.0, Action.NONE),
    (False, 0, True, 100.0, Action.RESTART_APP),
    (False, 2, True, 100.0, Action.RESTART_APP),
    (False, 3, True, 100.0, Action.HAND_OVER),
    (False, 3, True, 50.0, Action.NONE),
    (False, 3, False, 100.0, Action.NONE),
])
def test_failing_application(healthy: bool | None, restarts: int, connected: bool, sync: float,
                             expected: Action) -> None:
    d = decide(facts(Mode.PRIMARY, peer_mode="secondary", app_healthy=healthy, app_restarts=restarts,
                     restart_limit=3, peer_connected=connected, sync_percent=sync))
    assert d.action is expected


def test_a_failed_application_is_handed_over_only_after_a_running_verify() -> None:
    failed = dict(peer_mode="secondary", app_healthy=False, app_restarts=3, restart_limit=3, peer_connected=True,
                  sync_percent=100.0)
    d = decide(facts(Mode.PRIMARY, verifying=True, **failed))
    assert d.action is Action.NONE and "once mirrord verify has finished" in d.sentence
    assert decide(facts(Mode.PRIMARY, verifying=False, **failed)).action is Action.HAND_OVER


@pytest.mark.parametrize("split_brain", [True, False])
def test_two_primaries_after_a_partition_step_down_without_touching_the_data(split_brain: bool) -> None:
    d = decide(facts(Mode.PRIMARY, peer_mode="primary", epoch=1, peer_epoch=2, split_brain=split_brain))
    assert d.action is Action.STEP_DOWN
    assert ("split brain" in d.sentence and "nothing is synced" in d.sentence) == split_brain
    assert decide(facts(Mode.PRIMARY, peer_mode="primary", epoch=2, peer_epoch=1,
                        split_brain=split_brain)).action is not Action.STEP_DOWN
