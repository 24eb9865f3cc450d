"""Fuzzing the frame codec (ext/frame.c through mirrord.replication.native).

Whatever bytes arrive, decode_header / verify_frame / parse_frame either
return a header that passes every documented bound, or raise FrameError
(with one of the frame codes) -- never any other exception, never a crash.
Frames built from arbitrary fields round-trip, and any single flipped bit in
an encoded frame is refused.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from mirrord.errors import FrameError
from mirrord.replication import native as n

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALL_TYPES = sorted(n.FRAME_TYPES)
PAYLOAD_TYPES = (n.WRITE, n.SYNC_DATA)
FRAME_CODES = {n.E_TRUNC, n.E_MAGIC, n.E_TYPE, n.E_LEN, n.E_CRC, n.E_FLAGS}
HEADER = struct.Struct("<IHHQQII")
U64 = st.integers(0, 2**64 - 1)
MAGIC = struct.pack("<I", n.MAGIC)


def check_header(h: n.FrameHeader) -> None:
    """Every bound a decoded header must satisfy (ext/frame.h)."""
    assert h.magic == n.MAGIC
    assert h.type in n.FRAME_TYPES
    if h.type in PAYLOAD_TYPES:
        assert 0 < h.length <= n.MAX_PAYLOAD
        assert h.flags & ~n.F_SYNC == 0
    elif h.type == n.SYNC_ZERO:
        assert h.length == n.ZERO_PAYLOAD and h.flags == 0
    elif h.type == n.VERIFY:
        assert h.length == n.VERIFY_PAYLOAD and h.flags == 0
    else:
        assert h.length == 0 and h.flags == 0


def check_frame_error(exc: FrameError) -> None:
    assert getattr(exc, "code", None) in FRAME_CODES, exc


# Raw headers: pure noise, the right magic followed by noise, and headers
# packed from arbitrary field values (so type/flags/length checks are reached).
noise = st.binary(max_size=96)
magic_then_noise = st.binary(max_size=96).map(lambda b: MAGIC + b)
packed_header = st.builds(
    lambda magic, typ, flags, seq, off, length, crc: HEADER.pack(magic, typ, flags, seq, off, length, crc),
    st.one_of(st.just(n.MAGIC), st.integers(0, 2**32 - 1)),
    st.one_of(st.sampled_from(ALL_TYPES), st.integers(0, 2**16 - 1)),
    st.one_of(st.sampled_from([0, n.F_SYNC]), st.integers(0, 2**16 - 1)),
    U64,
    U64,
    st.one_of(st.integers(0, 64), st.sampled_from([n.MAX_PAYLOAD, n.MAX_PAYLOAD + 1]), st.integers(0, 2**32 - 1)),
    st.integers(0, 2**32 - 1),
)
raw_headers = st.one_of(noise, magic_then_noise, packed_header)


@FUZZ
@given(raw=raw_headers)
@example(raw=b"")
@example(raw=MAGIC)
def test_decode_header_accepts_or_raises_frame_error(raw: bytes) -> None:
    try:
        h = n.decode_header(raw)
    except FrameError as exc:
        check_frame_error(exc)
        return
    check_header(h)
    assert len(raw) >= n.HEADER_SIZE
    magic, typ, flags, seq, off, length, crc = HEADER.unpack(raw[: n.HEADER_SIZE])
    assert (h.magic, h.type, h.flags, h.seq, h.offset, h.length, h.crc) == (magic, typ, flags, seq, off, length, crc)


@FUZZ
@given(raw=raw_headers, payload=st.binary(max_size=80))
def test_verify_frame_accepts_or_raises_frame_error(raw: bytes, payload: bytes) -> None:
    try:
        h = n.verify_frame(raw, payload)
    except FrameError as exc:
        check_frame_error(exc)
        return
    check_header(h)
    assert h.length == len(payload)
    # Accepted means the CRC really matches: re-encoding gives the same header.
    assert n.encode_frame(h.type, h.seq, h.offset, payload, h.flags) == raw[: n.HEADER_SIZE] + payload


@FUZZ
@given(buf=st.one_of(noise, magic_then_noise, st.tuples(packed_header, st.binary(max_size=80)).map(b"".join)))
def test_parse_frame_accepts_or_raises_frame_error(buf: bytes) -> None:
    try:
        h, payload, used = n.parse_frame(buf)
    except FrameError as exc:
        check_frame_error(exc)
        return
    check_header(h)
    if h.type in (n.SYNC_ZERO, n.VERIFY):  # parse checks the range length the payload carries
        assert 0 < struct.unpack("<Q", buf[n.HEADER_SIZE:n.HEADER_SIZE + 8])[0] <= n.MAX_PAYLOAD
    assert used == n.HEADER_SIZE + h.length <= len(buf)
    assert payload == buf[n.HEADER_SIZE:used]
    assert n.encode_frame(h.type, h.seq, h.offset, payload, h.flags) == buf[:used]


@st.composite
def valid_frames(draw: st.DrawFn, max_payload: int = 4096) -> tuple[int, int, int, int, bytes]:
    typ = draw(st.sampled_from(ALL_TYPES))
    if typ in PAYLOAD_TYPES:
        flags = draw(st.sampled_from([0, n.F_SYNC]))
        payload = draw(st.binary(min_size=1, max_size=max_payload))
    elif typ == n.SYNC_ZERO:
        flags, payload = 0, n.zero_payload(draw(st.integers(1, n.MAX_PAYLOAD)))
    elif typ == n.VERIFY:
        flags, payload = 0, n.verify_payload(draw(st.integers(1, n.MAX_PAYLOAD)), draw(st.integers(0, 2**32 - 1)))
    else:
        flags, payload = 0, b""
    return typ, flags, draw(U64), draw(U64), payload


@FUZZ
@given(frame=valid_frames(), trailing=st.binary(max_size=64))
def test_valid_frames_round_trip(frame: tuple[int, int, int, int, bytes], trailing: bytes) -> None:
    typ, flags, seq, off, payload = frame
    raw = n.encode_frame(typ, seq, off, payload, flags)
    assert len(raw) == n.HEADER_SIZE + len(payload)
    h = n.decode_header(raw[: n.HEADER_SIZE])
    assert (h.type, h.flags, h.seq, h.offset, h.length, h.magic) == (typ, flags, seq, off, len(payload), n.MAGIC)
    assert h.sync == bool(flags & n.F_SYNC)
    assert n.verify_frame(raw[: n.HEADER_SIZE], payload) == h
    parsed, got, used = n.parse_frame(raw + trailing)
    assert parsed == h and got == payload and used == len(raw)
    # A frame cut anywhere short of its end is "truncated", nothing else.
    for cut in {0, n.HEADER_SIZE - 1, len(raw) - 1} - {len(raw)}:
        if 0 <= cut < len(raw):
            try:
                n.parse_frame(raw[:cut])
            except FrameError as exc:
                assert exc.code == n.E_TRUNC  # type: ignore[attr-defined]
            else:
                raise AssertionError(f"parse_frame accepted a frame cut at {cut} of {len(raw)}")


@FUZZ
@given(typ=st.integers(0, 2**16 - 1), flags=st.integers(0, 2**16 - 1), seq=U64, off=U64,
       payload=st.binary(max_size=64))
def test_encode_refuses_with_frame_error_or_produces_a_parsable_frame(
        typ: int, flags: int, seq: int, off: int, payload: bytes) -> None:
    try:
        raw = n.encode_frame(typ, seq, off, payload, flags)
    except FrameError as exc:
        check_frame_error(exc)
        return
    h, got, used = n.parse_frame(raw)
    check_header(h)
    assert (h.type, h.flags, h.seq, h.offset, got, used) == (typ, flags, seq, off, payload, len(raw))


@FEW
@given(frame=valid_frames(max_payload=512), data=st.data())
def test_any_single_bit_flip_is_refused(frame: tuple[int, int, int, int, bytes], data: st.DataObject) -> None:
    typ, flags, seq, off, payload = frame
    raw = n.encode_frame(typ, seq, off, payload, flags)
    bit = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    bad = bytes(flipped)
    assume(bad != raw)
    # Whole frame, header + the (possibly flipped) payload, and the header
    # alone: each one must be refused with a frame error, never accepted.
    for call in (lambda: n.parse_frame(bad),
                 lambda: n.verify_frame(bad[: n.HEADER_SIZE], bad[n.HEADER_SIZE:])):
        try:
            call()
        except FrameError as exc:
            check_frame_error(exc)
        else:
            raise AssertionError(f"bit {bit} flipped in a {len(raw)}-byte {n.FRAME_TYPES[typ]} frame was accepted")
    if bit < n.HEADER_SIZE * 8 - 32:  # outside the CRC field
        try:
            h = n.decode_header(bad)
        except FrameError as exc:
            check_frame_error(exc)
        else:
            # decode does not look at the CRC: a flipped seq/offset may decode,
            # but never to the original header.
            check_header(h)
            assert h != n.decode_header(raw)
