"""ARP for real: two network namespaces joined by a veth pair.

    ns A  arpa 198.18.200.1/24  <-- veth -->  arpb 198.18.200.2/24  ns B

Only 198.18.0.0/15 addresses are used, only inside namespaces this module
creates (IPv6 is turned off in them so not even link-local addresses appear),
and the namespaces are always removed, which also removes the veth pair.
The code under test runs in a child process that has entered the namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any, Iterator

import pytest

from under_ci import skip_or_fail

pytestmark = pytest.mark.lab

A_IF, B_IF = "arpa", "arpb"
A_IP, B_IP = "198.18.200.1", "198.18.200.2"
FLOATING = "198.18.200.10"
FREE = "198.18.200.77"
PREFIX = 24
NUD_STALE = 0x04
HELPER_TIMEOUT = 30


def require_root() -> None:
    if os.geteuid() != 0:
        skip_or_fail("the ARP lab tests need root (network namespaces, packet sockets)")


def in_ns(nsname: str, body: str, *args: str) -> Any:
    """Run ``body`` in a fresh interpreter inside ``nsname``; it prints one JSON value last."""
    code = "import json, sys\nfrom pyroute2 import netns\nnetns.setns(sys.argv[1])\n" + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code, nsname, *args],
                         capture_output=True, text=True, timeout=HELPER_TIMEOUT)
    assert out.returncode == 0, f"helper in {nsname} failed:\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


DISABLE_IPV6 = """
for conf in ("all", "default"):
    with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
        f.write("1")
print("null")
"""


def ipr(nsname: str):  # noqa: ANN201 - pyroute2.IPRoute
    from pyroute2 import IPRoute

    return IPRoute(netns=nsname, flags=0)  # flags=0: never create a namespace by accident


def link_index(nsname: str, ifname: str) -> int:
    with ipr(nsname) as r:
        return int(r.link_lookup(ifname=ifname)[0])


def mac_of(nsname: str, ifname: str) -> str:
    with ipr(nsname) as r:
        return str(r.get_links(link_index(nsname, ifname))[0].get_attr("IFLA_ADDRESS"))


def wait_oper_up(nsname: str, ifname: str, timeout: float = 5.0) -> None:
    # veth carrier comes up asynchronously; frames sent before are dropped
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with ipr(nsname) as r:
            if r.get_links(link_index(nsname, ifname))[0].get("operstate") == "UP":
                return
        time.sleep(0.02)
    raise AssertionError(f"{ifname} in {nsname} did not come up")


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[str, str]]:
    require_root()
    from pyroute2 import netns

    names = (f"mrdarp{os.getpid()}a", f"mrdarp{os.getpid()}b")
    created: list[str] = []
    try:
        for n in names:
            netns.create(n)
            created.append(n)
            in_ns(n, DISABLE_IPV6)
        a, b = names
        with ipr(a) as r:
            r.link("add", ifname=A_IF, kind="veth", peer={"ifname": B_IF, "net_ns_fd": b})
        for n, ifname, address in ((a, A_IF, A_IP), (b, B_IF, B_IP)):
            idx = link_index(n, ifname)
            with ipr(n) as r:
                r.link("set", index=link_index(n, "lo"), state="up")
                r.addr("add", index=idx, address=address, prefixlen=PREFIX)
                r.link("set", index=idx, state="up")
        for n, ifname in ((a, A_IF), (b, B_IF)):
            wait_oper_up(n, ifname)
        yield a, b
    finally:
        for n in created:
            try:
                netns.remove(n)
            except Exception as exc:  # noqa: BLE001 - report, keep removing the others
                print(f"could not remove namespace {n}: {exc}", file=sys.stderr)


# How long DAD waits, and when it probes again, is tested on a fake clock in tests/unit/test_arp_frames.py.
DAD = """
from mirrord.net import arp
arp.preload()
print(json.dumps({"mac": arp.address_in_use(sys.argv[2], sys.argv[3], float(sys.argv[4]))}))
"""


def test_dad_sees_an_address_the_other_namespace_holds(pair: tuple[str, str]) -> None:
    a, b = pair
    r = in_ns(b, DAD, A_IP, B_IF, "2.0")
    assert r["mac"] == mac_of(a, A_IF)  # the holder answered (a timeout gives None)


def test_dad_says_free_for_a_free_address(pair: tuple[str, str]) -> None:
    _, b = pair
    r = in_ns(b, DAD, FREE, B_IF, "0.5")
    assert r["mac"] is None


def test_gratuitous_arp_moves_the_neighbour_entry(pair: tuple[str, str]) -> None:
    a, b = pair
    a_mac = mac_of(a, A_IF)
    b_idx = link_index(b, B_IF)
    stale_mac = "02:00:00:00:00:99"
    with ipr(b) as r:
        # the client still believes the floating IP is at the old primary's MAC
        r.neigh("add", dst=FLOATING, lladdr=stale_mac, ifindex=b_idx, state=NUD_STALE)
    with ipr(a) as r:
        r.addr("add", index=link_index(a, A_IF), address=FLOATING, prefixlen=PREFIX)
    try:
        result = in_ns(a, """
            from mirrord.net import arp
            arp.preload()
            print(json.dumps({"sent": arp.announce(sys.argv[2], sys.argv[3], count=3, spacing=0.1)}))
        """, FLOATING, A_IF)
        assert result["sent"] == 6  # a request and a reply per round

        deadline = time.monotonic() + 2.0
        seen = None
        while time.monotonic() < deadline:
            with ipr(b) as r:
                entries = [n for n in r.get_neighbours(ifindex=b_idx) if n.get_attr("NDA_DST") == FLOATING]
            seen = entries[0].get_attr("NDA_LLADDR") if entries else None
            if seen == a_mac:
                break
            time.sleep(0.05)
        assert seen == a_mac, f"B still maps {FLOATING} to {seen}, expected A's {a_mac}"
    finally:
        with ipr(a) as r:
            r.addr("del", index=link_index(a, A_IF), address=FLOATING, prefixlen=PREFIX)


def test_iface_for_inside_a_namespace(pair: tuple[str, str]) -> None:
    a, _ = pair
    assert in_ns(a, """
        from mirrord.net import arp
        print(json.dumps(arp.iface_for(sys.argv[2])))
    """, A_IP) == A_IF


def test_announce_on_a_down_link_is_an_error(pair: tuple[str, str]) -> None:
    a, _ = pair
    idx = link_index(a, A_IF)
    with ipr(a) as r:
        r.link("set", index=idx, state="down")
    try:
        r2 = in_ns(a, """
            from mirrord.net import arp
            from mirrord.errors import MirrordError
            try:
                arp.announce(sys.argv[2], sys.argv[3], count=2, spacing=0.01)
                print(json.dumps("sent"))
            except MirrordError as exc:
                print(json.dumps(str(exc)))
        """, FLOATING, A_IF)
        assert "link down" in r2
    finally:
        with ipr(a) as r:
            r.link("set", index=idx, state="up")
        wait_oper_up(a, A_IF)
