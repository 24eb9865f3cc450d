"""How every HA command runs: log it, do it, print one answer, leave ha.out and ha.result, exit with its code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import click

from mirrord.control import ControlClient
from mirrord.errors import MirrordError
from mirrord.halog import HALog
from mirrord.paths import Home

DAEMON_START_TIMEOUT = 15.0


def describe(name: str, options: dict[str, Any]) -> str:
    # Only option values reach ha.log: --secret-file is a path; the secret itself never passes here.
    given = " ".join(f"--{k.replace('_', '-')} {one}" for k, v in options.items() if v not in (None, False)
                     for one in (v if isinstance(v, list) else [v]))  # a repeated option once per value
    return f"{name} {given}".strip()


def run(name: str, options: dict[str, Any], action: Callable[[ControlClient], tuple[str, dict[str, Any]]],
        as_json: bool = False, render: Callable[[str, dict[str, Any]], str] | None = None,
        timeout: float = 300.0) -> None:
    home = Home.from_env()
    log = HALog(home, name)
    log.log(f"Command: {describe(name, options)}")
    client = ControlClient(home, timeout=timeout)
    try:
        message, data = action(client)
        code = 0
        text = json.dumps(data, indent=2, sort_keys=True) if as_json else (render(message, data) if render else message)
    except MirrordError as exc:
        code, message, text = exc.exit_code, str(exc), ""
    except OSError as exc:  # e.g. MIRRORD_HOME not writable: still one sentence, never a traceback
        code, message, text = 1, f"{name} failed: {exc}", ""
    if text:
        click.echo(text)
    if code:
        click.echo(f"{name}: {message}", err=True)
    if not _record(log, name, code, message, text):
        code = code or 1
    sys.exit(code)


def record_usage_error(name: str, line: str, exc: click.UsageError) -> None:
    """A command line click refuses (unknown option, missing value) leaves the same three files as any
    other outcome, with exit 2 (bad input); click itself then prints the usage and exits."""
    log = HALog(Home.from_env(), name)
    try:
        log.log(f"Command: {line}")
    except OSError:
        pass  # _record says so below
    _record(log, name, exc.exit_code, exc.format_message(), "")


def _record(log: HALog, name: str, code: int, message: str, text: str) -> bool:
    """ha.out, ha.result and the closing ha.log line of a command; False (and said) if they cannot be written."""
    try:
        log.write_out(text + ("\n" if text else ""))
        log.write_result(name, code, message)
        log.log(f"{name} {'succeeded' if code == 0 else 'exit ' + str(code)}: {message}")
    except OSError as exc:
        click.echo(f"{name}: could not write the HA logs in {log.home.log_dir}: {exc}", err=True)
        return False
    return True


def ensure_daemon(client: ControlClient) -> None:
    """Start the appliance's daemon in the background if none answers (startHA needs one)."""
    if client.daemon_running():
        return
    home = client.home
    home.ensure()
    # --no-resume: the startHA that starts the daemon decides the role, not the saved state.
    out = open(home.log_dir / "daemon.out", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "mirrord_cli.main", "daemon", "--no-resume"], stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    out.close()
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while time.monotonic() < deadline:
        if client.daemon_running():
            return
        if proc.poll() is not None:
            tail = (home.log_dir / "daemon.out").read_text(errors="replace")[-800:]
            raise MirrordError(f"The mirrord daemon exited at start (code {proc.returncode}): {tail.strip()}")
        time.sleep(0.05)
    raise MirrordError(f"The mirrord daemon did not open {home.control_socket} within {DAEMON_START_TIMEOUT:g} s; "
                       f"see {home.log_dir / 'daemon.out'}.")


def wait_daemon_gone(client: ControlClient) -> None:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while client.daemon_running():
        if time.monotonic() > deadline:
            raise MirrordError(f"The daemon is still answering on {client.home.control_socket} after "
                               f"{DAEMON_START_TIMEOUT:g} s; see ha.log.")
        time.sleep(0.05)
