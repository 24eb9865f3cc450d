"""Heartbeat datagrams, their checks, and a real exchange over loopback addresses."""

from __future__ import annotations

import hashlib
import hmac
import math
import socket
import struct
import time
from typing import Any

import pytest

from mirrord.errors import BadInput, MirrordError
from mirrord.net.heartbeat import DatagramRejected, Heartbeat, ReplayGuard, decode_datagram, encode_datagram

SECRET = b"s3cret-for-tests"
PAYLOAD = {"mode": "primary", "node": "a1", "generation": 7}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: FakeClock | None = None, secret: bytes | None = SECRET) -> Heartbeat:
    return Heartbeat({"sync": ("198.19.0.2", "198.19.0.1"), "public": ("198.18.0.12", "198.18.0.11")},
                     interval=1.0, secret=secret, describe=lambda: {"mode": "secondary"},
                     clock=clock or FakeClock())


# -- encode / decode --------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, SECRET])
def test_round_trip(secret: bytes | None) -> None:
    data = encode_datagram("sync", 0xABCDEF, 42, PAYLOAD, secret)
    d = decode_datagram(data, secret)
    assert (d.network, d.boot_id, d.seq, d.payload) == ("sync", 0xABCDEF, 42, PAYLOAD)
    assert d.authenticated is bool(secret)


def test_layout_is_as_documented() -> None:
    data = encode_datagram("sync", 5, 9, {"a": 1}, SECRET)
    magic, version, flags, name_len, boot, seq, body_len = struct.unpack_from("!4sBBBxQQI", data)
    assert (magic, version, flags, name_len, boot, seq) == (b"MRHB", 1, 1, 4, 5, 9)
    assert data[28:32] == b"sync"
    assert data[32:32 + body_len] == b'{"a":1}'
    assert data[-32:] == hmac.new(SECRET, data[:-32], hashlib.sha256).digest()


def test_without_secret_no_mac() -> None:
    data = encode_datagram("sync", 1, 1, {}, None)
    assert data[5] == 0 and len(data) == 28 + 4 + 2


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: b"XXXX" + d[4:], "bad magic"),
    (lambda d: d[:4] + b"\x02" + d[5:], "unsupported version"),
    (lambda d: d[:10], "truncated"),
    (lambda d: d[:-1], "length"),
    (lambda d: d + b"\x00", "length"),
    (lambda d: d[:6] + b"\x00" + d[7:], "name length"),
    (lambda d: d[:6] + b"\x40" + d[7:], "name length"),
    (lambda d: b"", "truncated"),
])
def test_malformed_rejected(mutate: Any, reason: str) -> None:
    data = mutate(encode_datagram("sync", 1, 1, PAYLOAD, None))
    with pytest.raises(DatagramRejected, match=reason):
        decode_datagram(data, None)


def test_wrong_secret_rejected() -> None:
    data = encode_datagram("sync", 1, 1, PAYLOAD, b"other")
    with pytest.raises(DatagramRejected, match="wrong MAC"):
        decode_datagram(data, SECRET)


def test_tampered_payload_rejected() -> None:
    data = bytearray(encode_datagram("sync", 1, 1, {"mode": "primary"}, SECRET))
    i = data.index(b"primary")
    data[i:i + 7] = b"secndry"
    with pytest.raises(DatagramRejected, match="wrong MAC"):
        decode_datagram(bytes(data), SECRET)


def test_unauthenticated_rejected_when_secret_set() -> None:
    with pytest.raises(DatagramRejected, match="unauthenticated"):
        decode_datagram(encode_datagram("sync", 1, 1, PAYLOAD, None), SECRET)


def test_mac_stripped_and_flag_cleared_rejected() -> None:
    data = bytearray(encode_datagram("sync", 1, 1, PAYLOAD, SECRET)[:-32])
    data[5] = 0
    with pytest.raises(DatagramRejected):
        decode_datagram(bytes(data), SECRET)


def test_receiver_without_secret_accepts_signed() -> None:
    assert decode_datagram(encode_datagram("sync", 1, 1, PAYLOAD, SECRET), None).payload == PAYLOAD


@pytest.mark.parametrize("body", [b"[1,2]", b"not json", b"\xff\xfe", b'"str"'])
def test_bad_payload_rejected(body: bytes) -> None:
    data = struct.pack("!4sBBBxQQI", b"MRHB", 1, 0, 4, 1, 1, len(body)) + b"sync" + body
    with pytest.raises(DatagramRejected):
        decode_datagram(data, None)


