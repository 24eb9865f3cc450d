"""Replication frames: layout, encode/decode/verify/parse and every rejection."""

from __future__ import annotations

import struct

import pytest

from mirrord.errors import FrameError, NativeError
from mirrord.replication import native as n

ALL_TYPES = [n.WRITE, n.WRITE_ACK, n.FLUSH, n.FLUSH_ACK, n.SYNC_DATA, n.SYNC_ACK, n.PING, n.PONG, n.SYNC_ZERO,
             n.VERIFY, n.VERIFY_SAME, n.VERIFY_DIFF]
PAYLOAD_TYPES = [n.WRITE, n.SYNC_DATA]  # data frames: any payload length, may carry F_SYNC
RANGE_TYPES = [n.SYNC_ZERO, n.VERIFY]  # a fixed payload naming a range
EMPTY_TYPES = [t for t in ALL_TYPES if t not in PAYLOAD_TYPES and t not in RANGE_TYPES]


def default_payload(t: int) -> bytes:
    if t == n.SYNC_ZERO:
        return n.zero_payload(64 * 1024)
    if t == n.VERIFY:
        return n.verify_payload(64 * 1024, 0x12345678)
    return b"data" * 8 if t in PAYLOAD_TYPES else b""


def frame(t: int, seq: int = 7, offset: int = 4096, payload: bytes | None = None) -> bytes:
    return n.encode_frame(t, seq, offset, default_payload(t) if payload is None else payload)


def test_header_layout_is_little_endian_32_bytes() -> None:
    raw = n.encode_frame(n.WRITE, 0x0102030405060708, 0x1122334455667788, b"abc")
    magic, typ, flags, seq, off, length, crc = struct.unpack("<IHHQQII", raw[:32])
    assert raw[:4] == b"MRD1" and magic == n.MAGIC
    assert (typ, flags, seq, off, length) == (n.WRITE, 0, 0x0102030405060708, 0x1122334455667788, 3)
    assert raw[32:] == b"abc"
    # The CRC covers the header with crc=0, then the payload.
    assert crc == n.crc32c(b"abc", n.crc32c(raw[:28] + b"\0\0\0\0"))


@pytest.mark.parametrize("t", ALL_TYPES)
def test_every_type_round_trips(t: int) -> None:
    raw = frame(t)
    h = n.decode_header(raw[:32])
    assert h.type == t and h.seq == 7 and h.offset == 4096 and h.length == len(raw) - 32
    assert n.verify_frame(raw[:32], raw[32:]) == h
    parsed, payload, used = n.parse_frame(raw + b"trailing")
    assert parsed == h and payload == raw[32:] and used == len(raw)
    assert h.type_name == n.FRAME_TYPES[t]


@pytest.mark.parametrize("length", [1, 4095, 4096, n.MAX_PAYLOAD])
def test_payload_sizes_accepted(length: int) -> None:
    payload = bytes([length % 251]) * length
    raw = n.encode_frame(n.SYNC_DATA, 1, 0, payload)
    h, got, used = n.parse_frame(raw)
    assert h.length == length and got == payload and used == 32 + length


@pytest.mark.parametrize("cut", [0, 1, 16, 31])
def test_truncated_header(cut: int) -> None:
    with pytest.raises(FrameError) as ei:
        n.decode_header(frame(n.WRITE)[:cut])
    assert ei.value.code == n.E_TRUNC  # type: ignore[attr-defined]


@pytest.mark.parametrize("missing", [1, 5, 32])
def test_truncated_payload(missing: int) -> None:
    raw = frame(n.WRITE)
    with pytest.raises(FrameError) as ei:
        n.parse_frame(raw[:-missing])
    assert ei.value.code == n.E_TRUNC  # type: ignore[attr-defined]
    with pytest.raises(FrameError):
        n.verify_frame(raw[:32], raw[32:-missing])


@pytest.mark.parametrize("magic", [b"MRD0", b"1DRM", b"\0\0\0\0", b"mrd1"])
def test_bad_magic(magic: bytes) -> None:
    raw = magic + frame(n.PING)[4:]
    with pytest.raises(FrameError) as ei:
        n.decode_header(raw)
    assert ei.value.code == n.E_MAGIC  # type: ignore[attr-defined]


