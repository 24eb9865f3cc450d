"""trace.zip contents, missing files, secrets, and crash-safe writing."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from mirrord.errors import MirrordError
from mirrord.paths import Home
from mirrord.trace import peer_log_dir, without_secrets, write_trace

ME, PEER = "198.18.0.11", "198.18.0.12"


def home_with_logs(tmp_path: Path) -> Home:
    home = Home(tmp_path / "home")
    home.log_dir.mkdir(parents=True)
    (home.log_dir / "ha.log").write_text("line 1\nline 2\n")
    (home.log_dir / "ha.out").write_text("out\n")
    (home.log_dir / "ha.result").write_text('{"exit_code": 0}\n')
    peer = peer_log_dir(home)
    peer.mkdir()
    (peer / f"{PEER}_ha.log").write_text("peer line\n")
    (peer / f"{PEER}_ha.result").write_text('{"exit_code": 1}\n')
    (home.log_dir / "secret.key").write_text("hunter2")
    return home


def test_full_trace(tmp_path: Path) -> None:
    home = home_with_logs(tmp_path)
    status = {"mode": "primary", "settings": {"secret_file": "/etc/k", "disk": "/d"}, "shared_secret": "x"}
    path = write_trace(home, ME, PEER, status=status)
    assert path == home.log_dir / "trace.zip"
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        assert names == {f"{ME}_ha.log", f"{ME}_ha.out", f"{ME}_ha.result",
                         f"{PEER}_ha.log", f"{PEER}_ha.result", "status.json", "MISSING.txt"}
        assert zf.read(f"{ME}_ha.log") == b"line 1\nline 2\n"
        assert zf.read(f"{PEER}_ha.log") == b"peer line\n"
        assert json.loads(zf.read("status.json")) == {"mode": "primary", "settings": {"disk": "/d"}}
        missing = zf.read("MISSING.txt").decode()
        assert f"{PEER}_ha.out" in missing and f"{ME}_ha.log" not in missing
        assert all(b"hunter2" not in zf.read(n) for n in names)
    assert not [p for p in home.log_dir.iterdir() if p.name.startswith(".trace")]


def test_nothing_there(tmp_path: Path) -> None:
    home = Home(tmp_path / "empty")
    dest = tmp_path / "out" / "t.zip"
    write_trace(home, ME, None, dest)
    with zipfile.ZipFile(dest) as zf:
        assert zf.namelist() == ["MISSING.txt"]
        text = zf.read("MISSING.txt").decode()
        assert all(f"{ME}_{n}" in text for n in ("ha.log", "ha.out", "ha.result"))
        assert PEER not in text  # no peer: its logs are not expected


def test_no_missing_entry_when_complete(tmp_path: Path) -> None:
    home = home_with_logs(tmp_path)
    (peer_log_dir(home) / f"{PEER}_ha.out").write_text("x")
    with zipfile.ZipFile(write_trace(home, ME, PEER)) as zf:
        assert "MISSING.txt" not in zf.namelist() and "status.json" not in zf.namelist()


def test_replaces_an_existing_trace(tmp_path: Path) -> None:
    home = home_with_logs(tmp_path)
    dest = home.log_dir / "trace.zip"
    dest.write_bytes(b"old")
    write_trace(home, ME, PEER)
    assert zipfile.is_zipfile(dest)


def test_unusable_destination_is_mirrord_error(tmp_path: Path) -> None:
    home = home_with_logs(tmp_path)
    bad_parent = tmp_path / "notadir"
    bad_parent.write_text("")
    with pytest.raises(MirrordError, match="Could not write"):
        write_trace(home, ME, PEER, bad_parent / "trace.zip")


def test_failure_midway_keeps_old_trace_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = home_with_logs(tmp_path)
    dest = tmp_path / "trace.zip"
    dest.write_bytes(b"old")
    real_write = zipfile.ZipFile.write
    calls = []

    def failing_write(self: zipfile.ZipFile, *args: object, **kw: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(zipfile.ZipFile, "write", failing_write)
    with pytest.raises(MirrordError, match="No space left"):
        write_trace(home, ME, PEER, dest)
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".trace")] == []


def test_non_regular_file_counts_as_missing(tmp_path: Path) -> None:
    home = home_with_logs(tmp_path)
    (home.log_dir / "ha.out").unlink()
    (home.log_dir / "ha.out").mkdir()
    with zipfile.ZipFile(write_trace(home, ME, PEER)) as zf:
        assert f"{ME}_ha.out" not in zf.namelist()
        assert f"{ME}_ha.out" in zf.read("MISSING.txt").decode()


def test_without_secrets() -> None:
    assert without_secrets({"a": [{"Secret": 1, "b": 2}], "my_secret_file": "x", "c": (1,)}) == \
        {"a": [{"b": 2}], "c": [1]}
