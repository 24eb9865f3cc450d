"""After a restart: never primary by itself; secondary again only where the saved state proves it safe."""

from __future__ import annotations

import pytest

from mirrord.restart import after_restart

DISKS = ("UpToDate", "Outdated", "Inconsistent")


@pytest.mark.parametrize("was", ["secondary", "inconsistent", "idle"])
@pytest.mark.parametrize("disk", DISKS)
def test_a_follower_with_settings_and_metadata_resumes_as_secondary(was: str, disk: str) -> None:
    decision = after_restart(was, True, disk)
    assert decision.resume_secondary
    assert f"while {was}, disk {disk}: resuming as secondary" in decision.sentence
    assert "never as primary" in decision.sentence


@pytest.mark.parametrize(("was", "settings", "disk", "fragment"), [
    ("primary", True, "UpToDate", "A restarted primary never resumes by itself"),
    ("primary", True, "Outdated", "A restarted primary never resumes by itself"),
    ("primary", False, None, "A restarted primary never resumes by itself"),
    ("standalone", True, "UpToDate", "HA was not running before"),
    (None, True, "UpToDate", "HA was not running before"),
    (None, False, None, "HA was not running before"),
    ("secondary", False, "UpToDate", "settings (ha.json) are gone"),
    ("idle", False, "Outdated", "settings (ha.json) are gone"),
    ("secondary", True, None, "metadata is missing"),
    ("inconsistent", True, "Garbage", "metadata is Garbage"),
    ("mystery-mode", True, "UpToDate", "coming back standalone"),
])
def test_everything_else_comes_back_standalone(was: str | None, settings: bool, disk: str | None,
                                               fragment: str) -> None:
    decision = after_restart(was, settings, disk)
    assert not decision.resume_secondary
    assert fragment in decision.sentence
    assert "standalone" in decision.sentence


@pytest.mark.parametrize("was", [None, "standalone", "primary", "secondary", "inconsistent", "idle", "x"])
@pytest.mark.parametrize("settings", [True, False])
@pytest.mark.parametrize("disk", [None, *DISKS])
def test_no_restart_ever_leads_to_primary(was: str | None, settings: bool, disk: str | None) -> None:
    decision = after_restart(was, settings, disk)
    assert "resuming as primary" not in decision.sentence
    assert decision.resume_secondary == (was in ("secondary", "inconsistent", "idle") and settings and disk in DISKS)