def _patch(raw: bytes, fmt: str, at: int, value: int) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


@pytest.mark.parametrize("t", [0, 13, 100, 0xFFFF])
def test_unknown_type(t: int) -> None:
    with pytest.raises(FrameError) as ei:
        n.decode_header(_patch(frame(n.PING), "<H", 4, t))
    assert ei.value.code == n.E_TYPE  # type: ignore[attr-defined]
    with pytest.raises(FrameError):
        n.encode_frame(t, 1)


@pytest.mark.parametrize("flags", [1, 2, 0x8000])
def test_reserved_flags(flags: int) -> None:
    with pytest.raises(FrameError) as ei:
        n.decode_header(_patch(frame(n.PING), "<H", 6, flags))
    assert ei.value.code == n.E_FLAGS  # type: ignore[attr-defined]
    with pytest.raises(FrameError):
        n.encode_frame(n.PING, 1, flags=flags)


# ---- MRD_FRAME_F_SYNC: allowed on WRITE/SYNC_DATA only -----------------------

def test_sync_flag_value_and_layout() -> None:
    assert n.F_SYNC == 1
    raw = n.encode_frame(n.WRITE, 3, 8192, b"abcd", flags=n.F_SYNC)
    _, _, flags, _, _, _, crc = struct.unpack("<IHHQQII", raw[:32])
    assert flags == n.F_SYNC
    assert crc == n.crc32c(b"abcd", n.crc32c(raw[:28] + b"\0\0\0\0"))


@pytest.mark.parametrize("t", PAYLOAD_TYPES)
@pytest.mark.parametrize("length", [1, 4096, n.MAX_PAYLOAD])
def test_sync_flag_round_trips_on_data_frames(t: int, length: int) -> None:
    payload = bytes([length % 251]) * length
    raw = n.encode_frame(t, 9, 4096, payload, flags=n.F_SYNC)
    h = n.decode_header(raw[:32])
    assert h.flags == n.F_SYNC and h.sync and h.type == t and h.length == length
    assert n.verify_frame(raw[:32], raw[32:]) == h
    parsed, got, used = n.parse_frame(raw)
    assert parsed == h and got == payload and used == 32 + length


@pytest.mark.parametrize("t", ALL_TYPES)
def test_unflagged_frames_are_not_sync(t: int) -> None:
    h = n.decode_header(frame(t)[:32])
    assert h.flags == 0 and not h.sync


@pytest.mark.parametrize("t", [*EMPTY_TYPES, *RANGE_TYPES])
def test_sync_flag_refused_on_control_frames(t: int) -> None:
    with pytest.raises(FrameError) as ei:
        n.encode_frame(t, 1, payload=default_payload(t), flags=n.F_SYNC)
    assert ei.value.code == n.E_FLAGS  # type: ignore[attr-defined]
    with pytest.raises(FrameError) as ei:
        n.decode_header(_patch(frame(t), "<H", 6, n.F_SYNC))
    assert ei.value.code == n.E_FLAGS  # type: ignore[attr-defined]
    with pytest.raises(FrameError) as ei:
        n.parse_frame(_patch(frame(t), "<H", 6, n.F_SYNC))
    assert ei.value.code == n.E_FLAGS  # type: ignore[attr-defined]


@pytest.mark.parametrize("t", PAYLOAD_TYPES)
@pytest.mark.parametrize("flags", [0x2, 0x4, 0x100, 0x8000, 0xFFFF, n.F_SYNC | 0x2, n.F_SYNC | 0x8000])
def test_unknown_flag_bits_refused_on_data_frames(t: int, flags: int) -> None:
    with pytest.raises(FrameError) as ei:
        n.encode_frame(t, 1, 0, b"x", flags=flags)
    assert ei.value.code == n.E_FLAGS  # type: ignore[attr-defined]
    with pytest.raises(FrameError) as ei:
        n.decode_header(_patch(frame(t), "<H", 6, flags))
    assert ei.value.code == n.E_FLAGS  # type: ignore[attr-defined]


