"""A PrimaryServer with an activity log, in its own process, until it is killed.

``python al_server.py DISK DEVICE ACTIVITY_LOG SLOTS`` serves DISK at
DEVICE and prints ``ready`` once the mount is live. Each line ``silent-peer``
on stdin then attaches a peer that never reads or acknowledges (a 127.0.0.1
connection whose far end this process holds and ignores), answered with
``attached``: every later write stays in flight, on the local disk but not
acknowledged, as when a primary crashes before its secondary answered.
"""

from __future__ import annotations

import signal
import socket
import sys

from mirrord.replication.native import PrimaryServer


def main() -> None:
    disk, device, log, slots = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    server = PrimaryServer(disk, device, activity_log=log, al_slots=slots, peer_timeout_ms=600_000)
    server.start()
    print("ready", flush=True)
    held = []
    for line in sys.stdin:
        if line.strip() == "silent-peer":
            with socket.create_server(("127.0.0.1", 0)) as listener:
                ours = socket.create_connection(listener.getsockname())
                theirs, _ = listener.accept()
            held.append(theirs)  # never read: no ack ever comes back
            server.attach_peer(ours.detach())
            print("attached", flush=True)
    signal.pause()  # until SIGKILL: no clean stop, on purpose


if __name__ == "__main__":
    main()
