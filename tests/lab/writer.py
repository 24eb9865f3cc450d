"""A writer that knows exactly what was acknowledged.

Run inside a node: ``python writer.py DEVICE START_BLOCK COUNT TAG [random]``.
Each 4 KiB block written carries a unique header (tag, block number, counter)
and is written with O_DIRECT|O_DSYNC; only after pwrite returns does the
writer print ``ACK <block> <counter>``: a printed line is an acknowledged
write. With ``random`` it writes random blocks in the range until killed, or
for RANDOM_SECONDS at most; otherwise blocks START..START+COUNT once each.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import sys
import time

BLOCK = 4096
# pytest's timeout: a writer that a failed test never killed still stops by itself.
RANDOM_SECONDS = 300.0


def block_bytes(tag: str, block: int, counter: int) -> bytes:
    head = f"mirrord-writer {tag} block={block} n={counter}\n".encode()
    fill = hashlib.sha256(head).digest() * (BLOCK // 32)
    return (head + fill)[:BLOCK]


def main() -> None:
    device, start, count, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    randomly = len(sys.argv) > 5 and sys.argv[5] == "random"
    fd = os.open(device, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | os.O_DSYNC, 0o644)
    buf = mmap.mmap(-1, BLOCK)
    rng = random.Random(tag)
    counter = 0
    deadline = time.monotonic() + RANDOM_SECONDS
    while (time.monotonic() < deadline) if randomly else (counter < count):
        block = start + (rng.randrange(count) if randomly else counter)
        buf.seek(0)
        buf.write(block_bytes(tag, block, counter))
        os.pwrite(fd, buf, block * BLOCK)
        print(f"ACK {block} {counter}", flush=True)
        counter += 1
    os.close(fd)


if __name__ == "__main__":
    main()