@pytest.mark.parametrize("t", PAYLOAD_TYPES)
def test_sync_flag_is_covered_by_the_crc(t: int) -> None:
    # Setting or clearing the flag in transit yields a valid header whose CRC
    # no longer matches: never a silently changed durability request.
    for flags, patched in [(0, n.F_SYNC), (n.F_SYNC, 0)]:
        raw = n.encode_frame(t, 5, 0, b"payload!", flags=flags)
        bad = _patch(raw, "<H", 6, patched)
        assert n.decode_header(bad[:32]).flags == patched
        with pytest.raises(FrameError) as ei:
            n.parse_frame(bad)
        assert ei.value.code == n.E_CRC  # type: ignore[attr-defined]


@pytest.mark.parametrize("t", PAYLOAD_TYPES)
def test_sync_flag_does_not_relax_length_checks(t: int) -> None:
    with pytest.raises(FrameError) as ei:
        n.encode_frame(t, 1, 0, b"", flags=n.F_SYNC)
    assert ei.value.code == n.E_LEN  # type: ignore[attr-defined]
    raw = n.encode_frame(t, 1, 0, b"abc", flags=n.F_SYNC)
    with pytest.raises(FrameError) as ei:
        n.decode_header(_patch(raw, "<I", 24, n.MAX_PAYLOAD + 1))
    assert ei.value.code == n.E_LEN  # type: ignore[attr-defined]


def test_flagged_and_unflagged_frames_stream_in_order() -> None:
    frames = [n.encode_frame(t, i, 4096 * i, b"d" * 16 if t in PAYLOAD_TYPES else default_payload(t),
                             flags=n.F_SYNC if t in PAYLOAD_TYPES and i % 2 else 0)
              for i, t in enumerate(ALL_TYPES * 2)]
    stream = b"".join(frames)
    got = []
    while stream:
        h, _, used = n.parse_frame(stream)
        got.append((h.seq, h.sync))
        stream = stream[used:]
    assert got == [(i, t in PAYLOAD_TYPES and i % 2 == 1) for i, t in enumerate(ALL_TYPES * 2)]


@pytest.mark.parametrize("length", [n.MAX_PAYLOAD + 1, 1 << 30, 0xFFFFFFFF])
def test_oversize_length(length: int) -> None:
    with pytest.raises(FrameError) as ei:
        n.decode_header(_patch(frame(n.WRITE), "<I", 24, length))
    assert ei.value.code == n.E_LEN  # type: ignore[attr-defined]


def test_encode_refuses_oversize_payload() -> None:
    with pytest.raises(FrameError) as ei:
        n.encode_frame(n.WRITE, 1, 0, bytes(n.MAX_PAYLOAD + 1))
    assert ei.value.code == n.E_LEN  # type: ignore[attr-defined]


@pytest.mark.parametrize("t", PAYLOAD_TYPES)
def test_data_frames_need_payload(t: int) -> None:
    with pytest.raises(FrameError):
        n.encode_frame(t, 1, 0, b"")
    with pytest.raises(FrameError):
        n.decode_header(_patch(frame(t), "<I", 24, 0))


@pytest.mark.parametrize("t", EMPTY_TYPES)
def test_control_frames_carry_no_payload(t: int) -> None:
    with pytest.raises(FrameError):
        n.encode_frame(t, 1, 0, b"x")
    with pytest.raises(FrameError) as ei:
        n.decode_header(_patch(frame(t), "<I", 24, 4))
    assert ei.value.code == n.E_LEN  # type: ignore[attr-defined]


@pytest.mark.parametrize("t", ALL_TYPES)
@pytest.mark.parametrize("field_at", [8, 16, 28])  # seq, offset, crc
def test_header_bit_flip_fails_crc(t: int, field_at: int) -> None:
    raw = bytearray(frame(t))
    raw[field_at] ^= 0x01
    with pytest.raises(FrameError) as ei:
        n.parse_frame(bytes(raw))
    assert ei.value.code == n.E_CRC  # type: ignore[attr-defined]


@pytest.mark.parametrize("pos", [0, 1, 15, 31])
def test_payload_bit_flip_fails_crc(pos: int) -> None:
    raw = bytearray(frame(n.WRITE))
    raw[32 + pos] ^= 0x80
    with pytest.raises(FrameError) as ei:
        n.verify_frame(bytes(raw[:32]), bytes(raw[32:]))
    assert ei.value.code == n.E_CRC  # type: ignore[attr-defined]
    assert "CRC" in str(ei.value)


