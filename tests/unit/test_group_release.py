"""A primary group releasing writes held after a lost link (session 7 review).

After a resync the held writes are released only on the link whose resync finished
(the data path checks it: tests/unit/test_fencing_api.py); a stopHA on a suspended
primary answers them alone, and moves to a new data generation first.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from mirrord.replication.group import PrimaryGroup


class Server:
    def __init__(self, suspended: bool, caught_up: bool = True) -> None:
        self.suspended, self.caught_up = suspended, caught_up
        self.calls: list[Any] = []

    def stats(self) -> SimpleNamespace:
        return SimpleNamespace(suspended=self.suspended)

    def resume_caught_up(self, link: int) -> bool:
        self.calls.append(("caught_up", link))
        if self.caught_up:
            self.suspended = False
        return self.caught_up

    def resume(self, degraded: bool) -> None:
        self.calls.append(("resume", degraded))
        self.suspended = False


def _side(server: Server, synced_link: int, log: list[str], name: str) -> SimpleNamespace:
    return SimpleNamespace(server=server, peer=SimpleNamespace(synced_link=synced_link),
                           start_writing_alone=lambda: log.append(f"{name}: new generation"))


def test_release_after_a_resync_uses_the_link_each_volume_saw_catch_up() -> None:
    log: list[str] = []
    a, b, c = Server(True), Server(False), Server(True)
    group = PrimaryGroup([_side(a, 3, log, "r0"), _side(b, 5, log, "r1"), _side(c, 7, log, "r2")])  # type: ignore[list-item]
    assert group.release_held()
    assert a.calls == [("caught_up", 3)] and b.calls == [] and c.calls == [("caught_up", 7)]
    assert log == []  # not writing alone: the peer has every held write


def test_release_refused_when_the_link_went_or_never_caught_up() -> None:
    log: list[str] = []
    gone, never = Server(True, caught_up=False), Server(True)
    group = PrimaryGroup([_side(gone, 3, log, "r0"), _side(never, -1, log, "r1")])  # type: ignore[list-item]
    assert not group.release_held()
    assert gone.suspended and never.suspended and never.calls == []


def test_stop_ha_on_a_suspended_primary_moves_to_a_new_generation_before_answering() -> None:
    log: list[str] = []
    a, b = Server(True), Server(False)

    def resume(server: Server, name: str) -> Any:
        def run(degraded: bool) -> None:
            log.append(f"{name}: released")
            Server.resume(server, degraded)
        return run

    a.resume = resume(a, "r0")  # type: ignore[method-assign]
    b.resume = resume(b, "r1")  # type: ignore[method-assign]
    PrimaryGroup([_side(a, 1, log, "r0"), _side(b, 1, log, "r1")]).release_alone()  # type: ignore[list-item]
    assert log == ["r0: new generation", "r0: released"]  # r1 held nothing: no new generation there
