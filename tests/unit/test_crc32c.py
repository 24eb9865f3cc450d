"""CRC32C: known vectors, chaining, and the hardware paths against the table path."""

from __future__ import annotations

import random

import pytest

from mirrord._native import lib
from mirrord.replication.native import crc32c

# Vectors from RFC 3720 (iSCSI) appendix B.4 and the usual check value.
VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (b"a", 0xC1D04330),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


@pytest.mark.parametrize("split", [0, 1, 4, 5, 8, 9])
def test_chaining_equals_one_shot(split: int) -> None:
    data = b"123456789"
    assert crc32c(data[split:], crc32c(data[:split])) == 0xE3069283


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 63, 64, 4095, 4096, 12287, 12288, 12289,
                                    24576, 65536 + 3, 1 << 20])
@pytest.mark.parametrize("misalign", [0, 1, 3, 7])
def test_hardware_paths_match_portable(length: int, misalign: int) -> None:
    rnd = random.Random(length * 8 + misalign)
    buf = rnd.randbytes(length + misalign)[misalign:]
    init = rnd.getrandbits(32)
    assert lib.mrd_crc32c(init, buf, len(buf)) == lib.mrd_crc32c_portable(init, buf, len(buf))


def test_random_lengths_and_chaining_match_portable() -> None:
    rnd = random.Random(1234)
    for _ in range(300):
        buf = rnd.randbytes(rnd.randrange(0, 50000))
        cut = rnd.randrange(0, len(buf) + 1)
        whole = lib.mrd_crc32c_portable(0, buf, len(buf))
        assert crc32c(buf) == whole
        assert crc32c(buf[cut:], crc32c(buf[:cut])) == whole


def test_accepts_any_buffer() -> None:
    assert crc32c(bytearray(b"123456789")) == 0xE3069283
    assert crc32c(memoryview(b"xx123456789")[2:]) == 0xE3069283