def test_stream_of_frames_parses_in_order() -> None:
    frames = [frame(t, seq=i) for i, t in enumerate(ALL_TYPES * 3)]
    stream = b"".join(frames)
    seqs = []
    while stream:
        h, _, used = n.parse_frame(stream)
        seqs.append(h.seq)
        stream = stream[used:]
    assert seqs == list(range(len(frames)))


def test_errors_are_typed_and_carry_codes() -> None:
    with pytest.raises(NativeError) as ei:
        n.decode_header(b"")
    assert isinstance(ei.value, FrameError)
    assert ei.value.errno is None  # type: ignore[attr-defined]
    assert n.strerror(-2) == "No such file or directory"
    assert n.strerror(n.E_CRC) == "frame CRC32C mismatch"


# ---- SYNC_ZERO: a hole on the source, an 8-byte range length as payload -----

@pytest.mark.parametrize("length", [1, 4096, n.MAX_PAYLOAD])
def test_sync_zero_round_trips(length: int) -> None:
    raw = n.encode_frame(n.SYNC_ZERO, 11, 1 << 20, n.zero_payload(length))
    h, payload, used = n.parse_frame(raw)
    assert h.type == n.SYNC_ZERO and h.length == n.ZERO_PAYLOAD == 8 and used == 40
    assert struct.unpack("<Q", payload) == (length,)
    assert h.type_name == "SYNC_ZERO"


@pytest.mark.parametrize("t", RANGE_TYPES)
@pytest.mark.parametrize("length", [0, n.MAX_PAYLOAD + 1, 1 << 40, 2**64 - 1])
def test_range_out_of_bounds(t: int, length: int) -> None:
    payload = struct.pack("<Q", length) + (b"\0" * 4 if t == n.VERIFY else b"")
    with pytest.raises(FrameError) as ei:
        n.encode_frame(t, 1, 0, payload)
    assert ei.value.code == n.E_LEN  # type: ignore[attr-defined]
    # The same frame built by hand with a correct CRC: refused on verify/parse.
    header = struct.pack("<IHHQQII", n.MAGIC, t, 0, 1, 0, len(payload), 0)
    crc = n.crc32c(payload, n.crc32c(header))
    raw = header[:28] + struct.pack("<I", crc) + payload
    for check in (lambda: n.parse_frame(raw), lambda: n.verify_frame(raw[:32], payload)):
        with pytest.raises(FrameError) as ei:
            check()
        assert ei.value.code == n.E_LEN  # type: ignore[attr-defined]


@pytest.mark.parametrize(("t", "size"), [(t, size) for t in RANGE_TYPES for size in (0, 1, 7, 9, 11, 13, 16, 4096)
                                           if size != len(default_payload(t))])
def test_range_payload_has_a_fixed_size(t: int, size: int) -> None:
    with pytest.raises(FrameError) as ei:
        n.encode_frame(t, 1, 0, b"\1" * size)
    assert ei.value.code == n.E_LEN  # type: ignore[attr-defined]
    with pytest.raises(FrameError) as ei:
        n.decode_header(_patch(frame(t), "<I", 24, size))
    assert ei.value.code == n.E_LEN  # type: ignore[attr-defined]


# ---- VERIFY: a range and the primary's CRC32C of it; answered SAME or DIFF ---

def test_verify_round_trips_and_carries_length_and_crc() -> None:
    raw = n.encode_frame(n.VERIFY, 12, 3 << 20, n.verify_payload(n.MAX_PAYLOAD, 0xDEADBEEF))
    h, payload, used = n.parse_frame(raw)
    assert h.type == n.VERIFY and h.length == n.VERIFY_PAYLOAD == 12 and used == 44
    assert struct.unpack("<QI", payload) == (n.MAX_PAYLOAD, 0xDEADBEEF)


@pytest.mark.parametrize("t", [n.VERIFY_SAME, n.VERIFY_DIFF])
def test_verify_answers_are_header_only(t: int) -> None:
    with pytest.raises(FrameError) as ei:
        n.encode_frame(t, 1, 0, b"x")
    assert ei.value.code == n.E_LEN  # type: ignore[attr-defined]
    assert n.parse_frame(frame(t))[2] == 32
