"""The application mirrord protects: start and stop scripts, or an OCF resource agent.

A plain script is run as ``SCRIPT start`` / ``SCRIPT stop``. A script that
answers ``meta-data`` with an OCF ``<resource-agent>`` description is driven
like Pacemaker drives one: ``start``, ``stop`` and a periodic ``monitor``
whose exit code is the application's health (0 running, 7 not running,
anything else failed). The monitor runs in its own thread beside the HA loop;
the loop only reads its last result.

Every script gets ``MIRRORD_MODE``, ``MIRRORD_MOUNT`` and ``MIRRORD_FLOATING_IP``
in its environment (and ``OCF_RESKEY_mount`` etc. when it is an OCF agent).
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from mirrord.errors import MirrordError

SCRIPT_TIMEOUT = 120.0
META_TIMEOUT = 5.0

OCF_SUCCESS = 0
OCF_NOT_RUNNING = 7
OCF_MEANINGS = {0: "running", 1: "generic error", 2: "bad arguments", 3: "unimplemented", 4: "insufficient privileges",
                5: "not installed", 6: "not configured", 7: "not running", 8: "running as master",
                9: "failed as master"}


@dataclass(frozen=True)
class AppEnv:
    mode: str
    mount: str        # the first volume's mount point
    floating_ip: str
    mounts: str = ""  # every volume's mount point, ':'-separated (several --disk/--mount)

    def variables(self) -> dict[str, str]:
        return {"MIRRORD_MODE": self.mode, "MIRRORD_MOUNT": self.mount, "MIRRORD_MOUNTS": self.mounts or self.mount,
                "MIRRORD_FLOATING_IP": self.floating_ip,
                "OCF_RESKEY_mount": self.mount, "OCF_RESKEY_floating_ip": self.floating_ip}


def run(script: Path, action: str, env: AppEnv, timeout: float = SCRIPT_TIMEOUT) -> tuple[int, str]:
    """Exit code and the tail of the output; a script that cannot run is code 5 (OCF: not installed)."""
    try:
        done = subprocess.run([str(script), action], env={**os.environ, **env.variables()}, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 1, f"timed out after {timeout:g} s"
    except OSError as exc:
        return 5, str(exc)
    return done.returncode, (done.stderr or done.stdout).strip()[-500:]


def is_ocf_agent(script: Path) -> bool:
    """True if ``script meta-data`` prints an OCF resource-agent description."""
    try:
        done = subprocess.run([str(script), "meta-data"], capture_output=True, text=True, timeout=META_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "<resource-agent" in done.stdout


def describe(code: int) -> str:
    return f"OCF {code}: {OCF_MEANINGS.get(code, 'unknown')}"


class Monitor:
    """Runs ``SCRIPT monitor`` every ``interval`` seconds; ``healthy`` is the last answer."""

    def __init__(self, script: Path, env: AppEnv, interval: float) -> None:
        self.script = script
        self.env = env
        self.interval = interval
        self.healthy: bool | None = None
        self.last_code: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="app-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=SCRIPT_TIMEOUT)

    def reset(self) -> None:
        """After a restart: unknown until the next monitor says otherwise."""
        self.healthy = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            code, _ = run(self.script, "monitor", self.env, timeout=max(5.0, self.interval * 5))
            self.last_code = code
            self.healthy = code == OCF_SUCCESS


def check(code: int, script: Path, action: str, output: str) -> None:
    if code != 0:
        raise MirrordError(f"{script} {action} failed ({describe(code)}): {output}")
