"""The secondary's side of a volume: accept the primary, apply its writes, never expose the disk.

One listener on the sync address takes both of the primary's connections
(see :mod:`mirrord.replication.link`). A control connection brings a hello,
which is checked (protocol version, disk size, volume) and answered with a
session token; the data connection presents that token and is then handed to
the C :class:`Receiver`, which applies frames in order of arrival and
acknowledges them. The disk is marked ``Inconsistent`` in the metadata
*before* the receiver may write, and ``UpToDate`` only when the primary says
the sync is complete: a crash in between leaves an appliance that knows it
must not be promoted.

Before any of that, both sides compare generation identifiers
(generations.py) and must reach the same plan; a split brain or unrelated
data refuses the primary and leaves this disk untouched. This side also
sends the blocks it changed on its own (its persisted bitmap: a primary that
stepped down, or the victim of a split brain) so the primary resends them.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from typing import Callable, Iterator

from mirrord.config import Endpoints, Settings
from mirrord.errors import HandshakeRefused, PeerError, Refused
from mirrord.halog import HALog
from mirrord.paths import Home
from mirrord.replication import extents, generations, link
from mirrord.replication.generations import Generations, Kind, Plan, Side
from mirrord.replication.meta import DiskState, VolumeMeta
from mirrord.replication.primary import plan_sentence
from mirrord.replication.native import Receiver

ACCEPT_POLL = 0.2
HANDSHAKE_TIMEOUT = 5.0


@dataclass
class PrimaryView:
    connected: bool = False
    sync_percent: float = 0.0
    sync_started: bool = False
    synced: bool = False  # a sync from this primary completed in this HA session
    since: float = 0.0    # time.monotonic() when this link began
    last_error: str = ""


class SecondarySide:
    def __init__(self, home: Home, settings: Settings, log: HALog, disk_size: int, meta: VolumeMeta,
                 ends: Endpoints, on_promote: Callable[[], None], secret: bytes | None,
                 discard_my_data: bool = False) -> None:
        self.secret = secret
        self.discard_my_data = discard_my_data
        self.home = home
        self.settings = settings
        self.ends = ends
        self.on_promote = on_promote
        self.log = log
        self.disk_size = disk_size
        self.meta = meta
        self.primary = PrimaryView(sync_percent=100.0 if meta.disk_state == DiskState.UP_TO_DATE else 0.0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        #: held by a data handshake from start to end: stop() waits for it (see _on_data)
        self._data_lock = threading.Lock()
        #: one session at a time (see "Sessions" above _on_hello); taken after _data_lock, before _lock
        self._turn = threading.Lock()
        #: the follower (synced) and a failOver command (failover_request) both write to the control link
        self._send_lock = threading.Lock()
        self._pending: str | None = None
        self._pending_sync: tuple[Plan, str] | None = None  # the agreed plan and the sync identifier
        self._control: socket.socket | None = None
        self._receiver: Receiver | None = None
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((str(self.ends.my_sync), self.settings.sync_port))
        self._listener.listen(4)
        self._listener.settimeout(ACCEPT_POLL)
        self._thread = threading.Thread(target=self._accept_forever, name="listener", daemon=True)
        self._thread.start()
        self.log.log(f"Waiting for the primary on {self.ends.my_sync}:{self.settings.sync_port}.")

    def stop(self) -> None:
        self._stop.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once: a takeover waits on this
        except OSError:
            pass  # never listened, or already shut
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._listener.close()
        with self._data_lock:  # a data handshake under way finishes (or undoes itself) first
            pass
        self._end_session("HA stopped on this appliance")

    def receiver_stats(self) -> dict[str, object]:
        with self._lock:
            return self._receiver.stats().as_dict() if self._receiver is not None else {}

    # -- connections ---------------------------------------------------------
    def _accept_forever(self) -> None:
        while not self._stop.is_set():
            try:
                conn, (addr, _port) = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if addr != str(self.ends.peer_sync):
                self.log.log(f"Refused a replication connection from {addr}: only the peer's sync address "
                             f"{self.ends.peer_sync} may connect.")
                conn.close()
                continue
            threading.Thread(target=self._greet, args=(conn,), name="greet", daemon=True).start()

    def _greet(self, conn: socket.socket) -> None:
        conn.settimeout(HANDSHAKE_TIMEOUT)
        try:
            msg = link.recv(conn)
            if msg["type"] == "hello":
                self._on_hello(conn, msg)
            elif msg["type"] == "data":
                self._on_data(conn, msg)
            else:
                raise PeerError(f"unexpected first message {msg['type']!r}")
        except (PeerError, OSError) as exc:
            self.log.log(f"Replication connection from the primary failed: {exc}")
            conn.close()
        except Exception as exc:  # a malformed handshake must never kill the listener's helper thread
            self.log.log(f"Dropped a malformed replication handshake: {type(exc).__name__}: {exc}")
            conn.close()

    # Sessions. Each time the primary connects it starts a session: a control connection, a
    # data connection with its receiver, and a follower thread reading the control connection.
    # The old session of a secondary that was frozen (or only slow) is still there when the
    # primary, which gave up on it, connects again: its receiver may still apply frames that
    # waited in the socket, and its follower may still hold a sync_done read before the freeze.
    # Either, acting after the new session began, would be applied under that session: an old
    # frame written over the block the new resync just sent (the primary, having cleared the
    # block's bit at the ack, believes this disk holds the newer data), or an old sync_done
    # recording UpToDate while the new sync has just begun. So one session at a time, under
    # _turn: a session ends (its receiver stopped and joined) before the next is agreed, and a
    # follower changes anything only while its control connection is still the current one and
    # this side still follows (stop_following: a takeover or stopHA relies on the state now).
    def _on_hello(self, conn: socket.socket, msg: dict[str, object]) -> None:
        try:
            link.check_hello(msg, my_disk_size=self.disk_size, volume=self.settings.volume)
        except HandshakeRefused as exc:
            self.primary.last_error = str(exc)
            self.log.log(f"Refused the primary: {exc}")
            link.send(conn, {"type": "refuse", "reason": str(exc)})
            conn.close()
            return
        mine = secrets.token_hex(16)
        theirs = str(msg.get("nonce"))
        link.send(conn, {"type": "challenge", "nonce": mine,
                         "proof": link.proof(self.secret, "secondary", theirs, mine)})
        answer = link.recv(conn)
        if answer.get("type") == "refuse":
            self.log.log(f"The primary {self.ends.peer_sync} refused this appliance: {answer.get('reason')}.")
            conn.close()
            return
        if answer.get("type") != "auth" or not link.proof_ok(self.secret, "primary", answer.get("proof"), mine, theirs):
            reason = "it does not know the shared secret (check --secret-file on both appliances)"
            self.log.log(f"Refused a replication connection from {self.ends.peer_sync}: {reason}.")
            link.send(conn, {"type": "refuse", "reason": reason})
            conn.close()
            return
        with self._my_turn():
            if self._stop.is_set():
                raise PeerError("HA is stopping on this appliance")
            agreed, mine = self._plan(conn, msg)
            if agreed is None:
                return
            plan = agreed[0]
            self._end_turn("the primary reconnected")
            token = secrets.token_hex(16)
            with self._lock:
                self._pending = token
                self._pending_sync = agreed
                self._control = conn
            link.send(conn, {"type": "welcome", "session": token, "disk_size": self.disk_size,
                             "disk_state": str(self.meta.disk_state), "state": mine,
                             "plan": {"kind": str(plan.kind), "source": plan.source}})

    def own_changes(self, primary_size: int) -> list[extents.Range]:
        """The blocks this disk changed on its own (its persisted bitmap), for the primary to resend;
        only those within the primary's disk, which may be smaller than ours."""
        try:
            data = extents.bitmap_file(self.home, self.settings.volume).read_bytes()
        except FileNotFoundError:
            return []
        return extents.coarsen(extents.ranges_from_bitmap(data, min(self.disk_size, primary_size)))

    def _plan(self, conn: socket.socket,
              msg: dict[str, object]) -> tuple[tuple[Plan, str] | None, dict[str, object]]:
        """Compare generations with the (authenticated) primary; refuse it on a conflict. The
        agreed plan comes with the sync identifier this disk moves to if it is a sync target."""
        me = Side(gen=self.meta.gen, primary=False, bitmap_trusted=self.meta.bitmap_trusted,
                  discard_my_data=self.discard_my_data)
        # check_hello has validated disk_size (a positive int, at most ours).
        mine = link.state(me, self.own_changes(int(msg["disk_size"])) if self.meta.bitmap_trusted else None)
        try:
            peer, _ = link.parse_state(msg.get("state"), primary=True, disk_size=self.disk_size)
            if not generations.is_uuid(msg.get("sync_uuid")):
                raise HandshakeRefused("The peer's handshake is malformed: no sync identifier.")
        except HandshakeRefused as exc:
            self.primary.last_error = str(exc)
            self.log.log(f"Refused the primary: {exc}")
            link.send(conn, {"type": "refuse", "reason": str(exc)})
            conn.close()
            return None, mine
        plan = generations.compare(me, peer)
        if plan.refused:
            sentence = plan_sentence(plan)
            self.primary.last_error = sentence
            if self.meta.split_brain != sentence:  # one line per conflict, not one per retry
                self.meta.split_brain = sentence
                self.meta.save(self.home, self.settings.volume)
                self.log.log(f"Refused the primary {self.ends.peer_sync}: {sentence}")
            link.send(conn, {"type": "refuse", "reason": sentence, "state": mine})
            conn.close()
            return None, mine
        return (plan, generations.sync_uuid_for(plan, peer.gen, str(msg["sync_uuid"]))), mine

    def _on_data(self, conn: socket.socket, msg: dict[str, object]) -> None:
        # A takeover may stop this side while the old primary's data handshake is under way.
        # Had the handshake gone on, it would mark the disk the new primary serves Inconsistent
        # and install a receiver nobody stops, writing under the new primary's filesystem. So
        # stop() waits for _data_lock, and a handshake that finds itself stopped after its
        # metadata change puts the metadata back (no byte has landed) before it lets go.
        with self._data_lock, self._my_turn():
            with self._lock:
                token = self._pending
                if token is None or not link.proof_ok(self.secret, "data", msg.get("proof"), token) \
                        or msg.get("session") != token:
                    raise PeerError("a data connection presented an unknown or unauthenticated session")
                self._pending = None
                control, agreed = self._control, self._pending_sync
            if self._stop.is_set():
                raise PeerError("HA is stopping on this appliance")
            assert control is not None and agreed is not None
            plan, sync_uuid = agreed
            # Mark the copy incomplete before the first sync byte can land, and move to the sync
            # identifier: if the sync is cut short, the primary's bitmap resumes it.
            before = {"disk_state": self.meta.disk_state, "gen": self.meta.gen, "verify_found": self.meta.verify_found}
            changes: dict[str, object] = {"disk_state": DiskState.INCONSISTENT}
            if plan.kind is not Kind.IN_SYNC:
                changes["gen"] = generations.begin_sync_target(self.meta.gen, sync_uuid)
            if plan.resolves:
                self.log.log(f"Discarding this appliance's changes: {plan_sentence(plan)}")
            self.meta.update(self.home, self.settings.volume, **changes)
            link.tune(conn, user_timeout_ms=int(max(1.0, 2 * self.settings.ping_interval) * 1000))
            link.send(conn, {"type": "ok"})
            conn.settimeout(None)
            with self._lock:
                stopped = self._stop.is_set() or self._control is not control
                if not stopped:
                    self._receiver = Receiver(str(self.settings.disk), self.disk_size, conn.detach())
            if stopped:
                self.meta.update(self.home, self.settings.volume, **before)
                raise PeerError("HA stopped on this appliance while the primary connected")
            self.primary = PrimaryView(connected=True, sync_started=True, since=time.monotonic())
        self.log.log(f"Primary {self.ends.peer_sync} connected; receiving a sync. This disk is Inconsistent "
                     "until it completes.")
        threading.Thread(target=self._follow, args=(control, self.primary), name="follow", daemon=True).start()

    def _follow(self, control: socket.socket, view: PrimaryView) -> None:
        # The primary reports progress every 0.2 s: a longer silence is a dead link,
        # noticed here even when no byte of ours is waiting for an acknowledgement.
        reason = "the primary closed the connection"
        try:
            link.tune(control, user_timeout_ms=int(max(1.0, 2 * self.settings.ping_interval) * 1000))
            control.settimeout(max(2.0, 3 * self.settings.ping_interval))
            while not self._stop.is_set():
                msg = link.recv(control)
                if msg["type"] == "progress":
                    view.sync_percent = float(msg.get("percent", 0.0))
                elif msg["type"] == "sync_done":
                    with self._turn:
                        if not self._current(control):
                            return
                        self._record_sync_done(msg, view)
                    # Saved before said: the primary calls the sync finished only on this word.
                    with self._send_lock:
                        link.send(control, {"type": "synced"})
                elif msg["type"] == "out_of_sync":
                    with self._turn:
                        if not self._current(control):
                            return
                        self._mark_out_of_sync(msg.get("bytes"))
                elif msg["type"] == "promote":
                    reason = "the primary handed over (failOver)"
                    with self._turn:
                        if not self._current(control):
                            return
                        self._end_turn(reason)
                    self.on_promote()
                    return
        except (PeerError, OSError) as exc:  # OSError: the next session closed control before we began
            reason = str(exc)
        self._end_session(reason, only=control)

    def _current(self, control: socket.socket) -> bool:
        """Is control still this side's session, and this side still following? Asked under _turn
        by the session's follower: a message read late, after the primary had reconnected, must not
        act on the next session, nor one read after stop_following on a copy that left the pair."""
        with self._lock:
            return self._control is control and not self._stop.is_set()

    @contextmanager
    def _my_turn(self) -> Iterator[None]:
        """_turn for a handshake, which gives up when the primary does (it waits for each answer as
        long as its socket timeout, then dials again): the session before may take long to end (a
        receiver stuck on a hung disk), and connections must not pile up behind it, nor be
        answered once the primary has left them."""
        if not self._turn.acquire(timeout=max(1.0, self.settings.ping_interval)):
            raise PeerError("the previous session with the primary has not ended yet")
        try:
            yield
        finally:
            self._turn.release()

    @contextmanager
    def turn(self) -> Iterator[None]:
        """_turn, for a group that changes all its sides in one step (SecondaryGroup.leave). It
        waits for whatever holds it: a follower's record, a handshake, or a session ending, which
        with a receiver stuck on a hung disk lasts until the disk answers."""
        with self._turn:
            yield

    def stop_following(self, turn_held: bool = False) -> None:
        """From now on no session starts here and no message of the primary is recorded; stop()
        ends the rest. Under _turn (``turn_held``: the caller has it, see turn): whatever a
        follower recorded is in the metadata when this returns, and nothing more will be."""
        if turn_held:
            self._stop.set()
            return
        with self._turn:
            self._stop.set()

    def _record_sync_done(self, msg: dict[str, object], view: PrimaryView) -> None:
        try:
            gen = Generations.from_json(msg.get("gen"))
        except ValueError as exc:
            raise PeerError(f"the primary's sync_done is malformed: {exc}") from None
        # A copy of the primary's generation now: our own changes are gone.
        extents.bitmap_file(self.home, self.settings.volume).unlink(missing_ok=True)
        try:
            self.meta.update(self.home, self.settings.volume, gen=gen,
                             disk_state=DiskState.UP_TO_DATE, bitmap_trusted=True, split_brain="")
        except OSError as exc:
            raise PeerError(f"cannot record the finished sync: {exc}") from exc
        view.sync_percent = 100.0
        view.synced = True
        self.log.log("Sync from the primary complete: this disk is UpToDate.")

    def _mark_out_of_sync(self, differed: object) -> None:
        """The primary's verify found blocks that differ here (it resends them when its pass ends):
        until its sync_done this copy is partly wrong, so it must never be promoted (decision 42)."""
        if type(differed) is not int or differed <= 0:
            raise PeerError(f"the primary's out_of_sync is malformed: bytes={differed!r}")
        try:
            # A whole copy but for what differs (which --force may serve), unless a sync into it
            # was cut short before: that stays half-copied.
            whole = self.meta.disk_state is DiskState.UP_TO_DATE or self.meta.verify_found
            self.meta.update(self.home, self.settings.volume, disk_state=DiskState.INCONSISTENT, verify_found=whole)
        except OSError as exc:
            raise PeerError(f"cannot record the differences the verify found: {exc}") from exc
        self.log.log(f"The primary's verify found blocks that differ on this disk ({differed} bytes at first): "
                     "this disk is Inconsistent until the primary has resent them.")

    def request_failover(self) -> None:
        """failOver run on the secondary: ask the primary to hand over (it unmounts, then says promote)."""
        with self._lock:
            control = self._control
        if control is None or not self.primary.connected:
            raise Refused("The primary is not connected: a graceful failOver needs it. If it is dead, the "
                          "takeover is automatic.")
        if self.meta.disk_state is not DiskState.UP_TO_DATE:
            raise Refused(f"This disk is {self.meta.disk_state}: it cannot take over until the sync completes.")
        with self._send_lock:
            link.send(control, {"type": "failover_request"})

    def _end_session(self, reason: str, only: socket.socket | None = None) -> None:
        """End the session (only if its control connection is ``only``, when given)."""
        with self._turn:
            if only is None or self._current(only):
                self._end_turn(reason)

    def _end_turn(self, reason: str) -> None:
        """_end_session, under _turn: when this returns the receiver is stopped and applies nothing more."""
        with self._lock:
            receiver, self._receiver = self._receiver, None
            control, self._control = self._control, None
            self._pending = None
        if control is not None:
            control.close()
        if receiver is not None:
            stats = receiver.stats()
            receiver.stop()
            self.primary.connected = False
            self.primary.last_error = stats.last_error or reason
            self.log.log(f"Replication from the primary stopped: {self.primary.last_error}.")
