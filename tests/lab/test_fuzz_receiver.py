"""Fuzzing the C receiver (ext/receiver.c) over real TCP on 127.0.0.1.

Hypothesis builds byte streams out of valid frames, garbage, truncated
frames, frames with a bad CRC, headers with oversize lengths or bad flags
(correctly CRC'd, so only the bound checks can refuse them), writes past the
end of the disk and frame types the primary never sends (acks). Each stream
goes to a fresh Receiver on a disk image holding a known pattern; the test
then closes its sending side, waits for the receiver to drop the connection
and stops it.

The disk must then hold the pattern with exactly the frames that parse and
apply cleanly *before the first bad byte* written to it (a model computed
with parse_frame): nothing from a bad frame, nor from anything after it,
ever reaches the disk. The acks that came back must be a prefix of the acks
for those frames (all of them when the stream had no bad byte), and the
stats must say why the receiver stopped.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mirrord.errors import FrameError
from mirrord.replication import native as n
from mirrord.replication.native import Receiver
from under_ci import skip_or_fail

pytestmark = pytest.mark.lab

SIZE = 4 << 20
MAX_PAYLOAD = 16 << 10
# Every 8-byte word holds its own offset: any misplaced or stray write shows.
PATTERN = array("Q", range(0, SIZE, 8)).tobytes()
HEADER = struct.Struct("<IHHQQII")
ACK_FOR = {n.WRITE: n.WRITE_ACK, n.SYNC_DATA: n.SYNC_ACK, n.SYNC_ZERO: n.SYNC_ACK, n.FLUSH: n.FLUSH_ACK,
           n.PING: n.PONG}
DATA_TYPES = (n.WRITE, n.SYNC_DATA)
WAIT = 10.0


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        message = "the receiver fuzz test runs with the lab tests, as root"
        skip_or_fail(message)
    path = tmp_path_factory.mktemp("fuzz-receiver") / "replica.img"
    path.write_bytes(PATTERN)
    return path


# ---- stream pieces --------------------------------------------------------

@dataclass
class Piece:
    raw: bytes
    good: bool  # applies cleanly on its own (a valid frame the receiver accepts, in range)
    what: str = ""


def _payload(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def _header(typ: int, flags: int, seq: int, offset: int, length: int, payload: bytes = b"") -> bytes:
    """A header with a correct CRC for whatever fields it has (even invalid ones)."""
    raw = HEADER.pack(n.MAGIC, typ, flags, seq, offset, length, 0)
    return HEADER.pack(n.MAGIC, typ, flags, seq, offset, length, n.crc32c(payload, n.crc32c(raw)))


U64 = st.integers(0, 2**64 - 1)
lengths = st.one_of(st.integers(1, 64), st.integers(1, MAX_PAYLOAD), st.sampled_from([4096, MAX_PAYLOAD]))


@st.composite
def data_frame(draw: st.DrawFn) -> tuple[int, int, int, int, bytes]:
    length = draw(lengths)
    offset = draw(st.one_of(st.integers(0, SIZE - length), st.sampled_from([0, SIZE - length])))
    typ = draw(st.sampled_from(DATA_TYPES))
    flags = draw(st.sampled_from([0, n.F_SYNC]))
    return typ, flags, draw(U64), offset, _payload(draw(st.integers(0, 2**32)), length)


@st.composite
def pieces(draw: st.DrawFn) -> Piece:
    kind = draw(st.sampled_from(["write", "write", "write", "zero", "verify", "flush", "ping", "past_end",
                                 "zero_past_end", "zero_bad_length", "ack", "bad_crc", "truncated", "garbage",
                                 "oversize", "bad_header"]))
    seq = draw(U64)
    if kind == "write":
        typ, flags, seq, off, payload = draw(data_frame())
        return Piece(n.encode_frame(typ, seq, off, payload, flags), True, kind)
    if kind == "zero":
        length = draw(lengths)
        off = draw(st.one_of(st.integers(0, SIZE - length), st.sampled_from([0, SIZE - length])))
        return Piece(n.encode_frame(n.SYNC_ZERO, seq, off, n.zero_payload(length)), True, kind)
    if kind == "verify":
        # The CRC of the range as the disk starts: SAME unless an earlier frame changed it.
        length = draw(lengths)
        off = draw(st.one_of(st.integers(0, SIZE - length), st.sampled_from([0, SIZE - length])))
        crc = n.crc32c(PATTERN[off:off + length]) if draw(st.booleans()) else draw(st.integers(0, 2**32 - 1))
        return Piece(n.encode_frame(n.VERIFY, seq, off, n.verify_payload(length, crc)), True, kind)
    if kind == "zero_past_end":
        length = draw(st.integers(1, 4096))
        off = draw(st.one_of(st.integers(SIZE - length + 1, SIZE + 4096), st.sampled_from([SIZE, 2**64 - 1])))
        return Piece(n.encode_frame(n.SYNC_ZERO, seq, off, n.zero_payload(length)), False, kind)
    if kind == "zero_bad_length":
        # 0 or more than one chunk, with a correct CRC: refused, nothing zeroed.
        length = draw(st.one_of(st.just(0), st.integers(n.MAX_PAYLOAD + 1, 2**64 - 1)))
        payload = struct.pack("<Q", length)
        return Piece(_header(n.SYNC_ZERO, 0, seq, 0, len(payload), payload) + payload, False, kind)
    if kind == "flush":
        return Piece(n.encode_frame(n.FLUSH, seq, draw(U64)), True, kind)
    if kind == "ping":
        return Piece(n.encode_frame(n.PING, seq, draw(U64)), True, kind)
    if kind == "past_end":
        length = draw(st.integers(1, 4096))
        off = draw(st.one_of(st.integers(SIZE - length + 1, SIZE + 4096),
                             st.sampled_from([SIZE, 2**63, 2**64 - 1, 2**64 - length])))
        typ = draw(st.sampled_from(DATA_TYPES))
        return Piece(n.encode_frame(typ, seq, off, _payload(seq, length)), False, kind)
    if kind == "ack":
        typ = draw(st.sampled_from([n.WRITE_ACK, n.FLUSH_ACK, n.SYNC_ACK, n.PONG, n.VERIFY_SAME, n.VERIFY_DIFF]))
        return Piece(n.encode_frame(typ, seq, draw(U64)), False, kind)
    if kind == "bad_crc":
        typ, flags, seq, off, payload = draw(data_frame())
        raw = bytearray(n.encode_frame(typ, seq, off, payload, flags))
        # One flipped bit in the CRC field or the payload (never in the
        # header's checked fields, which would be refused before the CRC).
        bit = draw(st.one_of(st.integers(28 * 8, 32 * 8 - 1), st.integers(32 * 8, len(raw) * 8 - 1)))
        raw[bit // 8] ^= 1 << (bit % 8)
        return Piece(bytes(raw), False, kind)
    if kind == "truncated":
        typ, flags, seq, off, payload = draw(data_frame())
        raw = n.encode_frame(typ, seq, off, payload, flags)
        return Piece(raw[: draw(st.integers(1, len(raw) - 1))], False, kind)
    if kind == "garbage":
        return Piece(draw(st.binary(min_size=1, max_size=64)), False, kind)
    if kind == "oversize":
        length = draw(st.one_of(st.integers(n.MAX_PAYLOAD + 1, 2**32 - 1),
                                st.sampled_from([n.MAX_PAYLOAD + 1, 2**32 - 1])))
        typ = draw(st.sampled_from(DATA_TYPES))
        return Piece(_header(typ, 0, seq, draw(st.integers(0, SIZE)), length), False, kind)
    # bad_header: type, flags or length the type does not allow, CRC right.
    typ = draw(st.one_of(st.sampled_from(sorted(n.FRAME_TYPES)), st.integers(0, 2**16 - 1)))
    flags = draw(st.one_of(st.sampled_from([0, n.F_SYNC]), st.integers(0, 2**16 - 1)))
    length = draw(st.integers(0, 64))
    payload = _payload(seq, length)
    ok_type = typ in n.FRAME_TYPES
    ok_flags = flags == 0 or (typ in DATA_TYPES and flags == n.F_SYNC)
    fixed = {n.SYNC_ZERO: n.ZERO_PAYLOAD, n.VERIFY: n.VERIFY_PAYLOAD}
    ok_len = (length > 0) if typ in DATA_TYPES else length == fixed.get(typ, 0)
    if ok_type and ok_flags and ok_len:
        flags |= 0x8000  # make sure something is wrong
    return Piece(_header(typ, flags, seq, 0, length, payload) + payload, False, kind)


# ---- model ----------------------------------------------------------------

@dataclass
class Expected:
    image: bytearray
    applied: list[n.FrameHeader] = field(default_factory=list)
    stop: str = "eof"  # eof | frame | range | proto
    code: int = 0  # the receiver's error_code when it stopped
    zeroed: int = 0  # bytes SYNC_ZERO frames made zero
    answers: list[int] = field(default_factory=list)  # the ack type each applied frame must get


def model(stream: bytes) -> Expected:
    """What the receiver must do with stream: apply frames until the first bad byte."""
    exp = Expected(bytearray(PATTERN), code=-errno.ECONNRESET)
    pos = 0
    while pos < len(stream):
        try:
            h, payload, used = n.parse_frame(stream[pos:])
        except FrameError as exc:
            exp.stop = "frame"
            code = exc.code  # type: ignore[attr-defined]
            exp.code = -errno.ECONNRESET if code == n.E_TRUNC else code  # a cut frame is just EOF
            return exp
        if h.type in DATA_TYPES:
            if h.offset > SIZE or h.length > SIZE - h.offset:
                exp.stop, exp.code = "range", n.E_RANGE
                return exp
            exp.image[h.offset:h.offset + h.length] = payload
        elif h.type == n.SYNC_ZERO:
            (length,) = struct.unpack("<Q", payload)
            if h.offset > SIZE or length > SIZE - h.offset:
                exp.stop, exp.code = "range", n.E_RANGE
                return exp
            exp.image[h.offset:h.offset + length] = bytes(length)
            exp.zeroed += length
        elif h.type == n.VERIFY:
            length, crc = struct.unpack("<QI", payload)
            if h.offset > SIZE or length > SIZE - h.offset:
                exp.stop, exp.code = "range", n.E_RANGE
                return exp
            same = n.crc32c(bytes(exp.image[h.offset:h.offset + length])) == crc
            exp.answers.append(n.VERIFY_SAME if same else n.VERIFY_DIFF)
            exp.applied.append(h)
            pos += used
            continue
        elif h.type not in ACK_FOR:
            exp.stop, exp.code = "proto", n.E_PROTO
            return exp
        exp.answers.append(ACK_FOR[h.type])
        exp.applied.append(h)
        pos += used
    return exp


# ---- the run --------------------------------------------------------------

def _connect() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=WAIT)
        server, _ = listener.accept()
    return client, server


def _restore(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, PATTERN, 0) == SIZE
    finally:
        os.close(fd)


def _first_difference(a: bytes, b: bytes) -> str:
    i = next(i for i in range(len(a)) if a[i] != b[i])
    return f"first difference at byte {i} (block {i // 4096}): got {a[i:i + 16].hex()} want {b[i:i + 16].hex()}"


def run_stream(disk: Path, stream: bytes) -> tuple[n.ReceiverStats, bytes]:
    """Send stream to a fresh receiver, then EOF; return its final stats and every byte it sent back."""
    client, server = _connect()
    receiver: Receiver | None = None
    sender: threading.Thread | None = None
    try:
        receiver = Receiver(str(disk), SIZE, server.detach())

        def send() -> None:
            try:
                client.sendall(stream)
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the receiver already dropped the connection: expected for a bad stream

        sender = threading.Thread(target=send, name="fuzz-sender", daemon=True)
        sender.start()
        back = bytearray()
        client.settimeout(WAIT)
        while True:  # until the receiver shuts the connection down
            try:
                chunk = client.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            back += chunk
        sender.join(WAIT)
        assert not sender.is_alive(), "sending the stream never finished"
        end = time.monotonic() + WAIT
        while receiver.stats().connected:
            assert time.monotonic() < end, "the receiver did not notice the end of the stream"
            time.sleep(0.005)
        stats = receiver.stats()
        return stats, bytes(back)
    finally:
        if receiver is not None:
            receiver.stop()
            receiver.close()
        else:
            server.close()
        client.close()
        if sender is not None:
            sender.join(WAIT)


def check(disk: Path, stream: bytes, intended: int, events: bool = True) -> None:
    exp = model(stream)
    # The generator knows how many clean frames lead the stream; the model
    # (built on parse_frame) must agree, or the oracle itself is wrong.
    assert len(exp.applied) == intended, (len(exp.applied), intended)
    if events:  # --hypothesis-show-statistics
        event(f"stops on: {exp.stop} ({n.strerror(exp.code)})")
        event(f"frames applied: {min(len(exp.applied), 3)}{'+' if len(exp.applied) > 3 else ''}")
    try:
        stats, back = run_stream(disk, stream)
        image = disk.read_bytes()
    finally:
        _restore(disk)
    assert image == exp.image, _first_difference(image, exp.image)
    assert stats.frames == len(exp.applied), stats
    assert stats.bytes_applied == sum(h.length for h in exp.applied if h.type in DATA_TYPES), stats
    assert stats.verify_diffs == exp.answers.count(n.VERIFY_DIFF), stats
    assert stats.bytes_zeroed == exp.zeroed, stats
    assert stats.writes == sum(h.type == n.WRITE for h in exp.applied), stats
    assert stats.syncs == sum(h.type in (n.SYNC_DATA, n.SYNC_ZERO) for h in exp.applied), stats
    assert stats.flushes == sum(h.type == n.FLUSH for h in exp.applied), stats
    assert stats.durable_writes == sum(h.sync for h in exp.applied), stats
    assert stats.crc_errors == (1 if exp.code == n.E_CRC else 0), stats
    assert stats.error_code == exp.code, (stats, exp.stop)
    assert not stats.connected
    # Acks: whole frames, each echoing one applied frame, in order; all of
    # them when nothing was wrong with the stream (lost ones are only allowed
    # with the connection that failed). The one exception to the order: a
    # FLUSH is answered on a thread of its own, so acks of frames behind it
    # may overtake its FLUSH_ACK, never those of frames before it.
    assert len(back) % n.HEADER_SIZE == 0, len(back)
    acks = []
    for i in range(0, len(back), n.HEADER_SIZE):
        h, _, _ = n.parse_frame(back[i:i + n.HEADER_SIZE])
        acks.append((h.type, h.seq, h.offset, h.length))
    want = [(answer, h.seq, h.offset, 0) for h, answer in zip(exp.applied, exp.answers)]
    for flushes in (True, False):
        got = [a for a in acks if (a[0] == n.FLUSH_ACK) == flushes]
        expected = [w for w in want if (w[0] == n.FLUSH_ACK) == flushes]
        assert got == expected[: len(got)], (acks, want)
    for i, ack in enumerate(acks):
        if ack[0] == n.FLUSH_ACK:
            before = {w for w in want[: want.index(ack)] if w[0] != n.FLUSH_ACK}
            assert before <= set(acks[:i]), (acks, want)
    if exp.stop == "eof":
        assert sorted(acks) == sorted(want)
    assert stats.acks_sent >= len(acks)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, int]:
    # A run of clean frames, then anything: most streams get past a few frames.
    ps: list[Piece] = draw(st.lists(pieces().filter(lambda p: p.good), max_size=6))
    ps += draw(st.lists(pieces(), min_size=0 if ps else 1, max_size=8 - len(ps)))
    intended = 0
    for p in ps:
        if not p.good:
            break
        intended += 1
    return b"".join(p.raw for p in ps), intended


@st.composite
def valid_then_bad(draw: st.DrawFn) -> tuple[bytes, int]:
    """The common shape spelled out: clean frames, then exactly one bad piece, then more frames."""
    good = draw(st.lists(pieces().filter(lambda p: p.good), max_size=5))
    bad = draw(pieces().filter(lambda p: not p.good))
    tail = draw(st.lists(pieces().filter(lambda p: p.good), max_size=2))
    return b"".join(p.raw for p in [*good, bad, *tail]), len(good)


FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@FUZZ
@given(case=streams())
def test_receiver_applies_exactly_the_clean_prefix(disk: Path, case: tuple[bytes, int]) -> None:
    check(disk, *case)


@FUZZ
@given(case=valid_then_bad())
def test_nothing_from_a_bad_frame_or_after_it_reaches_the_disk(disk: Path, case: tuple[bytes, int]) -> None:
    check(disk, *case)


def test_a_clean_stream_is_applied_and_acked_in_full(disk: Path) -> None:
    frames = [n.encode_frame(n.WRITE, 1, 0, b"\xaa" * 4096),
              n.encode_frame(n.SYNC_DATA, 2, SIZE - 512, b"\xbb" * 512, n.F_SYNC),
              n.encode_frame(n.FLUSH, 3),
              n.encode_frame(n.PING, 4)]
    check(disk, b"".join(frames), 4, events=False)


@st.composite
def mixed_size_frames(draw: st.DrawFn) -> tuple[bytes, int]:
    """Clean frames, some larger than the receiver's 256 KiB input buffer (up
    to the 1 MiB maximum), between small ones: frames cut at the buffer's end,
    and large ones gathered from the buffer plus the socket."""
    big = st.integers(200 << 10, n.MAX_PAYLOAD)
    frames = []
    for seq in range(draw(st.integers(1, 8))):
        length = draw(st.one_of(st.integers(1, 64), st.just(4096), big))
        off = draw(st.integers(0, SIZE - length))
        typ = draw(st.sampled_from(DATA_TYPES))
        flags = draw(st.sampled_from([0, n.F_SYNC]))
        frames.append(n.encode_frame(typ, seq, off, _payload(draw(st.integers(0, 2**32)), length), flags))
    return b"".join(frames), len(frames)


@settings(FUZZ, max_examples=25)
@given(case=mixed_size_frames())
def test_frames_larger_than_the_input_buffer_apply_in_order(disk: Path, case: tuple[bytes, int]) -> None:
    check(disk, *case)
