"""The replication link's two TCP connections and their handshake.

The primary opens two connections to the secondary's sync address, both on
the same port: a *control* connection, which carries the handshake and a few
small JSON messages (sync progress, sync done), and a *data* connection,
which after its own one-message greeting belongs to the C data path (WRITE /
ACK frames, see docs/protocol.md). Keeping them apart means a large burst of
writes never delays a control message, and the C side can own its socket
without sharing a byte stream with Python.

Both ends prove they hold the shared secret (``--secret-file``) before a
byte of data may flow: the primary's hello carries a nonce, the secondary
answers with its own nonce and an HMAC-SHA256 over both, the primary
answers with its HMAC, and only then does the secondary hand out the
session token that the data connection must present (with an HMAC of it).
Proofs are compared in constant time. Without a secret on either side the
same exchange runs with an empty key (no protection, but one code path);
a secret on one side only fails the exchange, as a wrong secret does.

Messages on the control connection, and the greeting on the data connection,
are a 4-byte big-endian length followed by that many bytes of JSON. Python
reads exactly the greeting's bytes, so nothing of the C side's stream is ever
consumed here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import struct
from typing import Any

from mirrord import __version__
from mirrord.errors import HandshakeRefused, PeerError
from mirrord.replication import extents
from mirrord.replication.generations import Generations, Side

#: Bumped whenever the frame layout or the handshake changes incompatibly
#: (3: generation identifiers replace the lineage in hello / welcome;
#: 4: SYNC_ZERO and VERIFY frames; 5: both together; 6: the secondary confirms a finished
#: sync with ``synced``, and the primary waits for it).
PROTOCOL_VERSION = 6
MAX_MESSAGE = 64 * 1024
_LEN = struct.Struct(">I")


def tune(sock: socket.socket, user_timeout_ms: int) -> None:
    """Low latency, big buffers, and a bound on how long unacknowledged data may sit.

    TCP_USER_TIMEOUT makes the kernel abort the connection when data it sent is
    not acknowledged in time, so a dead peer turns into an error on the socket
    instead of writes that wait forever; keepalive does the same for an idle one.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, user_timeout_ms // 1000)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    """One message; a connection that fails under it is a PeerError, as in recv."""
    body = json.dumps(message).encode()
    try:
        sock.sendall(_LEN.pack(len(body)) + body)
    except OSError as exc:
        raise PeerError(f"Control connection failed: {type(exc).__name__}: {exc}.") from exc


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise PeerError("The peer closed the connection.")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> dict[str, Any]:
    """One message; a malformed one is a protocol error, never trusted."""
    try:
        (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
        if length > MAX_MESSAGE:
            raise PeerError(f"The peer sent a {length}-byte control message (limit {MAX_MESSAGE}); dropping it.")
        message = json.loads(_recv_exact(sock, length))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise PeerError(f"Control connection failed: {type(exc).__name__}: {exc}.") from exc
    if not isinstance(message, dict) or "type" not in message:
        raise PeerError("The peer sent a control message without a type; dropping it.")
    return message


def hello(*, node: str, role: str, volume: str, disk_size: int, version: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {"type": "hello", "protocol": PROTOCOL_VERSION, "version": version, "node": node, "role": role,
            "volume": volume, "disk_size": disk_size, "settings": settings}


def release(version: object) -> tuple[int, int] | None:
    """The release series (major, minor) of a mirrord version string; None if it is not one."""
    if not isinstance(version, str):
        return None
    found = re.fullmatch(r"(\d{1,6})\.(\d{1,6})(?:[.+-][0-9A-Za-z.+-]*)?", version)
    return (int(found[1]), int(found[2])) if found else None


def check_version(primary: object, secondary: str) -> None:
    """Appliances of the same release series pair; any other difference is refused, naming both versions.

    Within a series (0.1.0 and 0.1.3) the wire format, the metadata and the
    sync semantics are the same, so a rolling upgrade (failOver, upgrade,
    startHA) keeps the pair mirrored; across series they may not be (IWD:
    "both appliances must have the same firmware level"). See docs/decisions.md.
    """
    mine = release(secondary)
    if mine is None or release(primary) != mine:
        shown = primary if isinstance(primary, str) and primary.isprintable() and len(primary) <= 40 else "unknown"
        raise HandshakeRefused(
            f"mirrord versions differ: the primary runs {shown}, the secondary runs {secondary}; only the same "
            "release (major.minor) pairs. Upgrade both appliances to one release (failOver, upgrade, startHA)."
        )


def check_hello(msg: dict[str, Any], *, my_disk_size: int, volume: str, my_version: str = __version__) -> None:
    """What the secondary checks before it lets a primary write to its disk."""
    if msg.get("type") != "hello":
        raise HandshakeRefused(f"Expected a hello from the peer, got {msg.get('type')!r}.")
    if type(msg.get("protocol")) is not int or msg.get("protocol") != PROTOCOL_VERSION:
        raise HandshakeRefused(
            f"Protocol version mismatch: the peer speaks {msg.get('protocol')}, this appliance speaks "
            f"{PROTOCOL_VERSION}; install the same mirrord version on both appliances."
        )
    check_version(msg.get("version"), my_version)
    if msg.get("volume") != volume:
        raise HandshakeRefused(f"The peer replicates volume {msg.get('volume')!r}, this appliance {volume!r}.")
    size = msg.get("disk_size")
    if type(size) is not int or size <= 0:  # not bool, not float
        raise HandshakeRefused("The peer did not state its disk size.")
    if size > my_disk_size:
        raise HandshakeRefused(
            f"This appliance's disk ({my_disk_size} bytes) is smaller than the primary's ({size} bytes); "
            "the secondary's disk must be at least as large."
        )


def proof(secret: bytes | None, role: str, *parts: str) -> str:
    """HMAC-SHA256 by ``role`` over the nonces (or token) of this exchange."""
    # surrogatepass: a peer's nonce is untrusted text; any string must hash, never raise.
    text = "|".join(("mirrord-link/1", role, *parts)).encode("utf-8", "surrogatepass")
    return hmac.new(secret or b"", text, hashlib.sha256).hexdigest()


def proof_ok(secret: bytes | None, role: str, given: object, *parts: str) -> bool:
    # compare_digest refuses non-ASCII str: such a proof is simply wrong.
    return isinstance(given, str) and given.isascii() and hmac.compare_digest(proof(secret, role, *parts), given)


def state(side: Side, extra_dirty: list[extents.Range] | None = None) -> dict[str, Any]:
    """What each side tells the other about its copy (in hello and in welcome / refuse)."""
    out: dict[str, Any] = {"gen": side.gen.to_json(), "bitmap_trusted": side.bitmap_trusted,
                           "discard_my_data": side.discard_my_data}
    if extra_dirty is not None:
        out["extra_dirty"] = [list(r) for r in extra_dirty]
    return out


def parse_state(value: object, *, primary: bool, disk_size: int) -> tuple[Side, list[extents.Range]]:
    """The peer's state, validated; anything malformed refuses the handshake."""
    try:
        if not isinstance(value, dict):
            raise ValueError("the peer did not describe its copy (generation identifiers missing)")
        gen = Generations.from_json(value.get("gen"))
        trusted, discard = value.get("bitmap_trusted"), value.get("discard_my_data")
        if type(trusted) is not bool or type(discard) is not bool:
            raise ValueError("bitmap_trusted and discard_my_data must be true or false")
        extra = extents.validate(value.get("extra_dirty", []), disk_size)
    except ValueError as exc:
        raise HandshakeRefused(f"The peer's handshake is malformed: {exc}.") from None
    return Side(gen=gen, primary=primary, bitmap_trusted=trusted, discard_my_data=discard), extra
