"""Continuous log shipping to the peer, so the survivor of a failover holds the
dead appliance's ``ha.log`` up to its last moment.

The shipper tails ``ha.log`` (from its size when the shipper starts; every
byte appended afterwards, whole lines at a time) and sends the current
``ha.out`` and ``ha.result`` on every connection and whenever they change. The
receiver keeps them under ``$MIRRORD_HOME/log/peer/``: ``<peer-ip>_ha.log``
(appended), ``<peer-ip>_ha.out`` and ``<peer-ip>_ha.result`` (replaced).

Wire protocol (TCP, network byte order)::

    shipper  -> receiver  HELLO    b"MRLS" | version u8 = 1 | flags u8 (bit 0: auth) | nonce_s 16
    receiver -> shipper   WELCOME  b"MRLS" | version u8 = 1 | flags u8 | nonce_r 16 | proof_r 32
    shipper  -> receiver  PROOF    proof_s 32                       (only with auth)
    receiver -> shipper   READY    b"OK"
    then frames, both ways:
                          FRAME    type u8 | length u32 | data | mac 32 (only with auth)

    proof_r = HMAC-SHA256(secret, b"mirrord-logship/1 receiver" | nonce_s | nonce_r)
    proof_s = HMAC-SHA256(secret, b"mirrord-logship/1 shipper"  | nonce_r | nonce_s)
    key     = HMAC-SHA256(secret, b"mirrord-logship/1 session"  | nonce_s | nonce_r)
    mac     = HMAC-SHA256(key, seq u64 | type | length | data)   seq counts frames per direction from 0

    type  from      data
    L     shipper   stream u64 | offset u64 | bytes   ha.log bytes at that offset of that file
    O     shipper   the whole ha.out
    R     shipper   the whole ha.result
    K     shipper   (empty) keepalive, so a dead connection is noticed
    A     receiver  stream u64 | end u64              ha.log stored up to ``end``

Authentication: with a secret each side proves it knows the secret over a
fresh random nonce of the other side (``compare_digest``), with a different
label per direction so one side's proof cannot be reflected as the other's;
then every frame carries a MAC under a per-connection key, so nothing can be
injected or replayed into the stream. A receiver with a secret refuses a
shipper without one and a shipper with a secret refuses a receiver without
one; no log byte is accepted before both proofs are checked.

Loss and duplication: the shipper resumes after a reconnect from the last
offset the receiver acknowledged; ``stream`` (random, renewed when ha.log is
replaced or truncated) lets the receiver drop bytes it already stored. Only a
receiver restart between storing and acknowledging can duplicate a few lines.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from mirrord import atomicfile
from mirrord.errors import BadInput, HandshakeRefused, MirrordError, PeerError
from mirrord.paths import Home

MAGIC = b"MRLS"
VERSION = 1
FLAG_AUTH = 0x01
NONCE_SIZE = 16
MAC_SIZE = 32
READY = b"OK"
HELLO = struct.Struct("!4sBB16s")
WELCOME = struct.Struct("!4sBB16s32s")
FRAME_HEAD = struct.Struct("!BI")
SEQ = struct.Struct("!Q")
LOG_HEAD = struct.Struct("!QQ")  # stream, offset
LABEL_RECEIVER = b"mirrord-logship/1 receiver"
LABEL_SHIPPER = b"mirrord-logship/1 shipper"
LABEL_SESSION = b"mirrord-logship/1 session"

LOG, OUT, RESULT, KEEPALIVE, ACK = b"L", b"O", b"R", b"K", b"A"
FILES = {OUT: "ha.out", RESULT: "ha.result"}

#: ha.log is shipped in pieces of at most this; ha.out/ha.result are cut to their last this many bytes.
CHUNK = 64 * 1024
MAX_FILE = 1024 * 1024
MAX_FRAME = MAX_FILE + LOG_HEAD.size
DEFAULT_PORT = 7790

CONNECT_TIMEOUT = 3.0
HANDSHAKE_TIMEOUT = 5.0
IO_TIMEOUT = 5.0
KEEPALIVE_EVERY = 5.0
# Four keepalives missed: the shipper is gone (or the path is), drop it.
IDLE_TIMEOUT = 4 * KEEPALIVE_EVERY
POLL = 0.2
BACKOFF_MIN, BACKOFF_MAX = 0.5, 5.0
MAX_CONNECTIONS = 4
REMEMBERED_STREAMS = 8


def peer_file(home: Home, peer_ip: str, name: str) -> Path:
    """Where the receiver keeps the peer's copy of ``name`` (ha.log, ha.out, ha.result)."""
    return home.log_dir / "peer" / f"{peer_ip}_{name}"


