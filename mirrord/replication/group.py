"""The pair's volumes, which change role together: DRBD's resource with volumes 0..n-1.

Each volume keeps everything of its own, as one volume did before: its disk,
metadata (generation identifiers, disk state, bitmap, activity log), C data
path, FUSE file, loop device, mount point and replication connections (port
per volume, config.volume_port). What they share is the role: the daemon
promotes, steps down, hands over and tears down all of them at once, and the
supervisor sees one set of facts for the group:

* the disk state is the *worst* of the volumes' (an appliance may take over
  only if every one of its disks is UpToDate);
* the link is up only when every volume's link is up, and sync progress is
  the share of all disks' bytes the secondary has;
* I/O counts as held (fencing) when any volume holds it.

Fate sharing. In DRBD the volumes of a resource share one connection, so they
lose and regain the peer together. Here each volume has its own connections,
and one can break alone (a corrupt frame, a reset). The fencing rules assume
the DRBD picture: a primary that lost its link asks the secondary to mark
its disk Outdated before it writes alone, and the secondary marks *all* its
volumes Outdated (its aggregate state is what the primary waits for). A
volume whose link stayed up would then stay Outdated while in sync, and the
pair could never fail over again. So the primary drops every volume's link
as soon as one is lost (:meth:`PrimaryGroup.share_fate`): all of them go
through fencing and reconnect, and each reconnect ends in a bitmap resync of
what that volume wrote meanwhile (often nothing), after which the secondary
marks it UpToDate again.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager
from typing import Any, Iterable, Iterator

from mirrord.errors import MirrordError, Refused
from mirrord.replication.meta import DiskState, update_together
from mirrord.replication.primary import PrimarySide
from mirrord.replication.secondary import SecondarySide

#: Worst first: the order in which one volume's state spoils the group's.
_BADNESS = (DiskState.INCONSISTENT, DiskState.OUTDATED, DiskState.UP_TO_DATE)


def worst(states: Iterable[DiskState]) -> DiskState:
    """The group's disk state: the worst of its volumes' (UpToDate only if all are)."""
    present = set(states)
    return next((s for s in _BADNESS if s in present), DiskState.UP_TO_DATE)


def weighted_percent(parts: Iterable[tuple[float, int]]) -> float:
    """Sync progress of the group: (percent, disk size) per volume -> percent of all bytes."""
    items = list(parts)
    total = sum(size for _, size in items)
    if total <= 0:
        return 100.0
    return sum(percent * size for percent, size in items) / total


def links_lost(before: list[tuple[bool, int]], now: list[tuple[bool, int]],
               dropped: list[int | None]) -> list[int]:
    """The volumes whose link was lost since ``before``: (up, session) per volume, then and now.

    A link is lost when it was up and is now down or is another session
    (lost and reconnected between two looks); a session that share_fate
    dropped itself (``dropped``) does not count, or one loss would make the
    volumes drop each other for ever.
    """
    return [i for i, ((was_up, was_session), (up, session)) in enumerate(zip(before, now))
            if was_up and (not up or session != was_session) and dropped[i] != was_session]


class PrimaryGroup:
    """This appliance's volumes while it is primary (started and stopped together)."""

    def __init__(self, sides: list[PrimarySide]) -> None:
        assert sides
        self.sides = sides
        #: per volume, as share_fate last saw it: (link up, session number)
        self._seen: list[tuple[bool, int]] = [(False, 0)] * len(sides)
        #: per volume, the session share_fate itself dropped (its loss is not news)
        self._dropped: list[int | None] = [None] * len(sides)
        #: held by a verify or a hand-over, start to end: they never overlap (exclusive())
        self._exclusive = threading.Lock()

    @property
    def lead(self) -> PrimarySide:
        """Volume r0: its control connection carries the pair-wide messages (promote, failover_request)."""
        return self.sides[0]

    def start(self) -> None:
        """Expose (and mount) every volume; if one fails, the ones already started are stopped again."""
        started: list[PrimarySide] = []
        try:
            for side in self.sides:
                side.start()
                started.append(side)
        except MirrordError:
            for side in reversed(started):
                side.stop()
            raise

    # -- facts -------------------------------------------------------------------
    @property
    def in_sync(self) -> bool:
        return all(s.peer.connected and s.peer.sync_done for s in self.sides)

    def link_up(self) -> bool:
        return all(s.peer.connected and s.server is not None and s.server.stats().peer_connected for s in self.sides)

    def connected(self) -> bool:
        return all(s.peer.connected for s in self.sides)

    @property
    def sync_percent(self) -> float:
        return weighted_percent((s.peer.sync_percent, s.disk_size) for s in self.sides)

    def io_suspended(self) -> bool:
        return any(s.server is not None and s.server.stats().suspended for s in self.sides)

    def failed_io(self) -> bool:
        return any(s.server is not None and s.server.stats().failed_io for s in self.sides)

    @property
    def last_error(self) -> str:
        return next((f"{s.settings.volume}: {s.peer.last_error}" if len(self.sides) > 1 else s.peer.last_error
                     for s in self.sides if s.peer.last_error), "")

    # -- actions ---------------------------------------------------------------
    def share_fate(self) -> str:
        """Lost one volume's link: drop the others' too (see the module docstring). Returns a
        sentence for ha.log when it did something, else ""."""
        if len(self.sides) == 1:
            return ""
        now = [(s.sessions, s.server is not None and s.server.stats().peer_connected) for s in self.sides]
        seen = [(up, session) for session, up in now]
        lost = links_lost(self._seen, seen, self._dropped)
        self._seen = seen
        if not lost:
            return ""
        dropped = []
        for i, side in enumerate(self.sides):
            up, session = seen[i]
            if i not in lost and up and side.drop_link():
                self._dropped[i] = session
                dropped.append(side.settings.volume)
        if not dropped:
            return ""
        return (f"Volume {self.sides[lost[0]].settings.volume} lost the replication link: dropped the links of "
                f"{', '.join(dropped)} too, so all volumes reconnect and resync together.")

    def resume(self, degraded: bool) -> None:
        """Release held I/O on every volume: written alone (degraded) or failed (stepping down)."""
        for side in self.sides:
            if side.server is None:
                continue
            if degraded:
                side.start_writing_alone()  # persisted before the first write is acknowledged
            side.server.resume(degraded=degraded)

    def release_held(self) -> bool:
        """The peer reconnected and its resync brought the writes held since the link was lost to
        its disk: answer them, without starting to write alone. Only on a connection that is still
        the one whose resync finished (the data path checks it under its own lock): if the link
        went again meanwhile, those writes would be acknowledged from this disk alone, with the
        secondary neither Outdated nor told. False when a volume stays suspended for that reason."""
        released = True
        for side in self.sides:
            if side.server is not None and side.server.stats().suspended:
                released &= side.peer.synced_link >= 0 and side.server.resume_caught_up(side.peer.synced_link)
        return released

    def release_alone(self) -> None:
        """stopHA on a suspended primary: the operator ends the pair, so the held writes are
        answered from this disk alone, after this appliance moved to a new data generation like a
        resume degraded (else a later sync from the peer would silently overwrite them)."""
        for side in self.sides:
            if side.server is not None and side.server.stats().suspended:
                side.start_writing_alone()  # persisted before the first write is acknowledged
                side.server.resume(degraded=True)

    def hand_over(self) -> None:
        """failOver: every filesystem released (flushed through the mirror), then the peer told once."""
        if not self.in_sync:
            raise Refused("The secondary is not connected and in sync: a failOver now would lose data. "
                          "Wait until HAstatus shows it UpToDate.")
        for side in self.sides[1:]:  # on failure the daemon remounts them (remount())
            side.release_filesystem()
        self.lead.hand_over()

    def remount(self) -> None:
        for side in self.sides:
            side.remount()

    def release_filesystems(self, force: bool = False) -> None:
        for side in self.sides:
            side.release_filesystem(force=force)

    def stop(self) -> None:
        for side in self.sides:
            side.stop()

    def set_settings(self, volumes: list[Any], secret: bytes | None) -> None:
        """configureHA on the primary: the live-changeable settings, per volume."""
        for side, settings in zip(self.sides, volumes):
            side.settings = settings
            side.secret = secret
            side.apply_resync_rate()

    def verifying(self) -> bool:
        """A verify (or a hand-over) holds exclusive(): a hand-over now would be refused."""
        return self._exclusive.locked()

    @contextmanager
    def exclusive(self, refusal: str) -> Iterator[None]:
        """Run a verify or a hand-over only while the other is not running (``refusal`` says why not).

        A hand-over during a verify would promote a secondary holding blocks the verify found
        wrong, or, once it has been told so (decision 42), one that refuses to be promoted after
        this primary gave up its role.
        """
        if not self._exclusive.acquire(blocking=False):
            raise Refused(refusal)
        try:
            yield
        finally:
            self._exclusive.release()

    def verify(self) -> tuple[int, int]:
        compared = differed = 0
        with self.exclusive("A failOver or another mirrord verify is under way: run mirrord verify again when it "
                            "is done."):
            for side in self.sides:
                c, d = side.verify()
                compared, differed = compared + c, differed + d
        return compared, differed

    def volumes_status(self) -> list[dict[str, Any]]:
        out = []
        for side in self.sides:
            stats = side.server.stats() if side.server is not None else None
            out.append({"name": side.settings.volume, "disk": str(side.settings.disk),
                        "mount": str(side.settings.mount) if side.settings.mount else None,
                        "device": str(side.device_file), "state": "UpToDate",
                        "peer_connected": side.peer.connected,
                        "sync_percent": round(side.peer.sync_percent if side.peer.connected else 0.0, 2),
                        "suspended": bool(stats and stats.suspended),
                        "out_of_sync_bytes": stats.dirty_bytes if stats else None,
                        "peer_error": side.peer.last_error})
        return out


