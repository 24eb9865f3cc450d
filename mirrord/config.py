"""HA settings: parsed, validated, and persisted crash-safely.

Validation happens in two layers. :func:`parse` turns raw option strings into
typed values and checks what can be checked from the values alone (addresses
well formed, floating IP on the public subnet, sensible ping interval).
:func:`check_local` then checks them against this machine: which appliance am
I, does the disk exist, is the mount point an empty directory. Both raise
:class:`BadInput` with one sentence naming the bad value and what is expected,
before anything is changed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from mirrord import atomicfile
from mirrord.errors import BadInput
from mirrord.paths import Home

MIN_PING_INTERVAL = 0.05
MAX_PING_INTERVAL = 600.0
SUPPORTED_MKFS = ("ext4",)
#: How often a failing application (OCF monitor) is restarted before the pair fails over (SafeKit's errd).
DEFAULT_RESTART_LIMIT = 3
#: A bitmap resync with more of the disk dirty than this (percent) copies the whole disk instead:
#: one sequential pass beats many scattered chunks (IWD's "extreme case"; measured in docs/performance.md).
DEFAULT_FULL_SYNC_THRESHOLD = 50
DEFAULT_VOLUME = "r0"
#: TCP port of the replication link on the sync network (DRBD's customary one).
DEFAULT_SYNC_PORT = 7788
#: Volumes one pair mirrors (one --disk each; docs/decisions.md 26). The first is r0 on
#: DEFAULT_SYNC_PORT; volume i >= 1 is r<i> on EXTRA_VOLUME_PORT_BASE + i (7791-7797),
#: above the heartbeat and log-shipping ports, like consecutive DRBD resources.
MAX_VOLUMES = 8
EXTRA_VOLUME_PORT_BASE = 7790
#: UDP port of the heartbeats (both networks) and TCP port of log shipping (public network).
HEARTBEAT_PORT = 7789
LOGSHIP_PORT = 7790
#: HTTP status endpoint (/primary, /secondary, /health, /metrics) on every address.
STATUS_PORT = 9187
#: The shortest shared secret accepted (after surrounding whitespace is removed): 16 random bytes are
#: 128 bits, and an empty file would silently turn authentication off (docs/decisions.md 35).
MIN_SECRET_BYTES = 16

#: Option names as the CLI spells them (IWD aliases map onto these).
FIELDS = (
    "primary_ip",
    "secondary_ip",
    "primary_sync_ip",
    "secondary_sync_ip",
    "floating_ip",
    "ping_interval",
    "disk",
    "mount",
    "mkfs",
    "start_script",
    "stop_script",
    "secret_file",
    "witness_ip",
    "restart_limit",
    "resync_rate",
    "checksum_sync",
    "full_sync_threshold",
)
REQUIRED = ("primary_ip", "secondary_ip", "primary_sync_ip", "secondary_sync_ip", "floating_ip", "ping_interval", "disk")


@dataclass(frozen=True)
class Settings:
    primary_ip: ipaddress.IPv4Address
    secondary_ip: ipaddress.IPv4Address
    primary_sync_ip: ipaddress.IPv4Address
    secondary_sync_ip: ipaddress.IPv4Address
    floating_ip: ipaddress.IPv4Interface
    ping_interval: float
    disk: Path
    mount: Path | None = None
    mkfs: str | None = None
    start_script: Path | None = None
    stop_script: Path | None = None
    secret_file: Path | None = None
    witness_ip: ipaddress.IPv4Address | None = None
    restart_limit: int = DEFAULT_RESTART_LIMIT
    resync_rate: float = 0.0  # MiB/s a sync may use at most; 0: no ceiling (it still yields to the application)
    checksum_sync: bool = False  # every full sync compares first and copies only what differs
    full_sync_threshold: int = DEFAULT_FULL_SYNC_THRESHOLD  # % of the disk dirty above which all of it is copied
    volume: str = DEFAULT_VOLUME
    sync_port: int = DEFAULT_SYNC_PORT
    #: volumes r1.. (--disk given more than once) and their mount points (none, or one per disk)
    extra_disks: tuple[Path, ...] = ()
    extra_mounts: tuple[Path, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The settings as options: ``disk`` and ``mount`` are lists when the pair has several volumes."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("extra_disks", "extra_mounts"):
                continue
            data[f.name] = None if v is None else v if isinstance(v, (int, float)) else str(v)
        if self.extra_disks:
            data["disk"] = [str(self.disk), *map(str, self.extra_disks)]
            if self.mount is not None:
                data["mount"] = [str(self.mount), *map(str, self.extra_mounts)]
        return data

    @property
    def disks(self) -> tuple[Path, ...]:
        return (self.disk, *self.extra_disks)

    def volumes(self) -> list["Settings"]:
        """One view per volume, each with a single disk, its mount point, name and port: what the
        replication side of one volume (primary.py, secondary.py) is built from."""
        mounts: tuple[Path | None, ...] = (self.mount, *self.extra_mounts) if self.mount else (None,) * len(self.disks)
        return [dataclasses.replace(self, disk=disk, mount=mount, volume=volume_name(i), sync_port=volume_port(i),
                                    extra_disks=(), extra_mounts=())
                for i, (disk, mount) in enumerate(zip(self.disks, mounts))]

    def side_of(self, addresses: Iterable[ipaddress.IPv4Address]) -> str:
        """``primary`` or ``secondary``: which appliance of the settings owns these addresses.

        This is the *configured* side. The role an appliance plays can differ:
        after a takeover the configured secondary is the primary, and the old
        primary rejoins as secondary (see :class:`Endpoints`).
        """
        local = set(addresses)
        mine = [side for side, ip in (("primary", self.primary_ip), ("secondary", self.secondary_ip)) if ip in local]
        if len(mine) == 2:
            raise BadInput(
                f"This machine holds both {self.primary_ip} and {self.secondary_ip}; "
                "the primary and secondary must be two different appliances."
            )
        if not mine:
            raise BadInput(
                f"Neither --primary-ip {self.primary_ip} nor --secondary-ip {self.secondary_ip} is an address "
                "of this appliance; give the public addresses of the two appliances."
            )
        side = mine[0]
        sync_ip = self.endpoints(side).my_sync
        if sync_ip not in local:
            flag = "--primary-sync-ip" if side == "primary" else "--secondary-sync-ip"
            raise BadInput(
                f"This appliance is the {side} ({self.endpoints(side).my_public}) "
                f"but {flag} {sync_ip} is not one of its addresses; give its address on the sync link."
            )
        return side

    def endpoints(self, side: str) -> "Endpoints":
        if side == "primary":
            return Endpoints(self.primary_ip, self.primary_sync_ip, self.secondary_ip, self.secondary_sync_ip)
        return Endpoints(self.secondary_ip, self.secondary_sync_ip, self.primary_ip, self.primary_sync_ip)


def volume_name(index: int) -> str:
    return DEFAULT_VOLUME if index == 0 else f"r{index}"


def volume_port(index: int) -> int:
    return DEFAULT_SYNC_PORT if index == 0 else EXTRA_VOLUME_PORT_BASE + index


@dataclass(frozen=True)
class Endpoints:
    """This appliance's and its peer's addresses, whatever role each plays now."""

    my_public: ipaddress.IPv4Address
    my_sync: ipaddress.IPv4Address
    peer_public: ipaddress.IPv4Address
    peer_sync: ipaddress.IPv4Address


def _address(name: str, value: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(str(value).strip())
    except ValueError:
        raise BadInput(f"--{name.replace('_', '-')} {value!r} is not an IPv4 address; expected e.g. 198.18.0.11.") from None


def _interface(value: str) -> ipaddress.IPv4Interface:
    text = str(value).strip()
    if "/" not in text:
        raise BadInput(f"--floating-ip {value!r} has no prefix length; expected ADDRESS/PREFIX, e.g. 198.18.0.10/24.")
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise BadInput(f"--floating-ip {value!r} is not an IPv4 address with prefix; expected e.g. 198.18.0.10/24.") from None
    if iface.network.prefixlen >= 31:
        raise BadInput(f"--floating-ip {value!r} has prefix /{iface.network.prefixlen}; the public subnet must hold "
                       "both appliances and the floating address (a prefix of /30 or shorter).")
    return iface


def _interval(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise BadInput(f"--ping-interval {value!r} is not a number; expected seconds, e.g. 1 or 0.2.") from None
    if not (MIN_PING_INTERVAL <= seconds <= MAX_PING_INTERVAL) or seconds != seconds:
        raise BadInput(f"--ping-interval {value!r} is out of range; expected between {MIN_PING_INTERVAL} and "
                       f"{MAX_PING_INTERVAL:g} seconds.")
    return seconds


def _restart_limit(value: Any) -> int:
    if value in (None, ""):
        return DEFAULT_RESTART_LIMIT
    try:
        limit = int(value)
    except (TypeError, ValueError):
        raise BadInput(f"--restart-limit {value!r} is not a whole number; expected 0 to 100.") from None
    if not 0 <= limit <= 100:
        raise BadInput(f"--restart-limit {value!r} is out of range; expected 0 to 100.")
    return limit


def _resync_rate(value: Any) -> float:
    if value in (None, ""):
        return 0.0
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise BadInput(f"--resync-rate {value!r} is not a number; expected MiB/s, e.g. 100, or 0 for no limit.") from None
    if not (rate == 0 or 1 <= rate <= 100_000):  # NaN fails both
        raise BadInput(f"--resync-rate {value!r} is out of range; expected 0 (no limit) or 1 to 100000 MiB/s.")
    return rate


def _full_sync_threshold(value: Any) -> int:
    if value in (None, ""):
        return DEFAULT_FULL_SYNC_THRESHOLD
    try:
        percent = int(value)
    except (TypeError, ValueError):
        raise BadInput(f"--full-sync-threshold {value!r} is not a whole number; expected a percentage, 1 to 100.") from None
    if not 1 <= percent <= 100:
        raise BadInput(f"--full-sync-threshold {value!r} is out of range; expected 1 to 100 (100: never copy "
                       "the whole disk for a bitmap resync).")
    return percent


def _flag(value: Any) -> bool:
    return value in (True, "true", "True", "1", "yes")


def parse(options: Mapping[str, Any]) -> Settings:
    """Typed, self-consistent settings from option strings, or :class:`BadInput`."""
    missing = [k for k in REQUIRED if options.get(k) in (None, "")]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise BadInput(f"Missing {flags}; startHA needs all of them.")
    unknown = set(options) - set(FIELDS)
    if unknown:
        raise BadInput(f"Unknown setting(s) {', '.join(sorted(unknown))}.")
    primary = _address("primary_ip", options["primary_ip"])
    secondary = _address("secondary_ip", options["secondary_ip"])
    psync = _address("primary_sync_ip", options["primary_sync_ip"])
    ssync = _address("secondary_sync_ip", options["secondary_sync_ip"])
    floating = _interface(options["floating_ip"])
    interval = _interval(options["ping_interval"])
    if primary == secondary:
        raise BadInput(f"--primary-ip and --secondary-ip are both {primary}; the two appliances need different addresses.")
    if psync == ssync:
        raise BadInput(f"--primary-sync-ip and --secondary-sync-ip are both {psync}; each end of the sync link needs its own address.")
    subnet = floating.network
    for flag, ip in (("--primary-ip", primary), ("--secondary-ip", secondary)):
        if ip not in subnet:
            raise BadInput(f"--floating-ip {floating} is outside the public subnet of {flag} {ip}; "
                           f"expected an address in the same subnet as both appliances ({subnet} does not hold {ip}).")
    if floating.ip in (primary, secondary):
        raise BadInput(f"--floating-ip {floating.ip} is an appliance's own address; it must be a third, free address.")
    if floating.ip in (subnet.network_address, subnet.broadcast_address):
        raise BadInput(f"--floating-ip {floating} is the network or broadcast address of {subnet}.")
    for flag, ip in (("--primary-sync-ip", psync), ("--secondary-sync-ip", ssync)):
        if ip in subnet:
            raise BadInput(f"{flag} {ip} is on the public subnet {subnet}; the sync link must be a separate network "
                           "(the dedicated crossover cable).")
        if ip in (primary, secondary, floating.ip):
            raise BadInput(f"{flag} {ip} is also a public address; the sync link needs its own addresses.")
    witness = options.get("witness_ip")
    if witness and _address("witness_ip", witness) in (primary, secondary, floating.ip, psync, ssync):
        raise BadInput(f"--witness-ip {witness} is an address of the pair itself; the witness must be a third host "
                       "(e.g. the gateway).")
    mkfs = options.get("mkfs") or None
    if mkfs is not None and mkfs not in SUPPORTED_MKFS:
        raise BadInput(f"--mkfs {mkfs!r} is not supported; expected one of: {', '.join(SUPPORTED_MKFS)}.")
    if mkfs and not options.get("mount"):
        raise BadInput("--mkfs needs --mount: the new filesystem has to be mounted somewhere.")
    disks, mounts = _volumes(options["disk"], options.get("mount"))

    def path(key: str) -> Path | None:
        value = options.get(key)
        return Path(value).absolute() if value else None

    return Settings(
        primary_ip=primary,
        secondary_ip=secondary,
        primary_sync_ip=psync,
        secondary_sync_ip=ssync,
        floating_ip=floating,
        ping_interval=interval,
        disk=disks[0],
        mount=mounts[0] if mounts else None,
        extra_disks=disks[1:],
        extra_mounts=mounts[1:],
        mkfs=mkfs,
        start_script=path("start_script"),
        stop_script=path("stop_script"),
        secret_file=path("secret_file"),
        witness_ip=_address("witness_ip", options["witness_ip"]) if options.get("witness_ip") else None,
        restart_limit=_restart_limit(options.get("restart_limit")),
        resync_rate=_resync_rate(options.get("resync_rate")),
        checksum_sync=_flag(options.get("checksum_sync")),
        full_sync_threshold=_full_sync_threshold(options.get("full_sync_threshold")),
    )


def _paths(flag: str, value: Any) -> tuple[Path, ...]:
    values = [value] if isinstance(value, (str, os.PathLike)) else list(value or ())
    if any(not isinstance(v, (str, os.PathLike)) or not str(v).strip() for v in values):
        raise BadInput(f"{flag} {value!r} is not a path.")
    return tuple(Path(os.path.abspath(v)) for v in values)  # normalised: a/../a is a


def _volumes(disk: Any, mount: Any) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """--disk (once per volume) and --mount (none, or once per disk, in the same order)."""
    disks, mounts = _paths("--disk", disk), _paths("--mount", mount)
    if not disks:
        raise BadInput("Missing --disk; startHA needs all of them.")
    if len(disks) > MAX_VOLUMES:
        raise BadInput(f"--disk is given {len(disks)} times; a pair mirrors at most {MAX_VOLUMES} volumes.")
    if mounts and len(mounts) != len(disks):
        raise BadInput(f"--mount is given {len(mounts)} times for {len(disks)} disks; give one mount point per "
                       "--disk, in the same order, or none.")
    for flag, paths in (("--disk", disks), ("--mount", mounts)):
        twice = sorted({str(p) for p in paths if paths.count(p) > 1})
        if twice:
            raise BadInput(f"{flag} {twice[0]} is given twice; every volume needs its own.")
    return disks, mounts


def disk_size(path: Path) -> int:
    """Size in bytes of a block device or image file (open read-only, no lock)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def check_disk(path: Path) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"--disk {path} does not exist; give a block device or a fixed-size image file.") from None
    except OSError as exc:
        raise BadInput(f"--disk {path} cannot be examined ({exc.strerror}).") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise BadInput(f"--disk {path} is neither a block device nor a regular file.")
    if not os.access(path, os.R_OK | os.W_OK):
        raise BadInput(f"--disk {path} is not readable and writable by this user; mirrord needs read-write access.")
    size = disk_size(path)
    if size < 1 << 20 or size % 4096:
        raise BadInput(f"--disk {path} is {size} bytes; expected at least 1 MiB and a multiple of 4096 bytes.")
    return size


