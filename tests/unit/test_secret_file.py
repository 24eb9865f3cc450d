"""--secret-file: only a regular, readable file holding a real secret turns authentication on."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from mirrord import config
from mirrord.errors import BadInput


def test_a_secret_is_read_without_surrounding_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("  0123456789abcdef\n")
    assert config.read_secret(path) == b"0123456789abcdef"
    assert config.read_secret(None) is None


@pytest.mark.parametrize(("content", "fragment"), [
    ("", "holds 0 bytes of secret; at least 16"),
    (" \n\t\n", "holds 0 bytes of secret"),
    ("0123456789abcde\n", "holds 15 bytes of secret"),
])
def test_an_empty_or_short_secret_is_refused(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "secret"
    path.write_text(content)
    with pytest.raises(BadInput, match=fragment):
        config.read_secret(path)


def test_what_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="does not exist"):
        config.read_secret(tmp_path / "missing")
    with pytest.raises(BadInput, match="is not a regular file"):
        config.read_secret(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="is not a regular file"):  # and reading it never blocks
        config.read_secret(fifo)


def test_check_local_refuses_an_empty_secret_file(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    empty = tmp_path / "empty"
    empty.write_text("")
    settings = config.parse({"primary_ip": "198.18.0.11", "secondary_ip": "198.18.0.12",
                             "primary_sync_ip": "198.19.0.1", "secondary_sync_ip": "198.19.0.2",
                             "floating_ip": "198.18.0.10/24", "ping_interval": "1", "disk": str(disk),
                             "secret_file": str(empty)})
    with pytest.raises(BadInput, match=f"--secret-file {empty} holds 0 bytes"):
        config.check_local(settings, {ipaddress.IPv4Address("198.18.0.11"), ipaddress.IPv4Address("198.19.0.1")})
