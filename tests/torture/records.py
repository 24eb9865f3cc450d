"""The torture workload's record format, shared by the writer, the scanner and the checker.

A record is RECORD bytes: its id, a SHA-256 digest of the id and payload, a
payload derived from the id, padded with dots and ended by a newline. Records in the O_DSYNC log sit at
``index * RECORD``, so a record's place names the id it must hold: a record
found elsewhere is duplicated, a record whose digest fails is corrupted.
"""

from __future__ import annotations

import hashlib

RECORD = 128


def record_id(cycle: int, index: int) -> str:
    return f"c{cycle:04d}-{index:07d}"


def encode(rid: str) -> bytes:
    payload = hashlib.sha256(("payload " + rid).encode()).hexdigest()[:40]
    digest = hashlib.sha256(f"{rid} {payload}".encode()).hexdigest()[:32]
    line = f"{rid} {digest} {payload} ".encode()
    return line + b"." * (RECORD - 1 - len(line)) + b"\n"


def decode(raw: bytes) -> str | None:
    """The id a record holds, or None if the bytes are not an intact record."""
    if len(raw) != RECORD:
        return None
    try:
        rid = raw.split(b" ", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        return None
    return rid if encode(rid) == raw else None