def check_mount_dir(path: Path) -> None:
    if not path.is_dir():
        raise BadInput(f"--mount {path} is not a directory; create an empty directory for the filesystem first.")
    if any(path.iterdir()):
        raise BadInput(f"--mount {path} is not empty; the mirrored filesystem needs an empty directory.")
    if os.path.ismount(path):
        raise BadInput(f"--mount {path} already has a filesystem mounted on it; unmount it or choose another directory.")


def check_script(flag: str, path: Path) -> None:
    if not path.is_file() or not os.access(path, os.X_OK):
        raise BadInput(f"{flag} {path} is not an executable file.")


def check_scripts(settings: Settings) -> None:
    for flag, script in (("--start-script", settings.start_script), ("--stop-script", settings.stop_script)):
        if script is not None:
            check_script(flag, script)


def read_secret(path: Path | None) -> bytes | None:
    """The shared secret in ``--secret-file`` without surrounding whitespace, or :class:`BadInput`."""
    if path is None:
        return None
    try:
        # stat first: opening a FIFO would block the daemon, and a directory is no secret
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BadInput(f"--secret-file {path} is not a regular file; give a file holding the shared secret.")
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        raise BadInput(f"--secret-file {path} does not exist; give a file holding the shared secret.") from None
    except OSError as exc:
        raise BadInput(f"--secret-file {path} cannot be read ({exc.strerror}); it must be readable by root.") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise BadInput(f"--secret-file {path} holds {len(secret)} bytes of secret; at least {MIN_SECRET_BYTES} are "
                       "needed (e.g. head -c 32 /dev/urandom | base64 > FILE, the same file on both appliances).")
    return secret


