"""ARP for the floating IP: duplicate-address detection before taking it, gratuitous ARP after.

scapy builds and parses the ARP frames; the frames go out and come in through
a plain ``AF_PACKET`` socket bound to the interface. That keeps scapy's own
interface list and routing table (snapshots taken when it was imported, stale
once links change) out of the failover path, and every wait here is bounded
by our own deadline rather than by sniff()/srp() internals.

scapy's import costs a few hundred milliseconds and by default reads the
routing tables; ``preload()`` pays that at daemon start with route autoload
off, so a takeover never does.

Frames (Ethernet II, ethertype 0x0806, RFC 826 / RFC 5227)::

    probe (DAD):       dst ff:ff:ff:ff:ff:ff  op=1 who-has  hwsrc=MY_MAC psrc=0.0.0.0
                                              hwdst=00:00:00:00:00:00   pdst=IP
    gratuitous request: dst ff:ff:ff:ff:ff:ff op=1 who-has  hwsrc=MY_MAC psrc=IP
                                              hwdst=00:00:00:00:00:00   pdst=IP
    gratuitous reply:   dst ff:ff:ff:ff:ff:ff op=2 is-at    hwsrc=MY_MAC psrc=IP
                                              hwdst=MY_MAC              pdst=IP

Both gratuitous forms are sent because hosts differ in which one they heed;
Linux takes either as gratuitous (for the reply only when hwdst equals hwsrc,
hence hwdst=MY_MAC).
"""

from __future__ import annotations

import ipaddress
import select
import socket
import time
from typing import Any

from mirrord.errors import BadInput, MirrordError

ETH_P_ARP = 0x0806
PACKET_OUTGOING = 4  # linux/if_packet.h: a frame this host sent, looped back to packet sockets
BROADCAST = "ff:ff:ff:ff:ff:ff"
ZERO_MAC = "00:00:00:00:00:00"
# Frames longer than this are not ARP on Ethernet; a bounded read is enough.
_READ_SIZE = 2048

_scapy: dict[str, Any] = {}


def preload() -> None:
    """Import scapy's Ethernet/ARP layers now, without reading routing tables.

    Idempotent and cheap after the first call. The daemon calls it at start.
    """
    if _scapy:
        return
    from scapy.config import conf

    # Must be set before scapy.route is first imported (by scapy.layers.l2):
    # its Route() reads the routing table only when route_autoload is on.
    conf.route_autoload = False
    conf.route6_autoload = False
    conf.verb = 0
    from scapy.layers.l2 import ARP, Ether

    # Building and parsing once also pays scapy's lazy per-class set-up now.
    frame = bytes(Ether(dst=BROADCAST, src=ZERO_MAC) / ARP(hwsrc=ZERO_MAC, psrc="0.0.0.0", pdst="0.0.0.0"))
    Ether(frame)
    _scapy.update(Ether=Ether, ARP=ARP)


def _layers() -> tuple[Any, Any]:
    preload()
    return _scapy["Ether"], _scapy["ARP"]


def _ipv4(ip: ipaddress.IPv4Address | str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(ip).split("/")[0]))
    except ValueError as exc:
        raise BadInput(f"{ip!r} is not an IPv4 address.") from exc


def _mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


# -- frames (pure: unit-tested without any network) ------------------------------


def probe_frame(ip: str, mac: str) -> bytes:
    """RFC 5227 ARP probe for ``ip``: sender IP 0.0.0.0, so no neighbour cache learns from it."""
    Ether, ARP = _layers()
    return bytes(Ether(dst=BROADCAST, src=mac) /
                 ARP(op=1, hwsrc=mac, psrc="0.0.0.0", hwdst=ZERO_MAC, pdst=_ipv4(ip)))


def gratuitous_frames(ip: str, mac: str) -> list[bytes]:
    """A gratuitous ARP request and reply announcing ``ip`` at ``mac``."""
    Ether, ARP = _layers()
    ip = _ipv4(ip)
    return [bytes(Ether(dst=BROADCAST, src=mac) / ARP(op=1, hwsrc=mac, psrc=ip, hwdst=ZERO_MAC, pdst=ip)),
            bytes(Ether(dst=BROADCAST, src=mac) / ARP(op=2, hwsrc=mac, psrc=ip, hwdst=mac, pdst=ip))]


def claims(frame: bytes, ip: str, my_mac: str) -> bool:
    return claimant(frame, ip, my_mac) is not None


def claimant(frame: bytes, ip: str, my_mac: str) -> str | None:
    """The MAC of the other host ``frame`` shows using or wanting ``ip``, else None.

    That is an ARP packet from a MAC other than ours whose sender IP is ``ip``
    (an answer to our probe, or an announcement), or another host's probe for
    ``ip`` (RFC 5227 2.1.1: two claimants both back off).
    """
    Ether, ARP = _layers()
    try:
        pkt = Ether(frame)
    except Exception:  # noqa: BLE001 - scapy raises many types on garbage; garbage claims nothing
        return None
    if ARP not in pkt:
        return None
    arp = pkt[ARP]
    sender = str(arp.hwsrc).lower()
    if sender == my_mac.lower():
        return None
    ip = _ipv4(ip)
    if arp.psrc == ip or (arp.op == 1 and arp.psrc == "0.0.0.0" and arp.pdst == ip):
        return sender
    return None