def test_seq_zero_rejected() -> None:
    with pytest.raises(DatagramRejected, match="sequence"):
        decode_datagram(encode_datagram("sync", 1, 0, {}, None), None)


def test_encode_refuses_oversized_payload_and_bad_names() -> None:
    with pytest.raises(BadInput):
        encode_datagram("sync", 1, 1, {"x": "y" * 2000}, None)
    with pytest.raises(BadInput):
        encode_datagram("", 1, 1, {}, None)
    with pytest.raises(BadInput):
        encode_datagram("n" * 33, 1, 1, {}, None)


# -- replay guard -----------------------------------------------------------------


def test_replay_guard() -> None:
    g = ReplayGuard(remembered=2)
    assert g.accept(1, 1) and g.accept(1, 2) and g.accept(1, 5)
    assert not g.accept(1, 5)
    assert not g.accept(1, 3)
    assert g.accept(2, 1)  # the peer restarted: a new boot id starts over
    assert not g.accept(1, 4)  # the previous run cannot be replayed
    assert g.accept(3, 1)  # a third boot id pushes out the oldest
    assert g.accept(1, 1)  # forgotten after ``remembered`` newer boots


# -- Heartbeat.handle_datagram with a fake clock ----------------------------------


def test_silent_for_with_fake_clock() -> None:
    clock = FakeClock()
    h = make(clock)
    assert h.silent_for("sync") == math.inf and h.peer_state("sync") is None
    assert h.handle_datagram("sync", encode_datagram("sync", 9, 1, PAYLOAD, SECRET), "198.19.0.1")
    assert h.silent_for("sync") == 0.0
    assert h.peer_state("sync") == PAYLOAD
    assert h.silent_for("public") == math.inf
    clock.now += 12.5
    assert h.silent_for("sync") == 12.5
    assert h.counters["sync"] == {"sent": 0, "send_errors": 0, "received": 1, "rejected": 0}
    snap = h.snapshot()
    assert snap["sync"]["silent_for"] == 12.5 and snap["public"]["silent_for"] is None


def test_wrong_source_rejected_and_not_heard() -> None:
    h = make()
    assert not h.handle_datagram("sync", encode_datagram("sync", 9, 1, PAYLOAD, SECRET), "198.19.0.3")
    # the peer's public address is not its sync address
    assert not h.handle_datagram("sync", encode_datagram("sync", 9, 2, PAYLOAD, SECRET), "198.18.0.11")
    assert h.silent_for("sync") == math.inf
    assert h.counters["sync"]["rejected"] == 2
    assert "not the peer" in h.snapshot()["sync"]["last_reject"]


def test_forged_and_unauthenticated_never_heard() -> None:
    h = make()
    assert not h.handle_datagram("sync", encode_datagram("sync", 9, 1, PAYLOAD, b"wrong"), "198.19.0.1")
    assert not h.handle_datagram("sync", encode_datagram("sync", 9, 2, PAYLOAD, None), "198.19.0.1")
    assert h.silent_for("sync") == math.inf and h.peer_state("sync") is None
    assert h.counters["sync"]["rejected"] == 2


def test_replay_rejected_and_does_not_refresh() -> None:
    clock = FakeClock()
    h = make(clock)
    first = encode_datagram("sync", 9, 1, {"mode": "primary"}, SECRET)
    assert h.handle_datagram("sync", first, "198.19.0.1")
    assert h.handle_datagram("sync", encode_datagram("sync", 9, 2, {"mode": "idle"}, SECRET), "198.19.0.1")
    clock.now += 5
    assert not h.handle_datagram("sync", first, "198.19.0.1")
    assert h.silent_for("sync") == 5 and h.peer_state("sync") == {"mode": "idle"}
    assert "replayed" in h.snapshot()["sync"]["last_reject"]


def test_datagram_for_other_network_rejected() -> None:
    h = make()
    data = encode_datagram("public", 9, 1, PAYLOAD, SECRET)
    assert not h.handle_datagram("sync", data, "198.19.0.1")
    assert h.handle_datagram("public", data, "198.18.0.11")


def test_bad_arguments() -> None:
    with pytest.raises(BadInput):
        Heartbeat({}, interval=1, secret=None, describe=dict)
    with pytest.raises(BadInput):
        Heartbeat({"sync": ("1.2.3.4", "nope")}, interval=1, secret=None, describe=dict)
    with pytest.raises(BadInput):
        Heartbeat({"sync": ("1.2.3.4", "1.2.3.5")}, interval=0, secret=None, describe=dict)
    h = make()
    with pytest.raises(BadInput):
        h.set_interval(-1)
    with pytest.raises(BadInput):
        h.silent_for("nope")


