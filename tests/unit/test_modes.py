import itertools

import pytest

from mirrord.errors import Refused
from mirrord.modes import TRANSITIONS, Event, Mode, allowed, transition

EXPECTED = {
    (Mode.STANDALONE, Event.START_PRIMARY): Mode.PRIMARY,
    (Mode.STANDALONE, Event.START_SECONDARY): Mode.SECONDARY,
    (Mode.IDLE, Event.START_SECONDARY): Mode.SECONDARY,
    (Mode.INCONSISTENT, Event.START_SECONDARY): Mode.SECONDARY,
    (Mode.SECONDARY, Event.SYNC_INTERRUPTED): Mode.INCONSISTENT,
    (Mode.INCONSISTENT, Event.SYNC_DONE): Mode.SECONDARY,
    (Mode.SECONDARY, Event.SYNC_DONE): Mode.SECONDARY,
    (Mode.SECONDARY, Event.TAKEOVER): Mode.PRIMARY,
    (Mode.SECONDARY, Event.FAILOVER_PROMOTE): Mode.PRIMARY,
    (Mode.PRIMARY, Event.FAILOVER_DEMOTE): Mode.IDLE,
    (Mode.PRIMARY, Event.STEP_DOWN): Mode.STANDALONE,
    (Mode.SECONDARY, Event.STEP_DOWN): Mode.STANDALONE,
    **{(m, Event.STOP): Mode.STANDALONE for m in Mode},
}


@pytest.mark.parametrize(("mode", "event"), list(itertools.product(Mode, Event)))
def test_every_mode_event_pair(mode: Mode, event: Event) -> None:
    if (mode, event) in EXPECTED:
        assert allowed(mode, event)
        assert transition(mode, event) is EXPECTED[(mode, event)]
    else:
        assert not allowed(mode, event)
        with pytest.raises(Refused) as info:
            transition(mode, event)
        message = str(info.value)
        assert str(mode) in message and str(event) in message
        assert info.value.exit_code == 3


def test_table_matches_expectation_exactly() -> None:
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize("event", [Event.TAKEOVER, Event.FAILOVER_PROMOTE])
def test_inconsistent_is_never_promoted(event: Event) -> None:
    with pytest.raises(Refused, match="incomplete"):
        transition(Mode.INCONSISTENT, event)


def test_idle_cannot_take_over() -> None:
    with pytest.raises(Refused, match="startHA"):
        transition(Mode.IDLE, Event.TAKEOVER)


def test_second_start_is_refused_with_advice() -> None:
    with pytest.raises(Refused, match="already running here as primary"):
        transition(Mode.PRIMARY, Event.START_PRIMARY)
