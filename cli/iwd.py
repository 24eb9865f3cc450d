"""The IWD-style operator commands: startHA, configureHA, stopHA, failOver, HAstatus.

Each is a click command usable on its own (the console scripts) and as a
``mirrord`` subcommand (``mirrord start-ha`` …). IWD's single-dash spellings
(``-primaryIP`` …) are accepted as aliases of the long options.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import click

from mirrord import config
from mirrord.control import ControlClient
from mirrord.net.addresses import local_addresses
from mirrord_cli.runner import describe, ensure_daemon, record_usage_error, run
from mirrord_cli.status_view import Progress, in_sync, progress, render_status, syncing

_HA_OPTIONS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("--primary-ip", "-primaryIP", "Public address of the primary appliance.", {}),
    ("--secondary-ip", "-secondaryIP", "Public address of the secondary appliance.", {}),
    ("--primary-sync-ip", "-primarySyncIP", "Primary's address on the dedicated sync link.", {}),
    ("--secondary-sync-ip", "-secondarySyncIP", "Secondary's address on the dedicated sync link.", {}),
    ("--floating-ip", "-floatingIP", "Floating IP/PREFIX that follows the primary, e.g. 198.18.0.10/24.", {}),
    ("--ping-interval", "-pingInterval", "Seconds of silence on both networks before the secondary takes over.", {}),
    ("--disk", "-disk", "Block device or fixed-size image file to mirror; give it once per volume (at most "
     f"{config.MAX_VOLUMES}).", {"multiple": True}),
    ("--mount", "-mount", "Empty directory where the primary mounts the mirrored filesystem; once per --disk, in the "
     "same order.", {"multiple": True}),
    ("--mkfs", "-mkfs", "Create this filesystem on first start if the disk has none (ext4).", {}),
    ("--start-script", "-startScript", "Run with 'start' when this appliance becomes primary.", {}),
    ("--stop-script", "-stopScript", "Run with 'stop' before this appliance gives up the primary role.", {}),
    ("--secret-file", "-secretFile", "File holding the shared secret of the pair (at least "
     f"{config.MIN_SECRET_BYTES} bytes; the same on both appliances).", {}),
    ("--witness-ip", "-witnessIP", "A third host (e.g. the gateway) an isolated appliance fails to reach.", {}),
    ("--restart-limit", "-restartLimit", "Restarts of a failing OCF application before failing over (default 3).", {}),
    ("--resync-rate", "-resyncRate", "Ceiling in MiB/s for a resync (default 0: none; a resync always yields to "
     "the application's writes).", {}),
    ("--checksum-sync", "-checksumSync", "Make every full sync compare block checksums first and copy only what "
     "differs (automatic when both disks share a history).", {"is_flag": True}),
    ("--full-sync-threshold", "-fullSyncThreshold", "Percent of the disk dirty above which a resync copies the "
     "whole disk (default 50).", {}),
]


def ha_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for long, iwd, help_text, extra in reversed(_HA_OPTIONS):
        func = click.option(long, iwd, default=None, help=help_text, **extra)(func)
    return func


#: Options naming files: sent to the daemon as absolute paths, since it resolves them from its own cwd.
PATH_OPTIONS = frozenset({"disk", "mount", "start_script", "stop_script", "secret_file"})


def given(options: dict[str, Any]) -> dict[str, Any]:
    """The options given on the command line; a repeatable one is a value once, a list when repeated;
    a file relative to the operator's working directory, as the operator meant it."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in PATH_OPTIONS and value is not None:
            value = tuple(map(_absolute, value)) if isinstance(value, tuple) else _absolute(value)
        if isinstance(value, tuple):
            value = None if not value else value[0] if len(value) == 1 else list(value)
        if value is not None:
            out[key] = value
    return out


def _absolute(path: str) -> str:
    return os.path.abspath(path) if path.strip() else path  # an empty one stays empty: the daemon names it missing