# -- real sockets on loopback -----------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Any, timeout: float = 1.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_exchange_over_loopback() -> None:
    port = free_udp_port()
    a = Heartbeat({"sync": ("127.0.0.1", "127.0.0.2"), "public": ("127.0.0.3", "127.0.0.4")}, port,
                  interval=0.05, secret=SECRET, describe=lambda: {"mode": "primary", "node": "a"})
    # b measures silence on a fake clock: what the test checks is what arrived, not how fast.
    clock = FakeClock()
    b = Heartbeat({"sync": ("127.0.0.2", "127.0.0.1"), "public": ("127.0.0.4", "127.0.0.3")}, port,
                  interval=0.05, secret=SECRET, describe=lambda: {"mode": "secondary", "node": "b"}, clock=clock)
    with a, b:
        assert wait_until(lambda: all(h.counters[n]["received"] >= 3 for h in (a, b) for n in ("sync", "public")))
        assert b.peer_state("sync") == {"mode": "primary", "node": "a"}
        assert a.peer_state("public") == {"mode": "secondary", "node": "b"}
        assert b.silent_for("sync") == 0.0 and b.silent_for("public") == 0.0
        assert a.counters["sync"]["rejected"] == 0
        # a third party with the right port but the wrong address is refused
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder:
            intruder.bind(("127.0.0.5", 0))
            intruder.sendto(encode_datagram("sync", 1, 10**9, {"mode": "x"}, SECRET), ("127.0.0.2", port))
            assert wait_until(lambda: b.counters["sync"]["rejected"] == 1)
        a.stop()
        clock.now += 10.0
        time.sleep(0.3)  # six of a's intervals: room for a datagram a stopped sender would still send
        # Nothing heard after the stop: last_heard stayed before the clock moved.
        assert b.silent_for("sync") == 10.0 and b.silent_for("public") == 10.0


def test_wrong_secret_over_loopback_is_silence() -> None:
    port = free_udp_port()
    a = Heartbeat({"sync": ("127.0.0.1", "127.0.0.2")}, port, interval=0.05, secret=b"one", describe=dict)
    b = Heartbeat({"sync": ("127.0.0.2", "127.0.0.1")}, port, interval=0.05, secret=b"two", describe=dict)
    with a, b:
        assert wait_until(lambda: b.counters["sync"]["rejected"] >= 3)
        assert b.silent_for("sync") == math.inf and b.counters["sync"]["received"] == 0


def test_set_interval_live_and_describe_errors() -> None:
    port = free_udp_port()
    calls = []

    def describe() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return {"mode": "primary"}

    a = Heartbeat({"sync": ("127.0.0.1", "127.0.0.2")}, port, interval=10, secret=None, describe=describe)
    b = Heartbeat({"sync": ("127.0.0.2", "127.0.0.1")}, port, interval=10, secret=None, describe=dict)
    with b, a:  # b listens before a's first (and, for 10 s, only) datagram
        assert wait_until(lambda: b.counters["sync"]["received"] == 1)
        a.set_interval(0.02)  # without the wake-up the next send would be 10 s away
        assert wait_until(lambda: b.counters["sync"]["received"] >= 5)
        assert a.describe_errors == 1


def test_send_failures_are_counted() -> None:
    port = free_udp_port()
    # A cut link makes sendto() fail (ENETUNREACH); the sender must count it and go on.
    a = Heartbeat({"sync": ("127.0.0.1", "127.0.0.2")}, port, interval=0.02, secret=None, describe=dict)
    with a:
        assert wait_until(lambda: a.counters["sync"]["sent"] + a.counters["sync"]["send_errors"] >= 3)
        link = a._links["sync"]
        real = link.sock
        assert real is not None

        class Failing:
            def sendto(self, *_: Any) -> int:
                raise OSError(101, "Network is unreachable")

            def fileno(self) -> int:
                return real.fileno()

        link.sock = Failing()  # type: ignore[assignment]
        try:
            assert wait_until(lambda: a.counters["sync"]["send_errors"] >= 3)
            assert all(t.is_alive() for t in a._threads)
        finally:
            link.sock = real


def test_bind_failure_is_mirrord_error() -> None:
    port = free_udp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        h = Heartbeat({"sync": ("127.0.0.1", "127.0.0.2")}, port, interval=1, secret=None, describe=dict)
        with pytest.raises(MirrordError, match="Cannot listen"):
            h.start()
