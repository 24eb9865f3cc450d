"""The IWD-style operator commands: startHA, configureHA, stopHA, failOver, HAstatus.

Each is a click command usable on its own (the console scripts) and as a
``mirrord`` subcommand (``mirrord start-ha`` …). IWD's single-dash spellings
(``-primaryIP`` …) are accepted as aliases of the long options.
"""

from __future__ import annotations

from typing import Any, Callable

import click

from mirrord import config
from mirrord.control import ControlClient
from mirrord.net.addresses import local_addresses
from mirrord_cli.runner import ensure_daemon, run
from mirrord_cli.status_view import render_status

_HA_OPTIONS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("--primary-ip", "-primaryIP", "Public address of the primary appliance.", {}),
    ("--secondary-ip", "-secondaryIP", "Public address of the secondary appliance.", {}),
    ("--primary-sync-ip", "-primarySyncIP", "Primary's address on the dedicated sync link.", {}),
    ("--secondary-sync-ip", "-secondarySyncIP", "Secondary's address on the dedicated sync link.", {}),
    ("--floating-ip", "-floatingIP", "Floating IP/PREFIX that follows the primary, e.g. 198.18.0.10/24.", {}),
    ("--ping-interval", "-pingInterval", "Seconds of silence on both networks before the secondary takes over.", {}),
    ("--disk", "-disk", "Block device or fixed-size image file to mirror.", {}),
    ("--mount", "-mount", "Empty directory where the primary mounts the mirrored filesystem.", {}),
    ("--mkfs", "-mkfs", "Create this filesystem on first start if the disk has none (ext4).", {}),
    ("--start-script", "-startScript", "Run with 'start' when this appliance becomes primary.", {}),
    ("--stop-script", "-stopScript", "Run with 'stop' before this appliance gives up the primary role.", {}),
    ("--secret-file", "-secretFile", "File holding the shared secret of the sync link.", {}),
    ("--witness-ip", "-witnessIP", "A third host (e.g. the gateway) an isolated appliance fails to reach.", {}),
    ("--restart-limit", "-restartLimit", "Restarts of a failing OCF application before failing over (default 3).", {}),
]


def ha_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for long, iwd, help_text, extra in reversed(_HA_OPTIONS):
        func = click.option(long, iwd, default=None, help=help_text, **extra)(func)
    return func


_START_EPILOG = """\b
Run the same command on both appliances; each finds its role from its own
addresses. Start the secondary first or second, in any order.

\b
Example:
  startHA --primary-ip 198.18.0.11 --secondary-ip 198.18.0.12 \\
          --primary-sync-ip 198.19.0.1 --secondary-sync-ip 198.19.0.2 \\
          --floating-ip 198.18.0.10/24 --ping-interval 1 \\
          --disk /var/lib/mirrord/disk.img --mount /srv/data --mkfs ext4
"""


@click.command("start-ha", epilog=_START_EPILOG)
@ha_options
@click.option("--discard-my-data", "-discardMyData", "discard_my_data", is_flag=True, default=None,
              help="Resolve a split brain: this appliance becomes the secondary and its own changes are "
                   "overwritten by the peer's data (a copy of its disk is saved first, in $MIRRORD_HOME/splitbrain/).")
def start_ha(discard_my_data: bool | None, **options: Any) -> None:
    """Start high availability on this appliance (startHA)."""
    options = {k: v for k, v in options.items() if v is not None}
    # Not a setting: it applies to this one start and is never saved.
    extra = {"discard_my_data": True} if discard_my_data else {}

    def action(client: ControlClient) -> tuple[str, dict[str, Any]]:
        # Check everything that can be checked here before a daemon is started, so bad
        # input changes nothing at all; the daemon checks again under its lock.
        settings = config.parse(options)
        config.check_local(settings, local_addresses())
        ensure_daemon(client)
        return client.call("start_ha", **options, **extra)

    run("startHA", {**options, **extra}, action)


@click.command("configure-ha")
@ha_options
def configure_ha(**options: Any) -> None:
    """Change settings of a running pair (configureHA); run it on both appliances."""
    changes = {k: v for k, v in options.items() if v is not None}
    run("configureHA", changes, lambda client: client.call("configure_ha", **changes))


@click.command("stop-ha")
def stop_ha() -> None:
    """Return this appliance to standalone mode (stopHA)."""
    run("stopHA", {}, lambda client: client.call("stop_ha"))


@click.command("fail-over")
def fail_over() -> None:
    """Switch roles gracefully: the primary becomes idle, the secondary primary (failOver)."""
    run("failOver", {}, lambda client: client.call("fail_over"))


@click.command("ha-status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts and tests).")
def ha_status(as_json: bool) -> None:
    """Show the mode of this appliance and the state of the mirror (HAstatus)."""
    run("HAstatus", {"json": as_json}, lambda client: client.call("status"), as_json=as_json, render=render_status)