class HACommand(click.Command):
    """An IWD command whose usage errors (an unknown option, a missing value) leave ha.log, ha.out and
    ha.result like any other outcome (exit 2), as every HA command must."""

    def __init__(self, *args: Any, iwd_name: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.iwd_name = iwd_name

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, list(args))
        except click.UsageError as exc:
            record_usage_error(self.iwd_name, " ".join([self.iwd_name, *args]), exc)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # raised by the command itself (HAstatus's option rules)
            record_usage_error(self.iwd_name, describe(self.iwd_name, ctx.params), exc)
            raise


_START_EPILOG = """\b
Run the same command on both appliances; each finds its role from its own
addresses. Start the secondary first or second, in any order.

\b
Example:
  startHA --primary-ip 198.18.0.11 --secondary-ip 198.18.0.12 \\
          --primary-sync-ip 198.19.0.1 --secondary-sync-ip 198.19.0.2 \\
          --floating-ip 198.18.0.10/24 --ping-interval 1 \\
          --disk /var/lib/mirrord/disk.img --mount /srv/data --mkfs ext4

\b
Several volumes (they fail over together): repeat --disk, and --mount in the same order:
  startHA ... --disk /dev/vdb --mount /srv/db --disk /dev/vdc --mount /srv/logs --mkfs ext4
"""


@click.command("start-ha", cls=HACommand, iwd_name="startHA", epilog=_START_EPILOG)
@ha_options
@click.option("--discard-my-data", "-discardMyData", "discard_my_data", is_flag=True, default=None,
              help="Resolve a split brain: this appliance becomes the secondary and its own changes are "
                   "overwritten by the peer's data (a copy of its disk is saved first, in $MIRRORD_HOME/splitbrain/).")
@click.option("--force", "-force", "force", is_flag=True, default=None,
              help="Become primary with this appliance's own copy although it may lack acknowledged writes "
                   "(Outdated, or last the secondary's copy): only when the other appliance is lost for good.")
def start_ha(discard_my_data: bool | None, force: bool | None, **options: Any) -> None:
    """Start high availability on this appliance (startHA)."""
    options = given(options)
    # Not settings: they apply to this one start and are never saved.
    extra = {**({"discard_my_data": True} if discard_my_data else {}), **({"force": True} if force else {})}

    def action(client: ControlClient) -> tuple[str, dict[str, Any]]:
        # Check everything that can be checked here before a daemon is started, so bad
        # input changes nothing at all; the daemon checks again under its lock.
        settings = config.parse(options)
        config.check_local(settings, local_addresses())
        ensure_daemon(client)
        return client.call("start_ha", **options, **extra)

    run("startHA", {**options, **extra}, action)


_CONFIGURE_EPILOG = """\b
Run the same configureHA on both appliances. A secondary restarts its side
with the new settings; a primary changes in place what does not interrupt
the application (ping interval, scripts, witness, floating IP) and refuses
the rest (exit 3): failOver first, or stopHA and startHA. A new shared
secret is refused on a running pair: stopHA on both, then startHA with the
new --secret-file on both.

\b
Examples:
  configureHA --ping-interval 2
  configureHA --floating-ip 198.18.0.20/24
"""


@click.command("configure-ha", cls=HACommand, iwd_name="configureHA", epilog=_CONFIGURE_EPILOG)
@ha_options
def configure_ha(**options: Any) -> None:
    """Change settings of a running pair (configureHA); run it on both appliances."""
    changes = given(options)
    run("configureHA", changes, lambda client: client.call("configure_ha", **changes))


@click.command("stop-ha", cls=HACommand, iwd_name="stopHA", epilog="""\b
On the primary: stop script, floating IP released, filesystem unmounted, disk
no longer exposed. On the secondary: it stops receiving (the primary goes on,
degraded). After stopHA a restart of the daemon stays standalone.

\b
Example:
  stopHA          (on both appliances before mirrord restore or a migration)
""")
def stop_ha() -> None:
    """Return this appliance to standalone mode (stopHA)."""
    run("stopHA", {}, lambda client: client.call("stop_ha"))


