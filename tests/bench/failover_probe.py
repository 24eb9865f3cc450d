"""Client-side failover probe: run as a program inside the lab's client namespace.

    python failover_probe.py --vip 198.18.0.10 --old-mac M1 --new-mac M2 [--http PATH --want TEXT --new-name a2]

Every ~10 ms it sends one ICMP echo to the floating IP through the client's
own IP stack (so the client's neighbour cache decides which MAC the echo goes
to, as for any real client on the network) and, with ``--http``, tries one
HTTP GET of ``http://VIP:8080/PATH``. A packet socket on the client's eth0
only *listens*: it tells which MAC each echo reply came from and sees every
ARP frame that announces the floating IP. The probe never sends ARP itself, so
it changes nothing in the client's neighbour table that a real client's
traffic would not change.

stdout: ``READY`` once the old owner answers the echo (and, with --http, has
served the expected text once), then, when the new owner has answered (and
served the text), or at the deadline, one JSON object of CLOCK_MONOTONIC
timestamps; that clock is the same for every process on the host, so the
caller compares them with its own ``time.monotonic()``.

Everything is bounded: --ready-timeout for READY, --deadline after READY.
Addresses: only the lab's 198.18.0.0/15 (checked).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import socket
import struct
import sys
import threading
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
PERIOD = 0.01
HTTP_IN_FLIGHT = 64
LAB_NET = ipaddress.IPv4Network("198.18.0.0/15")


def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


class Probe:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.vip = args.vip
        self.vip_raw = socket.inet_aton(args.vip)
        self.old, self.new = args.old_mac.lower(), args.new_mac.lower()
        self.ident = os.getpid() & 0xFFFF
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.last_old_echo: float | None = None
        self.first_new_echo: float | None = None
        self.first_new_arp: float | None = None
        self.echo_from: dict[str, int] = {}
        self.http_old_ok: float | None = None
        self.last_old_http: float | None = None
        self.first_new_http: float | None = None
        self.http_tries = 0
        self.http_wrong: list[str] = []  # answers that were not the expected text (first few)

    # -- ICMP out, packet socket in -----------------------------------------------------
    def send_loop(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # we never read it; replies are seen below
        seq = 0
        with s:
            next_at = time.monotonic()
            while not self.stop.is_set():
                seq = (seq + 1) & 0xFFFF
                body = struct.pack("!BBHHH", 8, 0, 0, self.ident, seq) + b"mirrord-failover"
                pkt = body[:2] + struct.pack("!H", _csum(body)) + body[4:]
                try:
                    s.sendto(pkt, (self.vip, 0))
                    self.sent += 1
                except OSError:
                    pass  # e.g. the neighbour queue is full while the address has no owner
                next_at += PERIOD
                self.stop.wait(max(0.0, next_at - time.monotonic()))

    def sniff_loop(self) -> None:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        with s:
            s.bind((self.args.iface, 0))
            while not self.stop.is_set():
                if not select.select([s], [], [], 0.05)[0]:
                    continue
                data, addr = s.recvfrom(2048)
                now = time.monotonic()
                if addr[2] == PACKET_OUTGOING or len(data) < 14:
                    continue
                src = _mac(data[6:12])
                etype = struct.unpack("!H", data[12:14])[0]
                if etype == 0x0800:
                    self._ip(data[14:], src, now)
                elif etype == 0x0806:
                    self._arp(data[14:], src, now)

    def _ip(self, ip: bytes, src: str, now: float) -> None:
        if len(ip) < 28 or ip[9] != 1 or ip[12:16] != self.vip_raw:
            return
        ihl = (ip[0] & 0xF) * 4
        kind, _, _, ident, _ = struct.unpack("!BBHHH", ip[ihl:ihl + 8])
        if kind != 0 or ident != self.ident:
            return
        with self.lock:
            self.echo_from[src] = self.echo_from.get(src, 0) + 1
            if src == self.old:
                self.last_old_echo = now
            elif src == self.new and self.first_new_echo is None:
                self.first_new_echo = now

    def _arp(self, arp: bytes, src: str, now: float) -> None:
        if len(arp) < 28:
            return
        sha, spa = _mac(arp[8:14]), arp[14:18]
        if spa == self.vip_raw and sha == self.new:
            with self.lock:
                if self.first_new_arp is None:
                    self.first_new_arp = now

    # -- HTTP -----------------------------------------------------------------------------
    def http_loop(self) -> None:
        """A new GET every PERIOD, each in its own short-lived thread (at most HTTP_IN_FLIGHT at once).

        A request sent to a frozen appliance (its kernel still completes the TCP
        handshake until its links go down) waits for its read timeout; it must
        not hold back the requests after it, or the first good reply from the
        new owner would be measured up to that timeout late.
        """
        request = (f"GET /{self.args.http.lstrip('/')} HTTP/1.0\r\nHost: {self.vip}:8080\r\n"
                   "Connection: close\r\n\r\n").encode()
        in_flight = threading.BoundedSemaphore(HTTP_IN_FLIGHT)
        next_at = time.monotonic()
        while not self.stop.is_set():
            if in_flight.acquire(timeout=PERIOD):
                threading.Thread(target=self._attempt, args=(request, in_flight), daemon=True).start()
            next_at += PERIOD
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def _attempt(self, request: bytes, in_flight: threading.BoundedSemaphore) -> None:
        try:
            served_by, body, status = self._get(request)
            now = time.monotonic()
            with self.lock:
                self.http_tries += 1
                if status is None:
                    return
                good = status == 200 and body == self.args.want
                if good and served_by == self.args.old_name:
                    self.last_old_http = now
                    if self.http_old_ok is None:
                        self.http_old_ok = now
                elif good and served_by == self.args.new_name:
                    if self.first_new_http is None or now < self.first_new_http:
                        self.first_new_http = now
                elif not good and len(self.http_wrong) < 5:
                    self.http_wrong.append(f"{status} from {served_by}: {body[:60]!r}")
        finally:
            in_flight.release()

    def _get(self, request: bytes) -> tuple[str | None, str, int | None]:
        try:
            # A short connect timeout: a SYN sent to the dead owner's MAC is lost, and
            # the next try (after the client's neighbour entry moved) must not wait 1 s.
            with socket.create_connection((self.vip, 8080), timeout=0.05) as c:
                c.settimeout(1.0)
                c.sendall(request)
                chunks = []
                while True:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except OSError:
            return None, "", None
        raw = b"".join(chunks)
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            return None, "", None
        served_by = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "x-served-by":
                served_by = value.strip()
        return served_by, body.decode("utf-8", "replace"), status

    # -- main -----------------------------------------------------------------------------
    def ready(self) -> bool:
        with self.lock:
            return self.last_old_echo is not None and (not self.args.http or self.http_old_ok is not None)

    def done(self) -> bool:
        with self.lock:
            return self.first_new_echo is not None and (not self.args.http or self.first_new_http is not None)

    def result(self) -> dict[str, object]:
        with self.lock:
            return {"last_old_echo": self.last_old_echo, "first_new_echo": self.first_new_echo,
                    "first_new_arp": self.first_new_arp, "last_old_http": self.last_old_http,
                    "first_new_http": self.first_new_http, "echo_sent": self.sent,
                    "echo_replies_by_mac": self.echo_from, "http_tries": self.http_tries,
                    "http_wrong": self.http_wrong, "ended": time.monotonic()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--vip", required=True)
    p.add_argument("--iface", default="eth0")
    p.add_argument("--old-mac", required=True)
    p.add_argument("--new-mac", required=True)
    p.add_argument("--old-name", default="a1")
    p.add_argument("--new-name", default="a2")
    p.add_argument("--http", default="")
    p.add_argument("--want", default="")
    p.add_argument("--ready-timeout", type=float, default=20.0)
    p.add_argument("--deadline", type=float, default=30.0)
    args = p.parse_args()
    if ipaddress.IPv4Address(args.vip) not in LAB_NET:
        print(f"refusing to probe {args.vip}: outside {LAB_NET}", file=sys.stderr)
        return 2
    probe = Probe(args)
    threads = [threading.Thread(target=probe.sniff_loop, daemon=True),
               threading.Thread(target=probe.send_loop, daemon=True)]
    if args.http:
        threads.append(threading.Thread(target=probe.http_loop, daemon=True))
    for t in threads:
        t.start()
    end = time.monotonic() + args.ready_timeout
    while not probe.ready() and time.monotonic() < end:
        time.sleep(PERIOD)
    if not probe.ready():
        print(json.dumps({"error": "the old owner never answered", **probe.result()}), flush=True)
        probe.stop.set()
        return 1
    print("READY", flush=True)
    end = time.monotonic() + args.deadline
    while not probe.done() and time.monotonic() < end:
        time.sleep(PERIOD)
    # a last moment so a reply in flight is counted, then stop every thread (bounded)
    time.sleep(0.05)
    probe.stop.set()
    for t in threads:
        t.join(timeout=2.0)
    print(json.dumps(probe.result()), flush=True)
    return 0 if probe.done() else 1


if __name__ == "__main__":
    sys.exit(main())
