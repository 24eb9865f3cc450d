"""``mirrord``: the command-line front end. A client of the local daemon; no daemon internals here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from mirrord.control import ControlClient

from mirrord_cli.iwd import configure_ha, fail_over, ha_status, start_ha, stop_ha
from mirrord_cli.lab import lab


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mirrord")
def mirrord() -> None:
    """Synchronous disk mirroring and automatic failover for a pair of appliances."""


@mirrord.command(epilog="""\b
After a restart (systemctl restart, Restart=on-failure, a reboot) the daemon
never comes back primary; it resumes as secondary by itself only if it was
secondary, inconsistent or idle with its settings and metadata in place
(docs/operations.md, "After a reboot or a daemon restart").

\b
Example:
  MIRRORD_HOME=/var/lib/mirrord mirrord daemon     what the systemd unit runs
""")
@click.option("--no-resume", is_flag=True,
              help="Come back standalone whatever the saved state (startHA starts the daemon this way).")
def daemon(no_resume: bool) -> None:
    """Run this appliance's daemon in the foreground (systemd runs it this way)."""
    from mirrord.daemon import main

    main(resume=not no_resume)


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


#: A backup or restore copies the whole disk: allow it an hour before the client gives up waiting.
COPY_TIMEOUT = 3600.0


@mirrord.command(epilog="""\b
Run on the primary while the pair is in sync. Each 1 MiB chunk is read on
the primary and on the secondary (in the order of the writes, so a write in
flight never counts as a difference) and their CRC32C compared. Chunks that
differ on the secondary (a disk that changed behind mirrord's back) are
marked out of sync and resent at once; HAstatus shows that resync.
Refused (exit 3) on a secondary or while a sync runs.

\b
Example:
  mirrord verify
""")
def verify() -> None:
    """Compare both appliances' disks while serving (online verify) and repair what differs."""
    from mirrord_cli.runner import run

    run("verify", {}, lambda client: client.call("verify"), timeout=COPY_TIMEOUT)


@mirrord.command(epilog="""\b
On the primary the mounted filesystem is frozen (fsfreeze) while the disk is
copied: the copy is consistent, the application's writes wait meanwhile and
reads go on. A standalone appliance's disk is copied when nothing uses it.
The archive is a tar: disk.extents (the disk without its zero blocks),
settings.json and manifest.json (SHA-256 of everything). FILE must be new and
must not be on the mirrored filesystem.

\b
Example:
  mirrord backup /srv/backups/appliance-$(date +%F).tar
""")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def backup(file: Path) -> None:
    """Back up the mirrored disk and the HA settings, consistently, while serving."""
    from mirrord_cli.runner import ensure_daemon, run

    def action(client: ControlClient) -> tuple[str, dict[str, Any]]:
        ensure_daemon(client)
        return client.call("backup", path=str(file.absolute()))

    run("backup", {"file": file}, action, timeout=COPY_TIMEOUT)


@mirrord.command(epilog="""\b
Refused (exit 3) while HA runs here: stop HA on both appliances first. Every
checksum is verified before a byte is written; a disk in use is refused.
Afterwards run startHA on the primary first, then on the secondary, which
gets a full sync of the restored disk.

\b
Example:
  stopHA                       (on both appliances)
  mirrord restore /srv/backups/appliance-2026-11-22.tar
  startHA ...                  (on the primary, then on the secondary)
""")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--disk", type=click.Path(path_type=Path), default=None,
              help="Restore onto this disk instead of the one named in the backup's settings.")
def restore(file: Path, disk: Path | None) -> None:
    """Restore a backup's disk image and HA settings (HA stopped on both appliances)."""
    from mirrord_cli.runner import ensure_daemon, run

    args = {"path": str(file.absolute()), "disk": None if disk is None else str(disk.absolute())}

    def action(client: ControlClient) -> tuple[str, dict[str, Any]]:
        ensure_daemon(client)
        return client.call("restore", **args)

    run("restore", {"file": file, "disk": disk}, action, timeout=COPY_TIMEOUT)


@mirrord.command(epilog="""\b
The HA administrator's SSH prompt: only startHA, configureHA, stopHA,
failOver, HAstatus, trace, help and exit. Tab completes commands and their
options; history is kept in $MIRRORD_HOME/shell_history. Nothing is ever
run through a system shell.

\b
Examples:
  mirrord shell                     the interactive prompt
  mirrord shell -c "HAstatus"       one line, e.g. from sshd's ForceCommand
""")
@click.option("-c", "--command", default=None, help="Run this one line (restricted the same way) and exit with its code.")
def shell(command: str | None) -> None:
    """A restricted login shell offering only the HA commands, help and trace."""
    from mirrord.paths import Home
    from mirrord_cli.shell import run_shell

    sys.exit(run_shell(Home.from_env(), command))


@mirrord.command(epilog="""\b
Examples:
  mirrord completion bash > /etc/bash_completion.d/mirrord
  eval "$(mirrord completion bash)"          in ~/.bashrc
  mirrord completion zsh > "${fpath[1]}/_mirrord"
  mirrord completion fish > ~/.config/fish/completions/mirrord.fish
""")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the tab-completion script of `mirrord` for SHELL (bash, zsh or fish)."""
    from click.shell_completion import get_completion_class

    complete = get_completion_class(shell)
    assert complete is not None  # click ships all three
    click.echo(complete(mirrord, {}, "mirrord", "_MIRRORD_COMPLETE").source())


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