@click.command("fail-over", cls=HACommand, iwd_name="failOver", epilog="""\b
Refused (exit 3) unless the secondary is connected and UpToDate. Afterwards
the old primary is idle: run startHA on it to make it the new secondary.

\b
Example:
  failOver        (on either appliance; e.g. before upgrading the primary)
  startHA ...     (then on the old primary, now idle)
""")
def fail_over() -> None:
    """Switch roles gracefully: the primary becomes idle, the secondary primary (failOver)."""
    run("failOver", {}, lambda client: client.call("fail_over"))


_STATUS_EPILOG = """\b
The tree follows `drbdadm status`: this appliance's mode and disk, the
floating IP, then the peer: connection, replication state, the peer's disk,
and during a sync done:NN.NN%, rate and ETA (measured over one second), and
which heartbeat networks are silent.

\b
Examples:
  HAstatus                      one look
  HAstatus --watch              redraw every 2 s with a progress bar; Ctrl-C ends
  HAstatus --watch --interval 1 --count 30
  HAstatus --watch --until-synced   until the secondary is in sync (then failOver may run)
  HAstatus --json               one JSON object, for scripts
"""

#: Seconds between the two samples a one-shot HAstatus takes to tell a sync's rate.
RATE_SAMPLE_SECONDS = 1.0


@click.command("ha-status", cls=HACommand, iwd_name="HAstatus", epilog=_STATUS_EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts and tests).")
@click.option("--watch", is_flag=True, help="Redraw until Ctrl-C, with a progress bar during a sync.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=2.0, show_default=True,
              help="Seconds between redraws with --watch.")
@click.option("--count", type=click.IntRange(1), default=None,
              help="With --watch: stop after this many redraws (default: until Ctrl-C).")
@click.option("--until-synced", is_flag=True,
              help="With --watch: stop once the peer is connected and in sync.")
def ha_status(as_json: bool, watch: bool, interval: float, count: int | None, until_synced: bool) -> None:
    """Show the mode of this appliance and the state of the mirror (HAstatus)."""
    if watch and as_json:
        raise click.UsageError("--watch draws the tree for people; use --json without --watch.")
    if (count is not None or until_synced) and not watch:
        raise click.UsageError("--count and --until-synced go with --watch.")
    if watch:
        run("HAstatus", {"watch": True, "interval": interval, "until_synced": until_synced},
            lambda client: watch_status(client, interval, count, until_synced), render=lambda message, data: "")
        return

    speed: Progress | None = None

    def once(client: ControlClient) -> tuple[str, dict[str, Any]]:
        nonlocal speed
        message, data = client.call("status")
        if as_json or not syncing(data):
            return message, data
        # A sync is running: a second sample gives its rate and ETA.
        started = time.monotonic()
        time.sleep(RATE_SAMPLE_SECONDS)
        message, later = client.call("status")
        speed = progress(data, later, time.monotonic() - started)
        return message, later

    run("HAstatus", {"json": as_json}, once, as_json=as_json,
        render=lambda message, data: render_status(message, data, speed))


def watch_status(client: ControlClient, interval: float, count: int | None,
                 until_synced: bool = False) -> tuple[str, dict[str, Any]]:
    """Redraw the tree every ``interval`` seconds until Ctrl-C (or ``count`` redraws, or in sync)."""
    previous: tuple[float, dict[str, Any]] | None = None
    drawn = 0
    try:
        while count is None or drawn < count:
            message, data = client.call("status")
            now = time.monotonic()
            speed = progress(previous[1], data, now - previous[0]) if previous else None
            frame = render_status(message, data, speed, bar=True)
            clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ("" if drawn == 0 else "\n")
            click.echo(f"{clear}{time.strftime('%H:%M:%S')}  HAstatus --watch (every {interval:g} s; Ctrl-C ends)\n"
                       f"{frame}")
            previous, drawn = (now, data), drawn + 1
            if until_synced and in_sync(data):
                return f"In sync after {drawn} redraws.", {}
            if count is None or drawn < count:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    return f"Watched the status ({drawn} redraws).", {}
