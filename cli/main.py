"""``mirrord``: the command-line front end. A client of the local daemon; no daemon internals here."""

from __future__ import annotations

from typing import Any

import click

from mirrord.control import ControlClient

from mirrord_cli.iwd import configure_ha, fail_over, ha_status, start_ha, stop_ha
from mirrord_cli.lab import lab


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mirrord")
def mirrord() -> None:
    """Synchronous disk mirroring and automatic failover for a pair of appliances."""


@mirrord.command()
def daemon() -> None:
    """Run this appliance's daemon in the foreground (systemd runs it this way)."""
    from mirrord.daemon import main

    main()


@mirrord.command()
def shutdown() -> None:
    """Stop this appliance's daemon (stopping HA first if it runs)."""
    from mirrord_cli.runner import run, wait_daemon_gone

    def action(client: ControlClient) -> tuple[str, dict[str, Any]]:
        message, data = client.call("shutdown")
        wait_daemon_gone(client)
        return message, data

    run("shutdown", {}, action)


@mirrord.command()
def trace() -> None:
    """Write trace.zip: this appliance's and the peer's ha.log, ha.out and ha.result."""
    from mirrord_cli.runner import run

    run("trace", {}, lambda client: client.call("trace"))


@mirrord.group()
def debug() -> None:
    """Fault injection for tests and drills (root only, logged in ha.log)."""


@debug.command("corrupt-next")
@click.argument("count", type=click.IntRange(1, 1000))
def corrupt_next(count: int) -> None:
    """Corrupt the payload of the next COUNT frames sent to the secondary (after their CRC)."""
    from mirrord_cli.runner import run

    run("debug", {"corrupt_next": count}, lambda client: client.call("debug_corrupt_next", count=count))


for command in (start_ha, configure_ha, stop_ha, fail_over, ha_status, lab):
    mirrord.add_command(command)

if __name__ == "__main__":
    mirrord()
