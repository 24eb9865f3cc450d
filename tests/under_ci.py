"""Whether this run is a CI run, where a missing prerequisite is a failure and never a skip.

Importable from every test directory: pytest puts tests/ on sys.path when it
loads tests/conftest.py (rootdir-relative conftests without __init__.py).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def under_ci() -> bool:
    """CI runners set CI to "true", "1", "yes" …; only unset, empty, 0 and false mean a developer's run."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def skip_or_fail(message: str) -> NoReturn:
    """A prerequisite is missing: skip on a developer's machine, fail under CI (where a skip would hide it)."""
    if under_ci():
        pytest.fail(message)
    pytest.skip(message)
