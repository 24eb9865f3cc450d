"""Fuzzing the replication handshake (mirrord.replication.link).

Everything here is what a peer (or anyone reaching the sync port) controls:
the bytes of a control message, the JSON object inside it, the proofs and
nonces it carries. Only PeerError and HandshakeRefused may come out of
link.recv / check_hello, and proof / proof_ok never raise. The regression
tests at the end are the bugs these fuzzers found (all fixed).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mirrord import __version__
from mirrord.errors import HandshakeRefused, PeerError
from mirrord.replication import link

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NET = settings(max_examples=250, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

LEN = struct.Struct(">I")
VOLUME = "r0"
MY_SIZE = 64 << 20

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20,
)


def _nested_arrays(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _framed(body: bytes) -> bytes:
    return LEN.pack(len(body)) + body


# What a peer may put on the control connection: noise; a length prefix and
# a body that is noise, any JSON value, or a JSON object with a "type"; a
# lying length; deeply nested JSON (still under MAX_MESSAGE).
wire = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=256).map(_framed),
    json_values.map(lambda v: _framed(json.dumps(v).encode())),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4)
      .flatmap(lambda d: st.sampled_from(["hello", "data", 7, None]).map(lambda t: {**d, "type": t}))
      .map(lambda v: _framed(json.dumps(v).encode())),
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=64)).map(lambda t: LEN.pack(t[0]) + t[1]),
    st.integers(link.MAX_MESSAGE - 2, link.MAX_MESSAGE + 2).map(lambda k: _framed(b" " * k)),
    st.integers(1, 400).map(lambda d: _framed(_nested_arrays(d))),
)


def _feed(data: bytes) -> Any:
    """link.recv on one end of a socketpair after `data` and EOF on the other."""
    a, b = socket.socketpair()
    try:
        b.settimeout(5)

        def send() -> None:
            try:
                a.sendall(data)
                a.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the reader gave up early (e.g. an oversize length)

        t = threading.Thread(target=send, daemon=True)
        t.start()
        try:
            return link.recv(b)
        finally:
            b.close()
            t.join(timeout=5)
            assert not t.is_alive()
    finally:
        a.close()
        b.close()


def _recv_outcome(data: bytes) -> Any:
    try:
        msg = _feed(data)
    except PeerError:
        return None
    assert isinstance(msg, dict) and "type" in msg, msg
    return msg


@NET
@given(data=wire)
@example(data=b"")
@example(data=LEN.pack(0))
@example(data=_framed(b"[]"))
@example(data=_framed(b'{"type": "hello"}'))
@example(data=_framed(b"\xff\xfe"))
@example(data=LEN.pack(link.MAX_MESSAGE + 1))
def test_recv_returns_a_typed_dict_or_raises_peer_error(data: bytes) -> None:
    # Nesting deep enough for RecursionError is a known bug, pinned below;
    # the strategy above stays shallower than the interpreter's limit.
    msg = _recv_outcome(data)
    if msg is not None:
        # Only a whole, well-framed JSON object with a "type" is returned.
        (length,) = LEN.unpack(data[:4])
        assert repr(msg) == repr(json.loads(data[4:4 + length]))  # repr: NaN != NaN


def _well_formed(msg: dict[str, Any]) -> bool:
    size = msg.get("disk_size")
    return (msg.get("type") == "hello" and type(msg.get("protocol")) is int
            and msg.get("protocol") == link.PROTOCOL_VERSION
            and msg.get("volume") == VOLUME and type(size) is int and 0 < size <= MY_SIZE
            and link.release(msg.get("version")) == link.release(__version__))


# Hellos that are right, nearly right, or not at all: a correct hello in
# which each field is independently kept (5 times in 8), dropped, or replaced.
_ODD = {
    "type": st.one_of(st.sampled_from(["HELLO", "data", ""]), json_values),
    "protocol": st.one_of(st.sampled_from([1, 3, "2", 2.5, 2.0, True, None]), json_values),
    "volume": st.one_of(st.sampled_from(["r1", "", "R0", None, ["r0"]]), json_values),
    "version": st.one_of(st.sampled_from(["0.2.0", "1.1.0", "0.1", "0.1.9", "0.1.0+local", "v0.1.0", "", None]),
                         json_values),
    "disk_size": st.one_of(st.booleans(), st.integers(-2, MY_SIZE + 2),
                           st.sampled_from([0, 1, MY_SIZE, MY_SIZE + 1, 2**64, 1.0, "1"]), json_values),
}


@st.composite
def hello_like(draw: st.DrawFn) -> dict[str, Any]:
    msg: dict[str, Any] = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))
    msg.update(link.hello(node="b", role="primary", volume=VOLUME, disk_size=draw(st.integers(1, MY_SIZE)),
                          version=__version__, settings=draw(json_values)))
    for key, odd in _ODD.items():
        choice = draw(st.integers(0, 7))
        if choice == 0:
            del msg[key]
        elif choice <= 2:
            msg[key] = draw(odd)
    return msg


@FUZZ
@given(msg=st.one_of(hello_like(), st.dictionaries(st.text(max_size=10), json_values, max_size=6)))
@example(msg=link.hello(node="a", role="primary", volume=VOLUME, disk_size=MY_SIZE, version="x", settings={}))
@example(msg=link.hello(node="a", role="primary", volume=VOLUME, disk_size=MY_SIZE, version=__version__, settings={}))
@example(msg={"type": "hello", "protocol": link.PROTOCOL_VERSION, "volume": VOLUME, "disk_size": MY_SIZE + 1})
def test_check_hello_accepts_only_well_formed_hellos(msg: dict[str, Any]) -> None:
    try:
        result = link.check_hello(msg, my_disk_size=MY_SIZE, volume=VOLUME)
    except HandshakeRefused:
        assert not _well_formed(msg)
        return
    assert result is None
    assert _well_formed(msg), msg


given_values = st.one_of(st.none(), st.integers(), st.binary(max_size=70), st.text(max_size=70),
                         st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), json_values)


@FUZZ
@given(secret=st.one_of(st.none(), st.binary(max_size=40)), role=st.sampled_from(["primary", "secondary", "data"]),
       given_=given_values, parts=st.lists(st.text(alphabet="0123456789abcdef", max_size=32), max_size=3))
def test_proof_ok_never_raises(secret: bytes | None, role: str, given_: object, parts: list[str]) -> None:
    ok = link.proof_ok(secret, role, given_, *parts)
    assert ok is (given_ == link.proof(secret, role, *parts))


@FUZZ
@given(secret=st.one_of(st.none(), st.binary(max_size=40)), parts=st.lists(st.text(max_size=32), max_size=3))
def test_the_right_proof_is_accepted_and_every_other_refused(secret: bytes | None, parts: list[str]) -> None:
    good = link.proof(secret, "primary", *parts)
    assert link.proof_ok(secret, "primary", good, *parts)
    assert not link.proof_ok(secret, "secondary", good, *parts)
    # (Not None vs b"\0": HMAC pads keys with NULs, so those are the same key.)
    assert not link.proof_ok((secret or b"") + b"x", "primary", good, *parts)
    assert not link.proof_ok(secret, "primary", good.encode(), *parts)
    assert not link.proof_ok(secret, "primary", good[:-1], *parts)


# --------------------------------------------------------------------------
# Bugs these fuzzers found, kept as regression tests.

def test_bug_recv_deeply_nested_json_is_a_peer_error() -> None:
    with pytest.raises(PeerError):
        _feed(_framed(_nested_arrays(30000)))


def test_bug_check_hello_refuses_a_boolean_disk_size() -> None:
    with pytest.raises(HandshakeRefused):
        link.check_hello({"type": "hello", "protocol": link.PROTOCOL_VERSION, "volume": VOLUME, "disk_size": True},
                         my_disk_size=MY_SIZE, volume=VOLUME)


def test_bug_proof_ok_with_a_non_ascii_proof_is_false() -> None:
    assert link.proof_ok(None, "primary", "\xe9", "nonce-a", "nonce-b") is False


def test_bug_proof_over_a_peer_nonce_with_a_lone_surrogate() -> None:
    theirs = str(json.loads('"\\ud800"'))  # what _on_hello does with msg.get("nonce")
    link.proof(None, "secondary", theirs, "mine")
    assert not link.proof_ok(None, "primary", "00", "mine", theirs)
