"""The optional witness: a third address (e.g. the gateway) that tells an isolated appliance it is isolated.

A background thread sends one ICMP echo every ``interval`` and remembers when
the last answer came. ``ok`` is True while an answer is younger than
``max_age``. SafeKit calls this the split-brain checker; we use it so a
primary cut off from everything steps down, and a secondary that cannot see
the witness does not take over.
"""

from __future__ import annotations

import ipaddress
import math
import os
import select
import socket
import struct
import threading
import time
from typing import Callable


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"mirrord-witness!"
    return body[:2] + struct.pack("!H", _checksum(body)) + body[4:]


def is_reply(packet: bytes, ident: int) -> bool:
    """True for an ICMP echo reply (with its IPv4 header) carrying our identifier."""
    if len(packet) < 20:
        return False
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8:
        return False
    kind, _code, _sum, got = struct.unpack("!BBHH", packet[ihl:ihl + 6])
    return kind == 0 and got == ident


class Witness:
    def __init__(self, address: ipaddress.IPv4Address, interval: float, max_age: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = str(address)
        self.interval = interval
        self.max_age = max_age
        self.clock = clock
        self.last_answer = -math.inf
        self._ident = os.getpid() & 0xFFFF
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="witness", daemon=True)

    @property
    def ok(self) -> bool:
        return self.clock() - self.last_answer < self.max_age

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        seq = 0
        try:
            while not self._stop.is_set():
                seq = (seq + 1) & 0xFFFF
                deadline = time.monotonic() + self.interval
                try:
                    sock.sendto(echo_request(self._ident, seq), (self.address, 0))
                except OSError:
                    pass  # unreachable now: that is what we measure
                while (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
                    ready, _, _ = select.select([sock], [], [], left)
                    if ready:
                        packet, (source, _) = sock.recvfrom(2048)
                        if source == self.address and is_reply(packet, self._ident):
                            self.last_answer = self.clock()
        finally:
            sock.close()
