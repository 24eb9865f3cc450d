"""What the unit tests of one replication side (PrimarySide, SecondarySide) run it with."""

from __future__ import annotations

import ipaddress
import socket
import threading
from pathlib import Path

from mirrord.config import Settings
from mirrord.replication.secondary import SecondarySide

A1, A2 = ipaddress.IPv4Address("198.18.0.11"), ipaddress.IPv4Address("198.18.0.12")
S1, S2 = ipaddress.IPv4Address("198.19.0.11"), ipaddress.IPv4Address("198.19.0.12")


def settings(tmp_path: Path) -> Settings:
    """The lab's a1/a2 pair (nothing is sent to these addresses: the tests hand sockets in)."""
    return Settings(primary_ip=A1, secondary_ip=A2, primary_sync_ip=S1, secondary_sync_ip=S2,
                    floating_ip=ipaddress.IPv4Interface("198.18.0.100/24"), ping_interval=0.1,
                    disk=tmp_path / "disk.img")


def follow(side: SecondarySide) -> tuple[socket.socket, threading.Thread]:
    """Start the secondary's control loop on a new connection: the primary's end, and the loop."""
    with socket.create_server(("127.0.0.1", 0)) as listener:  # TCP: the loop tunes TCP options
        far = socket.create_connection(listener.getsockname(), timeout=10)
        near, _ = listener.accept()
    side._control = near
    follower = threading.Thread(target=side._follow, args=(near, side.primary))
    follower.start()
    return far, follower