def check_local(settings: Settings, addresses: Iterable[ipaddress.IPv4Address]) -> str:
    """Validate against this machine (addresses, then every file option); returns this appliance's configured side."""
    role = settings.side_of(addresses)
    seen: dict[tuple[int, int], Path] = {}
    for one in settings.volumes():
        check_disk(one.disk)
        st = os.stat(one.disk)
        ident = (st.st_rdev, 0) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)
        if ident in seen:
            raise BadInput(f"--disk {one.disk} and --disk {seen[ident]} are the same disk; every volume needs its own.")
        seen[ident] = one.disk
        if one.mount is not None:  # the secondary mounts it too, when it takes over
            check_mount_dir(one.mount)
    check_scripts(settings)
    read_secret(settings.secret_file)
    return role


def merge(current: Settings, changes: Mapping[str, Any]) -> Settings:
    """configureHA: the current settings with ``changes`` applied, revalidated as a whole."""
    options = {k: v for k, v in current.to_json().items() if k in FIELDS}
    options.update({k: v for k, v in changes.items() if v is not None})
    return parse(options)


def save(home: Home, settings: Settings) -> None:
    atomicfile.write_json(home.settings_file, settings.to_json(), mode=0o600)


def load(home: Home) -> Settings | None:
    data = atomicfile.read_json(home.settings_file)
    if data is None:
        return None
    return parse({k: v for k, v in data.items() if k in FIELDS})
