"""Heartbeats between the two appliances on two networks (keepalived-like, unicast UDP).

Each appliance sends a small datagram to its peer every ``interval`` seconds on
each network (the sync link and the public network), from one UDP socket bound
to its own address on that network, and listens on the same socket. The
supervisor asks ``silent_for(network)``: the secondary takes over only when the
primary has been silent on *both* networks for ``pingInterval``.

Datagram layout (network byte order)::

    offset  size  field
    0       4     magic           b"MRHB"
    4       1     version         1
    5       1     flags           bit 0: an HMAC trailer follows the payload
    6       1     name length L   length of the network name, 1..32
    7       1     reserved        0
    8       8     boot id         random per sender start (u64)
    16      8     seq             1, 2, 3 ... per (boot id, network) (u64)
    24      4     payload length N
    28      L     network name    ASCII, e.g. b"sync"; must be the network it arrives on
    28+L    N     payload         UTF-8 JSON object: the sender's describe()
    28+L+N  32    mac             HMAC-SHA256(secret, every byte before it); only with flag bit 0

A datagram is accepted only when all of these hold, otherwise it is counted
in ``rejected`` and changes nothing:

* it comes from the peer address configured for the network it arrived on;
* magic, version and lengths are right, and the payload is a JSON object;
* its network name is the network it arrived on (a datagram captured on one
  network cannot stand in for a heartbeat on the other);
* with a ``secret``: it carries a MAC and the MAC matches (``compare_digest``);
* its seq is greater than every seq already accepted for its boot id. The
  receiver remembers the last few boot ids, so replaying a datagram from the
  peer's previous run is refused too. A replay of a run the receiver never saw
  (it started later) cannot be told from a restarted peer; the MAC still makes
  sure such a datagram was once sent by the peer, and the sequence stops it
  from being replayed more than once per boot id.

A receiver without a secret accepts datagrams that carry a MAC (it cannot
check them); a receiver with a secret refuses datagrams without one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import os
import select
import socket
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mirrord.errors import BadInput, MirrordError, PeerError

MAGIC = b"MRHB"
VERSION = 1
FLAG_MAC = 0x01
DEFAULT_PORT = 7789
HEADER = struct.Struct("!4sBBBxQQI")
MAC_SIZE = hashlib.sha256().digest_size
MAX_NAME = 32
# Well under a single Ethernet frame after IP/UDP headers, so a heartbeat is
# never fragmented (a lost fragment would lose the whole heartbeat).
MAX_DATAGRAM = 1400
#: Boot ids remembered per network to refuse replays of the peer's earlier runs.
REMEMBERED_BOOTS = 16
# How long the receiver blocks in select(); bounds how late stop() is noticed.
RECEIVE_POLL = 0.2
# IP_FREEBIND (Linux): bind even while the address is not (yet) configured, so
# a missing address shows up as silence on that network, not a dead daemon.
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)

Address = ipaddress.IPv4Address


class DatagramRejected(PeerError):
    """A heartbeat datagram that must not be believed; the message says why."""


@dataclass(frozen=True)
class Datagram:
    network: str
    boot_id: int
    seq: int
    payload: dict[str, Any]
    authenticated: bool


def encode_datagram(network: str, boot_id: int, seq: int, payload: Mapping[str, Any],
                    secret: bytes | None) -> bytes:
    name = network.encode("ascii")
    if not 1 <= len(name) <= MAX_NAME:
        raise BadInput(f"Network name {network!r} must be 1 to {MAX_NAME} ASCII characters.")
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    flags = FLAG_MAC if secret else 0
    data = HEADER.pack(MAGIC, VERSION, flags, len(name), boot_id, seq, len(body)) + name + body
    if secret:
        data += hmac.new(secret, data, hashlib.sha256).digest()
    if len(data) > MAX_DATAGRAM:
        raise BadInput(f"Heartbeat payload is too large ({len(data)} bytes, at most {MAX_DATAGRAM}).")
    return data


def decode_datagram(data: bytes, secret: bytes | None) -> Datagram:
    """Parse and authenticate one datagram; raises DatagramRejected saying why."""
    if len(data) < HEADER.size:
        raise DatagramRejected(f"truncated datagram ({len(data)} bytes)")
    magic, version, flags, name_len, boot_id, seq, body_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DatagramRejected("bad magic")
    if version != VERSION:
        raise DatagramRejected(f"unsupported version {version}")
    if not 1 <= name_len <= MAX_NAME:
        raise DatagramRejected(f"bad network name length {name_len}")
    has_mac = bool(flags & FLAG_MAC)
    signed_len = HEADER.size + name_len + body_len
    expected = signed_len + (MAC_SIZE if has_mac else 0)
    if len(data) != expected:
        raise DatagramRejected(f"length {len(data)} does not match its header ({expected})")
    if secret:
        if not has_mac:
            raise DatagramRejected("unauthenticated datagram while a secret is configured")
        mac = hmac.new(secret, data[:signed_len], hashlib.sha256).digest()
        if not hmac.compare_digest(mac, data[signed_len:]):
            raise DatagramRejected("wrong MAC (forged, corrupted, or a different secret)")
    # Only parsed after the MAC check: nothing unauthenticated reaches json.
    try:
        network = data[HEADER.size:HEADER.size + name_len].decode("ascii")
        payload = json.loads(data[HEADER.size + name_len:signed_len])
    except (UnicodeDecodeError, ValueError) as exc:
        raise DatagramRejected(f"undecodable name or payload: {exc}") from exc
    if not isinstance(payload, dict):
        raise DatagramRejected("payload is not a JSON object")
    if seq < 1:
        raise DatagramRejected("sequence number 0")
    return Datagram(network, boot_id, seq, payload, authenticated=bool(secret))


class ReplayGuard:
    """Accepts a (boot id, seq) only if seq is above every seq seen for that boot id."""

    def __init__(self, remembered: int = REMEMBERED_BOOTS) -> None:
        self._last: OrderedDict[int, int] = OrderedDict()
        self._remembered = remembered

    def accept(self, boot_id: int, seq: int) -> bool:
        last = self._last.get(boot_id)
        if last is not None and seq <= last:
            return False
        self._last[boot_id] = seq
        self._last.move_to_end(boot_id)
        while len(self._last) > self._remembered:
            self._last.popitem(last=False)
        return True


def _ip(value: Address | str) -> Address:
    try:
        return ipaddress.IPv4Address(str(value))
    except ValueError as exc:
        raise BadInput(f"{value!r} is not an IPv4 address.") from exc


@dataclass
class _Link:
    """What is known about one network."""

    my_ip: Address
    peer_ip: Address
    sock: socket.socket | None = None
    seq: int = 0
    last_heard: float | None = None
    peer_state: dict[str, Any] | None = None
    last_reject: str = ""
    sent: int = 0
    send_errors: int = 0
    received: int = 0
    rejected: int = 0

    def __post_init__(self) -> None:
        self.guard = ReplayGuard()


class Heartbeat:
    """Sends and checks heartbeats on every configured network.

    ``networks`` maps a network name to (my address, the peer's address) on it.
    ``describe`` is called once per send and its dict travels as the payload;
    ``clock`` only measures silence (a fake one makes timeout tests instant).
    """

    def __init__(self, networks: Mapping[str, tuple[Address | str, Address | str]],
                 port: int = DEFAULT_PORT, *, interval: float, secret: bytes | None,
                 describe: Callable[[], dict[str, Any]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not networks:
            raise BadInput("Heartbeat needs at least one network.")
        if not 0 < port < 65536:
            raise BadInput(f"Heartbeat port {port} is out of range.")
        for name in networks:
            if not 1 <= len(name.encode()) <= MAX_NAME or not name.isascii():
                raise BadInput(f"Network name {name!r} must be 1 to {MAX_NAME} ASCII characters.")
        self._links = {name: _Link(_ip(mine), _ip(peer)) for name, (mine, peer) in networks.items()}
        self.port = port
        self._interval = self._check_interval(interval)
        self._secret = secret or None
        self._describe = describe
        self._clock = clock
        # The high bit is left clear so the id reads the same as a signed i64 in other tools.
        self.boot_id = int.from_bytes(os.urandom(8), "big") >> 1
        self.describe_errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- configuration ----------------------------------------------------

    @staticmethod
    def _check_interval(interval: float) -> float:
        if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval > 0):
            raise BadInput(f"Heartbeat interval must be a positive number of seconds, not {interval!r}.")
        return float(interval)

    @property
    def interval(self) -> float:
        return self._interval

    def set_interval(self, interval: float) -> None:
        """Change the send interval; the sender picks it up at once."""
        self._interval = self._check_interval(interval)
        self._wake.set()

    @property
    def networks(self) -> list[str]:
        return list(self._links)

    # -- what the supervisor reads -----------------------------------------

    def silent_for(self, network: str) -> float:
        """Seconds since the last accepted heartbeat from the peer on ``network``; inf if never."""
        link = self._link(network)
        with self._lock:
            last = link.last_heard
        return math.inf if last is None else max(0.0, self._clock() - last)

    def peer_state(self, network: str) -> dict[str, Any] | None:
        """The last ``describe()`` payload the peer sent on ``network``, or None."""
        link = self._link(network)
        with self._lock:
            return None if link.peer_state is None else dict(link.peer_state)

    @property
    def counters(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {name: {"sent": l.sent, "send_errors": l.send_errors,
                           "received": l.received, "rejected": l.rejected}
                    for name, l in self._links.items()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """JSON-ready view per network for status output (``silent_for`` None = never heard)."""
        out: dict[str, dict[str, Any]] = {}
        counters = self.counters
        for name, link in self._links.items():
            silent = self.silent_for(name)
            with self._lock:
                last_reject = link.last_reject
            out[name] = {"silent_for": None if math.isinf(silent) else round(silent, 3),
                         "peer": str(link.peer_ip), "last_reject": last_reject, **counters[name]}
        return out

    def _link(self, network: str) -> _Link:
        try:
            return self._links[network]
        except KeyError:
            raise BadInput(f"Unknown heartbeat network {network!r}; known: {', '.join(self._links)}.") from None

    # -- receiving ----------------------------------------------------------

    def handle_datagram(self, network: str, data: bytes, source_ip: str) -> bool:
        """Check one datagram that arrived on ``network``; True when it was accepted.

        The receiver thread calls this; tests call it directly with a fake clock.
        """
        link = self._link(network)
        try:
            if _ip(source_ip) != link.peer_ip:
                raise DatagramRejected(f"from {source_ip}, not the peer {link.peer_ip}")
            dgram = decode_datagram(data, self._secret)
            if dgram.network != network:
                raise DatagramRejected(f"names network {dgram.network!r} but arrived on {network!r}")
        except (DatagramRejected, BadInput) as exc:
            with self._lock:
                link.rejected += 1
                link.last_reject = str(exc)
            return False
        with self._lock:
            if not link.guard.accept(dgram.boot_id, dgram.seq):
                link.rejected += 1
                link.last_reject = f"replayed or reordered seq {dgram.seq} of boot {dgram.boot_id:x}"
                return False
            link.received += 1
            link.last_heard = self._clock()
            link.peer_state = dgram.payload
        return True

    def _receive_loop(self) -> None:
        by_fd = {link.sock.fileno(): (name, link.sock) for name, link in self._links.items() if link.sock}
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select(list(by_fd), [], [], RECEIVE_POLL)
            except (OSError, ValueError):
                return  # sockets closed by stop()
            for fd in ready:
                name, sock = by_fd[fd]
                try:
                    data, (source, _port) = sock.recvfrom(MAX_DATAGRAM + 1)
                except BlockingIOError:
                    continue
                except OSError:
                    # ICMP errors (port unreachable after our own send) surface
                    # here on Linux; they say nothing about the peer's heartbeats.
                    continue
                self.handle_datagram(name, data, source)

    # -- sending ------------------------------------------------------------

    def _payload(self) -> dict[str, Any]:
        try:
            return dict(self._describe())
        except Exception as exc:  # noqa: BLE001 - a failing describe must not stop heartbeats
            self.describe_errors += 1
            # Still a heartbeat: the process is alive even if its status is not.
            return {"error": f"describe failed: {type(exc).__name__}"}

    def send_once(self) -> None:
        """One datagram to the peer on every network; failures are counted, never raised."""
        payload = self._payload()
        for name, link in self._links.items():
            if link.sock is None:
                continue
            with self._lock:
                link.seq += 1
                seq = link.seq
            try:
                data = encode_datagram(name, self.boot_id, seq, payload, self._secret)
            except BadInput:
                data = encode_datagram(name, self.boot_id, seq, {"error": "describe payload too large"},
                                       self._secret)
            try:
                link.sock.sendto(data, (str(link.peer_ip), self.port))
            except OSError:
                # ENETUNREACH / ENETDOWN / EPERM while a link is cut: the
                # silence this causes at the peer is exactly the signal wanted.
                with self._lock:
                    link.send_errors += 1
            else:
                with self._lock:
                    link.sent += 1

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.send_once()
            # Woken early by set_interval() or stop(); the wait is always bounded.
            while not self._stop.is_set():
                remaining = self._interval - (time.monotonic() - started)
                if remaining <= 0:
                    break
                if self._wake.wait(remaining):
                    self._wake.clear()

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        try:
            for name, link in self._links.items():
                link.sock = self._bind(name, link)
        except MirrordError:
            self._close_sockets()
            raise
        self._threads = [threading.Thread(target=self._send_loop, name="heartbeat-send", daemon=True),
                         threading.Thread(target=self._receive_loop, name="heartbeat-recv", daemon=True)]
        for t in self._threads:
            t.start()

    def _bind(self, name: str, link: _Link) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
            sock.setblocking(False)
            sock.bind((str(link.my_ip), self.port))
        except OSError as exc:
            sock.close()
            raise MirrordError(f"Cannot listen for heartbeats on the {name} network at "
                               f"{link.my_ip}:{self.port}: {exc.strerror or exc}. Is another "
                               f"mirrord running, or the port in use?") from exc
        return sock

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        self._close_sockets()

    def _close_sockets(self) -> None:
        for link in self._links.values():
            if link.sock is not None:
                link.sock.close()
                link.sock = None

    def __enter__(self) -> "Heartbeat":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