# -- the wire ---------------------------------------------------------------------


def _open(iface: str) -> tuple[socket.socket, str]:
    """A packet socket on ``iface`` for ARP frames, and the interface's MAC."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    except OSError as exc:
        raise MirrordError(f"Cannot open a packet socket for ARP ({exc.strerror or exc}); "
                           f"mirrord must run as root.") from exc
    try:
        sock.bind((iface, ETH_P_ARP))
        # A bound packet socket's name carries the interface's hardware address.
        mac = _mac_str(sock.getsockname()[4])
    except OSError as exc:
        sock.close()
        raise MirrordError(f"Cannot use interface {iface!r} for ARP: {exc.strerror or exc}.") from exc
    return sock, mac


def address_in_use(ip: ipaddress.IPv4Address | str, iface: str, timeout: float = 1.0) -> str | None:
    """Duplicate-address detection: the MAC of another host on ``iface`` answering for ``ip``, or None.

    Sends an ARP probe at once and again half way through ``timeout`` (one lost
    frame must not make a held address look free), and returns at the
    first claim, otherwise None after ``timeout`` seconds.
    """
    if not timeout > 0:
        raise BadInput(f"DAD timeout must be positive, not {timeout!r}.")
    ip = _ipv4(ip)
    sock, mac = _open(iface)
    with sock:
        probe = probe_frame(ip, mac)
        start = time.monotonic()
        deadline = start + timeout
        resend_at = start + timeout / 2
        _send(sock, probe, iface)
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            if resend_at is not None and now >= resend_at:
                _send(sock, probe, iface)
                resend_at = None
            wait_until = deadline if resend_at is None else min(deadline, resend_at)
            ready, _, _ = select.select([sock], [], [], max(0.0, wait_until - now))
            if not ready:
                continue
            try:
                frame, addr = sock.recvfrom(_READ_SIZE)
            except OSError as exc:
                raise MirrordError(f"Reading ARP on {iface} failed: {exc.strerror or exc}.") from exc
            if addr[2] == PACKET_OUTGOING:
                continue  # our own probe, seen on the way out
            sender = claimant(frame, ip, mac)
            if sender is not None:
                return sender


def _send(sock: socket.socket, frame: bytes, iface: str) -> None:
    try:
        sock.send(frame)
    except OSError as exc:
        raise MirrordError(f"Cannot send ARP on {iface}: {exc.strerror or exc} "
                           f"(is the link down?).") from exc


def announce(ip: ipaddress.IPv4Address | str, iface: str, count: int = 3, spacing: float = 0.2) -> int:
    """Gratuitous ARP for ``ip`` from ``iface``'s MAC, ``count`` rounds ``spacing`` seconds apart.

    Returns the number of frames sent. Takes (count - 1) * spacing seconds, so
    never more than count * spacing. A round that fails to send (the link went
    down) is skipped; only when every round fails is it an error.
    """
    if count < 1 or spacing < 0:
        raise BadInput(f"announce needs count >= 1 and spacing >= 0 (got {count}, {spacing}).")
    ip = _ipv4(ip)
    sock, mac = _open(iface)
    sent = 0
    last_error: OSError | None = None
    with sock:
        frames = gratuitous_frames(ip, mac)
        start = time.monotonic()
        for n in range(count):
            if n:
                # Paced from the start, not from the previous send, so the total stays bounded.
                time.sleep(max(0.0, start + n * spacing - time.monotonic()))
            for frame in frames:
                try:
                    sock.send(frame)
                    sent += 1
                except OSError as exc:
                    last_error = exc
    if sent == 0 and last_error is not None:
        raise MirrordError(f"Gratuitous ARP for {ip} on {iface} failed: "
                           f"{last_error.strerror or last_error} (is the link down?).") from last_error
    return sent


def iface_for(ip: ipaddress.IPv4Address | str) -> str:
    """The name of the interface that carries ``ip`` in this network namespace."""
    from pyroute2 import IPRoute  # lazy: only the effectors need netlink
    from pyroute2.netlink.exceptions import NetlinkError

    address = _ipv4(ip)
    try:
        with IPRoute() as ipr:
            for a in ipr.get_addr(family=socket.AF_INET):
                if a.get_attr("IFA_ADDRESS") == address:
                    links = ipr.get_links(a["index"])
                    if links:
                        return str(links[0].get_attr("IFLA_IFNAME"))
    except NetlinkError as exc:
        raise MirrordError(f"Cannot list addresses over netlink: {exc}.") from exc
    raise MirrordError(f"No interface carries {address}.")


def mac_of(iface: str) -> str:
    """The hardware address of ``iface`` (told to the peer, so it can recognise us in DAD)."""
    sock, mac = _open(iface)
    sock.close()
    return mac
