"""PrimarySide.stop when the C server stopped but its disk failed an fdatasync.

Such a stop is not clean: writes the peer holds may be missing from this
disk. The "crashed primary" flag (meta ``primary_open``) must stay set and
the dirty bitmap file must not be rewritten, so the next start treats it as
a crash; a stop that could not stop at all (EBUSY) must raise, so that a
later stopHA tries again.
"""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

import pytest

from mirrord.config import Endpoints, Settings
from mirrord.errors import NativeError
from mirrord.halog import HALog
from mirrord.paths import Home
from mirrord.replication import extents
from mirrord.replication.meta import VolumeMeta
from mirrord.replication.primary import PrimarySide

A1, A2 = ipaddress.IPv4Address("198.18.0.11"), ipaddress.IPv4Address("198.18.0.12")
S1, S2 = ipaddress.IPv4Address("198.19.0.11"), ipaddress.IPv4Address("198.19.0.12")


class StoppedServer:
    """Stands in for the C server at the one call under test: its stop() fails with code."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1
        exc = NativeError(f"stop serving /x: {errno.errorcode[self.code]}")
        exc.errno = self.code  # type: ignore[attr-defined]
        raise exc

    def dirty_bitmap(self) -> bytes:
        raise AssertionError("an unclean stop must not save the bitmap")


def _side(tmp_path: Path) -> PrimarySide:
    home = Home(tmp_path / "home")
    settings = Settings(primary_ip=A1, secondary_ip=A2, primary_sync_ip=S1, secondary_sync_ip=S2,
                        floating_ip=ipaddress.IPv4Interface("198.18.0.100/24"), ping_interval=0.1,
                        disk=tmp_path / "disk.img")
    meta = VolumeMeta(primary_open=True)
    side = PrimarySide(home, settings, HALog(home), 1 << 20, Endpoints(A1, S1, A2, S2),
                       lambda: None, None, meta)
    return side


def test_stop_after_a_failed_fdatasync_leaves_the_crashed_primary_flag(tmp_path: Path) -> None:
    side = _side(tmp_path)
    server = StoppedServer(errno.EIO)
    side.server = server  # type: ignore[assignment]
    side.stop()
    assert server.stops == 1 and side.server is None
    assert side.meta.primary_open
    assert not extents.bitmap_file(side.home, side.settings.volume).exists()
    log = (side.home.log_dir / "ha.log").read_text()
    assert "not cleanly" in log and "crash of this primary" in log
    side.stop()  # nothing left to stop
    assert server.stops == 1


def test_stop_that_could_not_stop_raises_and_keeps_the_server(tmp_path: Path) -> None:
    side = _side(tmp_path)
    server = StoppedServer(errno.EBUSY)
    side.server = server  # type: ignore[assignment]
    with pytest.raises(NativeError):
        side.stop()
    assert side.server is server and side.meta.primary_open
