"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrord.paths import Home


@pytest.fixture
def home(tmp_path: Path) -> Home:
    """An empty MIRRORD_HOME with its directories (a test module may define its own)."""
    h = Home(tmp_path / "home")
    h.ensure()
    return h
