"""Shared by every test directory: the installed console scripts (startHA, HAstatus …) are on PATH.

Commands run inside lab nodes find them through PATH, exactly as an operator
would, also when pytest is started as ``.venv/bin/python -m pytest`` without
activating the virtualenv.
"""

import os
import sys

_bin = os.path.dirname(sys.executable)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")
