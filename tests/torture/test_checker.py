"""The checker's verdicts, case by case (pure; no lab)."""

from __future__ import annotations

from typing import Any

import pytest

from checker import Acked, check
from records import RECORD, decode, encode, record_id


def log_at(cycle: int, index: int) -> str:
    return f"log/c{cycle:04d}.log@{index * RECORD}"


def scan(log: dict[str, list[str]] | None = None, files: dict[str, list[str]] | None = None,
         bad: list[list[str]] | None = None) -> dict[str, Any]:
    return {"log": log or {}, "files": files or {}, "bad": bad or []}


R0, R1, R2, R3 = (record_id(1, i) for i in range(4))

CASES = [
    # (name, acked log, acked files, scan, missing, corrupted, duplicated, torn)
    ("all present", {R0, R1}, {R0}, scan({R0: [log_at(1, 0)], R1: [log_at(1, 1)]}, {R0: [f"files/c0001/{R0}"]}),
     0, 0, 0, 0),
    ("nothing acknowledged, nothing there", set(), set(), scan(), 0, 0, 0, 0),
    ("unacknowledged record present is fine", {R0}, set(), scan({R0: [log_at(1, 0)], R1: [log_at(1, 1)]}),
     0, 0, 0, 0),
    ("acknowledged log record absent", {R0, R1}, set(), scan({R0: [log_at(1, 0)]}), 1, 0, 0, 0),
    ("acknowledged file absent", set(), {R0}, scan(), 1, 0, 0, 0),
    ("torn slot after the last acknowledged", {R0}, set(), scan({R0: [log_at(1, 0)]}, bad=[[log_at(1, 1), "\0"]]),
     0, 0, 0, 1),
    ("bad bytes at an acknowledged slot", {R0, R1}, set(),
     scan({R0: [log_at(1, 0)]}, bad=[[log_at(1, 1), "xx"]]), 1, 1, 0, 0),
    ("bad slot below the highest acknowledged", {R0, R2}, set(),
     scan({R0: [log_at(1, 0)], R2: [log_at(1, 2)]}, bad=[[log_at(1, 1), "\0"]]), 0, 1, 0, 0),
    ("another record at an acknowledged slot", {R0, R1}, set(),
     scan({R0: [log_at(1, 0), log_at(1, 1)]}), 1, 1, 0, 0),
    ("a copy where nothing was acknowledged", {R0}, set(),
     scan({R0: [log_at(1, 0), log_at(1, 3)]}), 0, 0, 1, 0),
    ("torn file not acknowledged", set(), {R0}, scan(files={R0: [f"files/c0001/{R0}"]},
                                                     bad=[[f"files/c0001/{R3}", "not an intact record"]]), 0, 0, 0, 1),
    ("acknowledged file corrupted", set(), {R0}, scan(bad=[[f"files/c0001/{R0}", "not an intact record"]]),
     1, 1, 0, 0),
    ("file holding another record", set(), {R0, R1}, scan(files={R0: [f"files/c0001/{R0}", f"files/c0001/{R1}"]}),
     1, 1, 0, 0),
    ("other cycles do not count towards the highest", {R0, record_id(2, 9)}, set(),
     scan({R0: [log_at(1, 0)], record_id(2, 9): [log_at(2, 9)]}, bad=[[log_at(1, 5), "\0"]]), 0, 0, 0, 1),
]


@pytest.mark.parametrize("name,log,files,found,missing,corrupted,duplicated,torn", CASES, ids=[c[0] for c in CASES])
def test_verdict(name: str, log: set[str], files: set[str], found: dict[str, Any], missing: int, corrupted: int,
                 duplicated: int, torn: int) -> None:
    verdict = check(Acked(set(log), set(files)), found)
    assert (len(verdict.missing), len(verdict.corrupted), len(verdict.duplicated), len(verdict.torn)) == \
        (missing, corrupted, duplicated, torn), verdict
    assert verdict.ok == (missing == corrupted == duplicated == 0)


def test_acked_reads_only_ack_lines() -> None:
    acked = Acked()
    acked.add_output(f"ACK log {R0}\nACK file {R0}\nERR [Errno 5] Input/output error\nACK log")
    assert acked.log == {R0} and acked.files == {R0}


@pytest.mark.parametrize("damage", [lambda b: b[:-1], lambda b: b"\0" * RECORD, lambda b: b[:20] + b"X" + b[21:],
                                    lambda b: encode(R1)[:14] + b[14:]])
def test_a_damaged_record_does_not_decode(damage: Any) -> None:
    raw = encode(R0)
    assert decode(raw) == R0
    assert decode(damage(raw)) is None