class SecondaryGroup:
    """This appliance's volumes while it follows the primary."""

    def __init__(self, sides: list[SecondarySide]) -> None:
        assert sides
        self.sides = sides

    @property
    def lead(self) -> SecondarySide:
        return self.sides[0]

    def start(self) -> None:
        started: list[SecondarySide] = []
        try:
            for side in self.sides:
                side.start()
                started.append(side)
        except OSError:
            for side in started:
                side.stop()
            raise

    @property
    def disk_state(self) -> DiskState:
        return worst(s.meta.disk_state for s in self.sides)

    def connected(self) -> bool:
        return all(s.primary.connected for s in self.sides)

    @property
    def sync_percent(self) -> float:
        return weighted_percent((s.primary.sync_percent, s.disk_size) for s in self.sides)

    @property
    def sync_started(self) -> bool:
        return any(s.primary.sync_started for s in self.sides)

    @property
    def synced(self) -> bool:
        return all(s.primary.synced for s in self.sides)

    @property
    def since(self) -> float:
        """When the oldest current link began: an outdate request seen after it is not stale."""
        return min(s.primary.since for s in self.sides)

    @property
    def last_error(self) -> str:
        return next((f"{s.settings.volume}: {s.primary.last_error}" if len(self.sides) > 1 else s.primary.last_error
                     for s in self.sides if s.primary.last_error), "")

    def outdate(self) -> None:
        """The primary continues without us: our copies fall behind and must never be promoted.

        Every complete copy becomes Outdated, on disk before the group's state says so (the
        heartbeats carry it, and the primary goes on alone once it hears it; update_together).
        An Inconsistent copy (a sync cut short) is worse than old: calling it Outdated would let a
        backup or an operator take it for whole.
        """
        update_together(self.sides[0].home, [(s.meta, s.settings.volume, {"disk_state": DiskState.OUTDATED})
                                             for s in self.sides if s.meta.disk_state is DiskState.UP_TO_DATE])

    def request_failover(self) -> None:
        """failOver run here: every volume must be able to take over before the primary is asked."""
        for side in self.sides:
            if not side.primary.connected:
                raise Refused(f"The primary is not connected on volume {side.settings.volume}: a graceful failOver "
                              "needs it. If it is dead, the takeover is automatic.")
            if side.meta.disk_state is not DiskState.UP_TO_DATE:
                raise Refused(f"Volume {side.settings.volume} is {side.meta.disk_state}: it cannot take over until "
                              "its sync completes.")
        self.lead.request_failover()

    def stop_following(self) -> None:
        for side in self.sides:
            side.stop_following()

    def leave(self) -> None:
        """stopHA: every complete copy Outdated and, in the same step under each side's _turn, no
        more following (a sync_done recorded in between would mark a copy UpToDate again). A failed
        save changes nothing: the sides follow on, and stopHA can be run again."""
        with ExitStack() as stack:
            for side in self.sides:
                stack.enter_context(side.turn())
            self.outdate()
            for side in self.sides:
                side.stop_following(turn_held=True)

    def stop(self) -> None:
        for side in self.sides:
            side.stop()

    def receiver_stats(self) -> dict[str, object]:
        return self.lead.receiver_stats()

    def volumes_status(self) -> list[dict[str, Any]]:
        return [{"name": s.settings.volume, "disk": str(s.settings.disk),
                 "mount": str(s.settings.mount) if s.settings.mount else None,
                 "state": str(s.meta.disk_state), "peer_connected": s.primary.connected,
                 "sync_percent": round(s.primary.sync_percent, 2), "peer_error": s.primary.last_error}
                for s in self.sides]