def _ip(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError as exc:
        raise BadInput(f"{value!r} is not an IPv4 address.") from exc


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


# -- the channel: the one place socket errors become mirrord errors ---------------


class Channel:
    """Framed, optionally MAC'd, messages over a connected socket."""

    def __init__(self, sock: socket.socket, key: bytes | None) -> None:
        self.sock = sock
        self._key = key
        self._send_seq = 0
        self._recv_seq = 0

    def send_frame(self, ftype: bytes, data: bytes = b"") -> None:
        head = FRAME_HEAD.pack(ftype[0], len(data))
        msg = head + data
        if self._key is not None:
            msg += _mac(self._key, SEQ.pack(self._send_seq), head, data)
        self._send_seq += 1
        send_all(self.sock, msg)

    def recv_frame(self) -> tuple[bytes, bytes]:
        head = recv_exact(self.sock, FRAME_HEAD.size)
        ftype, length = FRAME_HEAD.unpack(head)
        if length > MAX_FRAME:
            raise PeerError(f"frame of {length} bytes is over the {MAX_FRAME} limit")
        data = recv_exact(self.sock, length)
        if self._key is not None:
            mac = recv_exact(self.sock, MAC_SIZE)
            if not hmac.compare_digest(mac, _mac(self._key, SEQ.pack(self._recv_seq), head, data)):
                raise HandshakeRefused("a frame failed its MAC check (tampered, replayed or reordered)")
        self._recv_seq += 1
        return bytes([ftype]), data

    def readable(self) -> bool:
        try:
            return bool(select.select([self.sock], [], [], 0)[0])
        except (OSError, ValueError) as exc:
            raise PeerError(f"connection unusable: {exc}") from exc


def send_all(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:  # includes socket.timeout
        raise PeerError(f"send failed: {exc}") from exc


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            part = sock.recv(n - len(buf))
        except OSError as exc:  # includes socket.timeout: every recv is bounded by the socket's timeout
            raise PeerError(f"receive failed: {exc}") from exc
        if not part:
            raise PeerError("connection closed by the peer")
        buf += part
    return bytes(buf)


# -- handshake ----------------------------------------------------------------------


def client_handshake(sock: socket.socket, secret: bytes | None) -> Channel:
    """The shipper's side; raises HandshakeRefused when the receiver is not to be trusted."""
    nonce_s = os.urandom(NONCE_SIZE) if secret else bytes(NONCE_SIZE)
    send_all(sock, HELLO.pack(MAGIC, VERSION, FLAG_AUTH if secret else 0, nonce_s))
    magic, version, flags, nonce_r, proof_r = WELCOME.unpack(recv_exact(sock, WELCOME.size))
    if magic != MAGIC or version != VERSION:
        raise PeerError(f"not a mirrord log receiver (magic {magic!r}, version {version})")
    if not secret:
        if flags & FLAG_AUTH:
            raise HandshakeRefused("the receiver requires a shared secret and none is configured here")
        if recv_exact(sock, len(READY)) != READY:
            raise PeerError("the receiver did not confirm the connection")
        return Channel(sock, None)
    if not flags & FLAG_AUTH:
        raise HandshakeRefused("the receiver does not authenticate; refusing to ship logs to it")
    if not hmac.compare_digest(proof_r, _mac(secret, LABEL_RECEIVER, nonce_s, nonce_r)):
        raise HandshakeRefused("the receiver does not know the shared secret")
    send_all(sock, _mac(secret, LABEL_SHIPPER, nonce_r, nonce_s))
    if recv_exact(sock, len(READY)) != READY:
        raise HandshakeRefused("the receiver refused our proof")
    return Channel(sock, _mac(secret, LABEL_SESSION, nonce_s, nonce_r))


def server_handshake(sock: socket.socket, secret: bytes | None) -> Channel:
    """The receiver's side; raises HandshakeRefused when the shipper is not to be trusted."""
    magic, version, flags, nonce_s = HELLO.unpack(recv_exact(sock, HELLO.size))
    if magic != MAGIC or version != VERSION:
        raise PeerError(f"not a mirrord log shipper (magic {magic!r}, version {version})")
    if not secret:
        send_all(sock, WELCOME.pack(MAGIC, VERSION, 0, bytes(NONCE_SIZE), bytes(MAC_SIZE)) + READY)
        return Channel(sock, None)
    if not flags & FLAG_AUTH:
        raise HandshakeRefused("the shipper does not authenticate while a secret is configured")
    nonce_r = os.urandom(NONCE_SIZE)
    send_all(sock, WELCOME.pack(MAGIC, VERSION, FLAG_AUTH, nonce_r, _mac(secret, LABEL_RECEIVER, nonce_s, nonce_r)))
    try:
        proof_s = recv_exact(sock, MAC_SIZE)
    except PeerError as exc:
        # A shipper with another secret hangs up right after checking our proof.
        raise HandshakeRefused(f"the shipper sent no proof ({exc})") from exc
    if not hmac.compare_digest(proof_s, _mac(secret, LABEL_SHIPPER, nonce_r, nonce_s)):
        raise HandshakeRefused("the shipper does not know the shared secret")
    send_all(sock, READY)
    return Channel(sock, _mac(secret, LABEL_SESSION, nonce_s, nonce_r))


# -- the shipper --------------------------------------------------------------------


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _new_stream() -> int:
    return int.from_bytes(os.urandom(8), "big")


@dataclass
class ShipperCounters:
    connections: int = 0
    failures: int = 0
    auth_failures: int = 0
    log_bytes_sent: int = 0
    log_bytes_acked: int = 0


class LogShipper:
    """Ships this appliance's logs to the peer's LogReceiver at ``peer`` = (ip, port)."""

    def __init__(self, home: Home, peer: tuple[str, int], my_ip: str, secret: bytes | None,
                 *, poll: float = POLL, start_at: int | None = None) -> None:
        self.home = home
        self.peer = (_ip(peer[0]), int(peer[1]))
        self.my_ip = _ip(my_ip)
        self._secret = secret or None
        self._poll = poll
        self.counters = ShipperCounters()
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # "From where it is" (or from ``start_at``, e.g. the line of the command
        # that started this HA session): older history is not shipped again.
        self._stream = _new_stream()
        sig = _signature(self._log)
        self._ino = sig[0] if sig else None
        end = sig[1] if sig else 0
        self._offset = self._acked = end if start_at is None else max(0, min(start_at, end))

    @property
    def _log(self) -> Path:
        return self.home.log_dir / "ha.log"

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="logship", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stop.is_set():
            try:
                channel = self._connect()
            except HandshakeRefused as exc:
                self.counters.auth_failures += 1
                self.last_error = f"log receiver refused: {exc}"
            except PeerError as exc:
                self.counters.failures += 1
                self.last_error = f"log receiver unreachable: {exc}"
            else:
                self.counters.connections += 1
                backoff = BACKOFF_MIN
                try:
                    self._session(channel)
                except PeerError as exc:
                    self.counters.failures += 1
                    self.last_error = f"log shipping interrupted: {exc}"
                finally:
                    channel.sock.close()
                    self._offset = self._acked  # resend whatever was not acknowledged
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _connect(self) -> Channel:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # From our own address on that network: the receiver accepts only the peer's.
            sock.bind((self.my_ip, 0))
            sock.connect(self.peer)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            channel = client_handshake(sock, self._secret)
            sock.settimeout(IO_TIMEOUT)
            return channel
        except OSError as exc:
            sock.close()
            raise PeerError(f"{self.peer[0]}:{self.peer[1]}: {exc}") from exc
        except BaseException:
            sock.close()
            raise

    def _session(self, channel: Channel) -> None:
        sent: dict[bytes, tuple[int, int, int] | None] = {OUT: None, RESULT: None}
        last_send = time.monotonic()
        while not self._stop.is_set():
            progressed = False
            piece = self._next_log_piece()
            if piece is not None:
                start, data = piece
                channel.send_frame(LOG, LOG_HEAD.pack(self._stream, start) + data)
                self._offset = start + len(data)
                self.counters.log_bytes_sent += len(data)
                progressed = True
            for ftype, name in FILES.items():
                path = self.home.log_dir / name
                sig = _signature(path)
                if sig is not None and sig != sent[ftype]:
                    channel.send_frame(ftype, self._read_tail(path))
                    sent[ftype] = sig
                    progressed = True
            while channel.readable():
                self._on_receiver_frame(*channel.recv_frame())
            now = time.monotonic()
            if progressed:
                last_send = now
                continue  # more may be waiting: no pause while catching up
            if now - last_send >= KEEPALIVE_EVERY:
                channel.send_frame(KEEPALIVE)
                last_send = now
            self._stop.wait(self._poll)

    def _on_receiver_frame(self, ftype: bytes, data: bytes) -> None:
        if ftype != ACK or len(data) != LOG_HEAD.size:
            raise PeerError(f"unexpected frame {ftype!r} from the log receiver")
        stream, end = LOG_HEAD.unpack(data)
        if stream == self._stream and end > self._acked:
            self.counters.log_bytes_acked += end - self._acked
            self._acked = end

    def _next_log_piece(self) -> tuple[int, bytes] | None:
        """The next whole lines of ha.log after the current offset, or None."""
        try:
            with open(self._log, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self._ino or st.st_size < self._offset:
                    # Replaced or truncated: a new file, shipped from its start.
                    self._ino, self._stream = st.st_ino, _new_stream()
                    self._offset = self._acked = 0
                if st.st_size <= self._offset:
                    return None
                f.seek(self._offset)
                data = f.read(CHUNK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PeerError(f"cannot read {self._log}: {exc}") from exc
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            # Half a line: wait for its end, unless the "line" fills a whole chunk.
            return (self._offset, data) if len(data) == CHUNK else None
        return self._offset, data[:cut]

    @staticmethod
    def _read_tail(path: Path) -> bytes:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - MAX_FILE))
                return f.read(MAX_FILE)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise PeerError(f"cannot read {path}: {exc}") from exc

    def __enter__(self) -> "LogShipper":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the receiver -------------------------------------------------------------------


@dataclass
class ReceiverCounters:
    accepted: int = 0
    refused: int = 0
    auth_failures: int = 0
    protocol_errors: int = 0
    log_bytes: int = 0


@dataclass
class _StreamEnds:
    """How far each recent ha.log stream is stored, to drop bytes sent twice."""

    ends: OrderedDict[int, int] = field(default_factory=OrderedDict)

    def fresh_part(self, stream: int, start: int, data: bytes) -> bytes:
        end = self.ends.get(stream)
        if end is not None and start < end:
            data = data[end - start:]
            start = end
        self.ends[stream] = max(start + len(data), end or 0)
        self.ends.move_to_end(stream)
        while len(self.ends) > REMEMBERED_STREAMS:
            self.ends.popitem(last=False)
        return data


class LogReceiver:
    """Accepts the peer's logs on ``bind`` = (ip, port); port 0 picks a free one (see ``.port``)."""

    def __init__(self, home: Home, bind: tuple[str, int], peer_ip: str, secret: bytes | None) -> None:
        self.home = home
        self.bind = (_ip(bind[0]), int(bind[1]))
        self.peer_ip = _ip(peer_ip)
        self._secret = secret or None
        self.counters = ReceiverCounters()
        self.last_error = ""
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one writer at a time, whichever connection it came on
        self._active: set[socket.socket] = set()
        self._streams = _StreamEnds()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1] if self._listener else self.bind[1]

    def start(self) -> None:
        if self._listener is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self.bind)
            sock.listen(MAX_CONNECTIONS)
        except OSError as exc:
            sock.close()
            raise MirrordError(f"Cannot receive peer logs on {self.bind[0]}:{self.bind[1]}: "
                               f"{exc.strerror or exc}.") from exc
        self._listener = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="logreceive", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        with self._lock:
            for conn in list(self._active):
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # wakes its handler's recv at once
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stop.is_set():
            try:
                if not select.select([listener], [], [], POLL)[0]:
                    continue
                conn, (source, _port) = listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(POLL)  # e.g. EMFILE: do not spin
                continue
            with self._lock:
                busy = len(self._active) >= MAX_CONNECTIONS
                allowed = source == self.peer_ip and not busy
                if allowed:
                    self._active.add(conn)
            if not allowed:
                self.counters.refused += 1
                self.last_error = f"refused a connection from {source}" + (" (too many)" if busy else "")
                conn.close()
                continue
            self.counters.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), name="logreceive-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            try:
                channel = server_handshake(conn, self._secret)
            except HandshakeRefused as exc:
                self.counters.auth_failures += 1
                self.last_error = f"log shipper refused: {exc}"
                return
            conn.settimeout(IDLE_TIMEOUT)
            while not self._stop.is_set():
                self._store(channel, *channel.recv_frame())
        except HandshakeRefused as exc:  # a frame with a bad MAC
            self.counters.auth_failures += 1
            self.last_error = str(exc)
        except PeerError as exc:
            if "closed by the peer" not in str(exc) and not self._stop.is_set():
                self.counters.protocol_errors += 1
                self.last_error = str(exc)
        except OSError as exc:
            self.counters.protocol_errors += 1
            self.last_error = f"cannot store the peer's logs: {exc}"
        finally:
            with self._lock:
                self._active.discard(conn)
            conn.close()

    def _store(self, channel: Channel, ftype: bytes, data: bytes) -> None:
        if ftype == KEEPALIVE:
            return
        if ftype in FILES:
            with self._lock:
                self._peer_dir().mkdir(parents=True, exist_ok=True)
                atomicfile.write_bytes(peer_file(self.home, self.peer_ip, FILES[ftype]), data)
            return
        if ftype != LOG or len(data) < LOG_HEAD.size:
            raise PeerError(f"unexpected frame {ftype!r} from the log shipper")
        stream, start = LOG_HEAD.unpack_from(data)
        with self._lock:
            fresh = self._streams.fresh_part(stream, start, data[LOG_HEAD.size:])
            if fresh:
                self.append_log(fresh)
            end = self._streams.ends[stream]
        channel.send_frame(ACK, LOG_HEAD.pack(stream, end))

    def append_log(self, data: bytes) -> None:
        """Append to the peer's ha.log copy (O_APPEND: whole writes land whole)."""
        self._peer_dir().mkdir(parents=True, exist_ok=True)
        fd = os.open(peer_file(self.home, self.peer_ip, "ha.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self.counters.log_bytes += len(data)

    def _peer_dir(self) -> Path:
        return self.home.log_dir / "peer"

    def __enter__(self) -> "LogReceiver":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
