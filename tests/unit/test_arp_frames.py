"""ARP frames and their classification, without touching any network (see tests/lab/test_arp.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace
from typing import Any

import pytest

from mirrord.errors import BadInput, MirrordError
from mirrord.net import arp

MINE = "02:00:00:00:00:01"
OTHER = "02:00:00:00:00:02"
IP = "198.18.0.10"


def parse(frame: bytes):  # noqa: ANN201 - a scapy packet
    from scapy.layers.l2 import ARP, Ether

    pkt = Ether(frame)
    return pkt, pkt[ARP]


def test_probe_frame() -> None:
    eth, a = parse(arp.probe_frame(IP, MINE))
    assert (eth.dst, eth.src, eth.type) == ("ff:ff:ff:ff:ff:ff", MINE, 0x0806)
    assert (a.op, a.hwsrc, a.psrc, a.hwdst, a.pdst) == (1, MINE, "0.0.0.0", "00:00:00:00:00:00", IP)


def test_gratuitous_frames() -> None:
    request, reply = arp.gratuitous_frames(IP + "/24", MINE)
    eth, a = parse(request)
    assert eth.dst == "ff:ff:ff:ff:ff:ff" and eth.src == MINE
    assert (a.op, a.hwsrc, a.psrc, a.pdst) == (1, MINE, IP, IP)
    eth, a = parse(reply)
    assert eth.dst == "ff:ff:ff:ff:ff:ff"
    # Linux treats a reply as gratuitous only when hwdst == hwsrc
    assert (a.op, a.hwsrc, a.psrc, a.hwdst, a.pdst) == (2, MINE, IP, MINE, IP)


def frame(op: int, hwsrc: str, psrc: str, pdst: str) -> bytes:
    arp.preload()  # runs at collection: scapy must not be imported with route autoload on
    from scapy.layers.l2 import ARP, Ether

    return bytes(Ether(dst=MINE, src=hwsrc) / ARP(op=op, hwsrc=hwsrc, psrc=psrc, pdst=pdst))


@pytest.mark.parametrize("data, expected", [
    (frame(2, OTHER, IP, "0.0.0.0"), True),            # answer to our probe
    (frame(1, OTHER, IP, IP), True),                   # someone announces it
    (frame(1, OTHER, "0.0.0.0", IP), True),            # someone else probes for it
    (frame(1, MINE, "0.0.0.0", IP), False),            # our own probe
    (frame(2, MINE.upper(), IP, IP), False),           # our own announcement, any case
    (frame(2, OTHER, "198.18.0.11", "0.0.0.0"), False),  # about another address
    (frame(1, OTHER, "198.18.0.11", IP), False),       # a plain request *for* it
    (b"\x00" * 10, False),                             # garbage
    (bytes.fromhex("ffffffffffff02000000000208004500"), False),  # IPv4, not ARP
])
def test_claims(data: bytes, expected: bool) -> None:
    assert arp.claims(data, IP, MINE) is expected


def test_bad_input() -> None:
    with pytest.raises(BadInput):
        arp.probe_frame("nope", MINE)
    with pytest.raises(BadInput):
        arp.announce(IP, "lo", count=0)
    with pytest.raises(BadInput):
        arp.address_in_use(IP, "lo", timeout=0)


def test_unknown_interface_is_mirrord_error() -> None:
    with pytest.raises(MirrordError):
        arp.announce(IP, "no-such-if0", count=1, spacing=0)


def test_iface_for() -> None:
    assert arp.iface_for("127.0.0.1") == "lo"
    with pytest.raises(MirrordError, match="No interface carries"):
        arp.iface_for("198.18.255.254")


def test_preload_does_not_read_routes_and_makes_later_use_cheap() -> None:
    code = textwrap.dedent("""
        import sys, time
        from mirrord.net import arp
        t = time.perf_counter(); arp.preload(); load = time.perf_counter() - t
        from scapy.config import conf
        assert conf.route_autoload is False, conf.route_autoload
        assert conf.route.routes == [], conf.route.routes
        t = time.perf_counter(); arp.probe_frame("198.18.0.10", "02:00:00:00:00:01"); use = time.perf_counter() - t
        print(load, use)
        assert use < 0.05, (load, use)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# -- the timing of announce and DAD, on a fake clock (the lab test checks the frames on the wire) --


class FakeTime:
    """Stands in for the time module inside arp: sleeping and select waits only move ``now``."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeSocket:
    """A packet socket whose sends cost ``send_cost`` seconds of the fake clock."""

    def __init__(self, clock: FakeTime, send_cost: float = 0.0) -> None:
        self.clock = clock
        self.send_cost = send_cost
        self.sent_at: list[float] = []

    def send(self, frame: bytes) -> int:
        self.sent_at.append(self.clock.now)
        self.clock.now += self.send_cost
        return len(frame)

    def __enter__(self) -> "FakeSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def fake_link(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeTime, FakeSocket]:
    clock = FakeTime()
    sock = FakeSocket(clock, send_cost=0.01)
    monkeypatch.setattr(arp, "time", clock)
    monkeypatch.setattr(arp, "_open", lambda iface: (sock, MINE))
    return clock, sock


def test_announce_is_paced_from_its_start_and_ends_after_its_last_round(
        fake_link: tuple[FakeTime, FakeSocket]) -> None:
    clock, sock = fake_link
    assert arp.announce(IP, "eth0", count=3, spacing=0.1) == 6  # a request and a reply per round
    # Rounds start 0.1 s apart although each round's sends take 0.02 s: the pace does not drift.
    assert [round(t - 100.0, 6) for t in sock.sent_at[::2]] == [0.0, 0.1, 0.2]
    # No wait after the last round: (count - 1) * spacing plus the sends, under count * spacing.
    assert round(clock.now - 100.0, 6) == 0.22


def test_dad_of_a_free_address_probes_twice_and_waits_exactly_its_timeout(
        fake_link: tuple[FakeTime, FakeSocket], monkeypatch: pytest.MonkeyPatch) -> None:
    clock, sock = fake_link
    sock.send_cost = 0.0

    def silent_select(rlist: list[Any], wlist: list[Any], xlist: list[Any], timeout: float) -> tuple[list[Any], ...]:
        clock.now += timeout  # nobody answers: every wait runs to its end
        return [], [], []

    monkeypatch.setattr(arp, "select", SimpleNamespace(select=silent_select))
    assert arp.address_in_use(IP, "eth0", timeout=0.5) is None
    # A second probe half way (one lost frame must not make a held address look free), and no wait past the timeout.
    assert [round(t - 100.0, 6) for t in sock.sent_at] == [0.0, 0.25]
    assert round(clock.now - 100.0, 6) == 0.5
