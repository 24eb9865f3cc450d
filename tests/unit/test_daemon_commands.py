"""The daemon's commands on their own: every check before any change, and a failed stopHA can be retried.

The daemon runs in-process with a temporary MIRRORD_HOME; what needs a network (heartbeats, log
shipping, the witness, the replication sides, addresses) is replaced by fakes that record what was
done to them, so each test sees exactly what a command started, stopped or left running.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from mirrord import __version__, config
from mirrord import daemon as daemon_module
from mirrord.daemon import Daemon
from mirrord.errors import BadInput, MirrordError, Refused
from mirrord.modes import Mode
from mirrord.net import arp, floatip
from mirrord.paths import Home
from mirrord.replication import volume
from mirrord.replication.generations import Generations
from mirrord.replication.group import PrimaryGroup
from mirrord.replication.meta import DiskState, VolumeMeta
from mirrord.trace import peer_log_dir

A1 = {ipaddress.IPv4Address("198.18.0.11"), ipaddress.IPv4Address("198.19.0.1")}
A2 = {ipaddress.IPv4Address("198.18.0.12"), ipaddress.IPv4Address("198.19.0.2")}
SECRET = "a shared secret of the pair"


class FakePart:
    """Stands in for Heartbeat, LogReceiver, LogShipper and Witness."""

    made: list["FakePart"] = []
    ok = True  # as a witness: it answers

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        self.running = False
        self.stopped = False
        FakePart.made.append(self)

    def start(self) -> None:
        self.running = True

    def stop(self, *_: Any) -> None:
        self.running, self.stopped = False, True

    def send_once(self) -> None:
        pass

    def set_interval(self, interval: float) -> None:
        self.kwargs["interval"] = interval

    def silent_for(self, _network: str) -> float:
        return float("inf")  # the peer is never heard

    def peer_state(self, _network: str) -> None:
        return None

    def snapshot(self) -> dict[str, Any]:
        return {}


class FakePrimary:
    """A PrimaryGroup whose stop fails while ``busy`` (a mount point something still uses)."""

    def __init__(self) -> None:
        self.busy = False
        self.stopped = False
        self.lead = SimpleNamespace(server=None, resync={})
        self.sync_percent, self.last_error, self.in_sync = 0.0, "", False
        self.secret: bytes | None = None

    def connected(self) -> bool:
        return False

    def volumes_status(self) -> list[dict[str, Any]]:
        return []

    def release_alone(self) -> None:
        pass

    def set_settings(self, _volumes: list[Any], secret: bytes | None) -> None:
        self.secret = secret

    def stop(self) -> None:
        if self.busy:
            raise MirrordError("Could not unmount /srv/data (is an application still using it?): target is busy.")
        self.stopped = True


class FakeSecondary:
    def __init__(self) -> None:
        self.stopped = False
        self.outdated = False
        self.calls: list[str] = []
        self.disk_state, self.sync_percent, self.last_error = DiskState.UP_TO_DATE, 100.0, ""

    def connected(self) -> bool:
        return True

    def receiver_stats(self) -> dict[str, Any]:
        return {}

    def volumes_status(self) -> list[dict[str, Any]]:
        return []

    def leave(self) -> None:
        self.calls.append("leave")
        self.outdated = True

    def stop_following(self) -> None:
        self.calls.append("stop_following")

    def stop(self) -> None:
        self.calls.append("stop")
        self.stopped = True


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return path


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    FakePart.made = []
    for name in ("Heartbeat", "LogReceiver", "LogShipper", "Witness"):
        monkeypatch.setattr(daemon_module, name, FakePart)
    monkeypatch.setattr(daemon_module, "local_addresses", lambda: A1)
    monkeypatch.setattr(arp, "iface_for", lambda _ip: "eth0")
    monkeypatch.setattr(arp, "mac_of", lambda _iface: "02:00:00:00:00:01")
    monkeypatch.setattr(floatip, "held", lambda _ip: False)
    monkeypatch.setattr(floatip, "remove", lambda _ip: False)
    d = Daemon(Home(tmp_path / "home"), resume=False)
    d.control.start()
    try:
        yield d
    finally:
        d.control.stop()


def settings_for(disk: Path, **over: Any) -> config.Settings:
    options: dict[str, Any] = {
        "primary_ip": "198.18.0.11", "secondary_ip": "198.18.0.12", "primary_sync_ip": "198.19.0.1",
        "secondary_sync_ip": "198.19.0.2", "floating_ip": "198.18.0.10/24", "ping_interval": "0.05",
        "disk": str(disk)}
    options.update(over)
    return config.parse(options)


def running(d: Daemon, mode: Mode, settings: config.Settings, side: str) -> None:
    """Put the daemon in ``mode`` as if startHA had run, with fake companions."""
    d.settings, d.side, d.ends = settings, side, settings.endpoints(side)
    d.metas = [VolumeMeta()]
    d.secret = settings.secret_file.read_bytes().strip() if settings.secret_file else None
    d.heartbeat = FakePart(interval=daemon_module.tick_period(settings.ping_interval),  # type: ignore[assignment]
                           describe=d._describe)
    d.shipper, d.log_receiver = FakePart(), FakePart()  # type: ignore[assignment]
    for part in (d.heartbeat, d.shipper, d.log_receiver):
        part.start()
    d._set_mode(mode)
    config.save(d.home, settings)


def heartbeats(d: Daemon) -> list[FakePart]:
    return [p for p in FakePart.made if "describe" in p.kwargs]


def state_file(d: Daemon) -> dict[str, Any]:
    return json.loads(d.home.state_file.read_text())


# -- configureHA on the primary: a bad or new secret never silences the heartbeats --------------

@pytest.mark.parametrize("bad", ["missing", "empty", "directory"])
def test_configure_primary_bad_secret_file_changes_nothing(daemon: Daemon, disk: Path, secret_file: Path,
                                                           tmp_path: Path, bad: str) -> None:
    settings = settings_for(disk, secret_file=str(secret_file))
    running(daemon, Mode.PRIMARY, settings, "primary")
    daemon.primary = FakePrimary()  # type: ignore[assignment]
    beat = daemon.heartbeat
    path = tmp_path / bad
    if bad == "empty":
        path.write_text("")
    elif bad == "directory":
        path.mkdir()
    saved = daemon.home.settings_file.read_text()
    with pytest.raises(BadInput, match=f"--secret-file {path}"):
        daemon.configure_ha(secret_file=str(path), witness_ip="198.18.0.1")
    assert daemon.heartbeat is beat and isinstance(beat, FakePart) and beat.running
    assert daemon.settings is settings and daemon.home.settings_file.read_text() == saved
    assert daemon.witness is None


def test_configure_primary_whose_floating_ip_move_fails_keeps_the_old_address(
        daemon: Daemon, disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = settings_for(disk)
    running(daemon, Mode.PRIMARY, old, "primary")
    daemon.primary = FakePrimary()  # type: ignore[assignment]
    held = {old.floating_ip}
    monkeypatch.setattr(floatip, "add", lambda ip, _beside: held.add(ip))
    monkeypatch.setattr(floatip, "remove", lambda ip: ip in held and not held.remove(ip))
    monkeypatch.setattr(arp, "address_in_use", lambda *_, **__: None)

    def announce(*_: Any, **__: Any) -> int:
        raise MirrordError("Cannot use interface 'eth0' for ARP: Network is down.")

    monkeypatch.setattr(arp, "announce", announce)
    with pytest.raises(MirrordError, match="Network is down"):
        daemon.configure_ha(floating_ip="198.18.0.20/24")
    assert held == {old.floating_ip}, "the primary holds an address its settings do not name"
    assert daemon.settings is old and config.load(daemon.home) == old


def test_configure_refuses_a_new_secret_on_a_running_pair(daemon: Daemon, disk: Path, secret_file: Path,
                                                          tmp_path: Path) -> None:
    settings = settings_for(disk, secret_file=str(secret_file))
    running(daemon, Mode.PRIMARY, settings, "primary")
    daemon.primary = FakePrimary()  # type: ignore[assignment]
    beat = daemon.heartbeat
    other = tmp_path / "new-secret"
    other.write_text("another secret for the pair")
    with pytest.raises(Refused, match="Run stopHA on both appliances, then startHA with the new --secret-file") \
            as refused:
        daemon.configure_ha(secret_file=str(other))
    assert refused.value.exit_code == 3
    assert daemon.heartbeat is beat and beat.running and daemon.secret == SECRET.encode()
    assert daemon.settings is settings


def test_configure_accepts_the_same_secret_at_another_path_without_pausing_heartbeats(
        daemon: Daemon, disk: Path, secret_file: Path, tmp_path: Path) -> None:
    settings = settings_for(disk, secret_file=str(secret_file))
    running(daemon, Mode.PRIMARY, settings, "primary")
    primary = FakePrimary()
    daemon.primary = primary  # type: ignore[assignment]
    beat = daemon.heartbeat
    copy = tmp_path / "copy"
    copy.write_text(SECRET)
    message, _ = daemon.configure_ha(secret_file=str(copy), witness_ip="198.18.0.1")
    assert "secret_file" in message and "witness_ip" in message
    assert daemon.heartbeat is beat and beat.running, "the heartbeats paused"
    assert isinstance(daemon.witness, FakePart) and daemon.witness.running
    assert primary.secret == SECRET.encode()
    assert config.load(daemon.home) == daemon.settings


def test_configure_secondary_refuses_a_new_secret_before_leaving_ha(daemon: Daemon, disk: Path, secret_file: Path,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    monkeypatch.setattr(daemon_module, "local_addresses", lambda: A2)
    running(daemon, Mode.SECONDARY, settings_for(disk, secret_file=str(secret_file)), "secondary")
    secondary = FakeSecondary()
    daemon.secondary = secondary  # type: ignore[assignment]
    other = tmp_path / "new-secret"
    other.write_text("another secret for the pair")
    with pytest.raises(Refused, match="cannot change the shared secret"):
        daemon.configure_ha(secret_file=str(other))
    assert daemon.mode is Mode.SECONDARY and not secondary.stopped and daemon.heartbeat is not None


# -- configureHA on a secondary: checked before it leaves HA --------------------------------------

def test_configure_secondary_checks_the_new_disk_before_leaving_ha(daemon: Daemon, disk: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "local_addresses", lambda: A2)
    running(daemon, Mode.SECONDARY, settings_for(disk), "secondary")
    secondary = FakeSecondary()
    daemon.secondary = secondary  # type: ignore[assignment]
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.truncate(1 << 20)
    with open(other, "rb") as held:
        user = subprocess.Popen(["sleep", "600"], stdin=held)
    try:
        with pytest.raises(Refused, match=f"Disk {other} is in use by process {user.pid}"):
            daemon.configure_ha(disk=str(other))
    finally:
        user.kill()
        user.wait()
    assert daemon.mode is Mode.SECONDARY and daemon.secondary is secondary
    assert not secondary.stopped and not secondary.outdated
    assert state_file(daemon)["mode"] == "secondary"


def test_configure_secondary_starts_again_with_the_old_settings_if_the_new_ones_fail(
        daemon: Daemon, disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "local_addresses", lambda: A2)
    old = settings_for(disk)
    running(daemon, Mode.SECONDARY, old, "secondary")
    secondary = FakeSecondary()
    daemon.secondary = secondary  # type: ignore[assignment]
    starts: list[float] = []

    def start_ha(**options: Any) -> tuple[str, dict[str, Any]]:
        starts.append(float(options["ping_interval"]))
        if len(starts) == 1:
            raise Refused("The peer runs mirrord 9.9.")
        daemon._set_mode(Mode.SECONDARY)
        return "HA started", {}

    monkeypatch.setattr(daemon, "start_ha", start_ha)
    with pytest.raises(Refused, match="runs with its previous settings again: The peer runs mirrord 9.9."):
        daemon.configure_ha(ping_interval="0.2")
    assert starts == [0.2, 0.05], "the new settings first, then the old ones"
    assert daemon.mode is Mode.SECONDARY and config.load(daemon.home) == old
    # Leaving the pair: Outdated and no more following in one step (decision 47 b), then stopped.
    assert secondary.calls == ["leave", "stop"]


def test_configure_idle_gets_its_old_heartbeats_back_if_the_new_ones_cannot_start(
        daemon: Daemon, disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = settings_for(disk)
    running(daemon, Mode.IDLE, old, "primary")

    class Unbindable(FakePart):
        def start(self) -> None:
            if self.kwargs.get("interval") == daemon_module.tick_period(0.2):
                raise MirrordError("Cannot bind the heartbeat.")
            super().start()

    monkeypatch.setattr(daemon_module, "Heartbeat", Unbindable)
    with pytest.raises(MirrordError, match="Cannot bind the heartbeat"):
        daemon.configure_ha(ping_interval="0.2")
    assert daemon.settings is old and config.load(daemon.home) == old and daemon.mode is Mode.IDLE
    assert isinstance(daemon.heartbeat, Unbindable) and daemon.heartbeat.running
    assert daemon.heartbeat.kwargs["interval"] == daemon_module.tick_period(0.05)


# -- stopHA: a failure leaves the mode as it was, and the same command finishes the job -----------

def test_failed_stop_ha_keeps_the_mode_and_can_be_retried(daemon: Daemon, disk: Path) -> None:
    running(daemon, Mode.PRIMARY, settings_for(disk), "primary")
    primary = FakePrimary()
    primary.busy = True
    daemon.primary = primary  # type: ignore[assignment]
    with pytest.raises(MirrordError, match=r"/srv/data .*still primary.*run stopHA again"):
        daemon.stop_ha()
    assert daemon.mode is Mode.PRIMARY and state_file(daemon)["mode"] == "primary"
    assert daemon.primary is primary and daemon.heartbeat is not None
    assert daemon._describe()["mode"] == "primary"
    primary.busy = False
    message, data = daemon.stop_ha()
    assert message == "HA stopped: this appliance was primary and is now standalone."
    assert primary.stopped and daemon.primary is None and daemon.heartbeat is None
    assert data["mode"] == "standalone" and state_file(daemon)["mode"] == "standalone"
    assert daemon.stop_ha()[0] == "HA was not running; this appliance is standalone."


# -- failOver: never while a verify compares the disks (decision 42) ------------------------------

def test_fail_over_during_a_verify_is_refused_before_anything_is_stopped(daemon: Daemon, disk: Path) -> None:
    running(daemon, Mode.PRIMARY, settings_for(disk), "primary")
    primary = FakePrimary()
    primary.in_sync = True
    group = PrimaryGroup([SimpleNamespace()])  # type: ignore[list-item]
    primary.exclusive = group.exclusive  # type: ignore[attr-defined]
    daemon.primary = primary  # type: ignore[assignment]
    with group.exclusive("a verify runs"):
        with pytest.raises(Refused, match="mirrord verify is comparing the two disks"):
            daemon.fail_over()
    assert daemon.mode is Mode.PRIMARY and daemon.primary is primary and not primary.stopped
    with group.exclusive("a hand-over runs"):
        with pytest.raises(Refused, match="A failOver or another mirrord verify is under way"):
            group.verify()


# -- startHA: a refusal changes nothing -----------------------------------------------------------

def test_refused_start_ha_creates_no_metadata(daemon: Daemon, disk: Path) -> None:
    options = {k: v for k, v in settings_for(disk).to_json().items() if k in config.FIELDS and v is not None}
    with pytest.raises(Refused, match="no split brain"):
        daemon.start_ha(discard_my_data=True, **options)
    assert not daemon.home.meta_file("r0").exists()
    assert daemon.settings is None and daemon.heartbeat is None and daemon.mode is Mode.STANDALONE


def test_refused_start_ha_on_an_idle_appliance_keeps_its_settings_and_heartbeats(
        daemon: Daemon, disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(disk)
    running(daemon, Mode.IDLE, settings, "primary")
    daemon.metas[0].save(daemon.home, "r0")
    meta_before = daemon.home.meta_file("r0").read_bytes()
    options = {k: v for k, v in settings_for(disk, ping_interval="0.1").to_json().items()
               if k in config.FIELDS and v is not None}
    told: list[dict[str, Any]] = []

    class Listening(FakePart):
        def silent_for(self, network: str) -> float:
            told.append(self.kwargs["describe"]())
            return super().silent_for(network)

    monkeypatch.setattr(daemon_module, "Heartbeat", Listening)
    with pytest.raises(Refused, match="idle after a failOver and the peer is not primary"):
        daemon.start_ha(**options)
    # While it listened, the peer heard the settings this start would run with; now the old ones again.
    assert told and all(t["settings"]["ping_interval"] == 0.1 for t in told)
    assert daemon._describe()["settings"]["ping_interval"] == 0.05
    assert daemon.mode is Mode.IDLE and daemon.settings is settings and daemon.side == "primary"
    assert daemon.heartbeat is not None and daemon.heartbeat is heartbeats(daemon)[-1]
    assert daemon.heartbeat.running and daemon.heartbeat.kwargs["interval"] == daemon_module.tick_period(0.05)
    assert daemon.home.meta_file("r0").read_bytes() == meta_before
    assert config.load(daemon.home) == settings


def test_start_ha_with_an_empty_secret_file_is_bad_input(daemon: Daemon, disk: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    options = {k: v for k, v in settings_for(disk, secret_file=str(empty)).to_json().items()
               if k in config.FIELDS and v is not None}
    with pytest.raises(BadInput, match="holds 0 bytes of secret"):
        daemon.start_ha(**options)
    assert daemon.heartbeat is None and not daemon.home.meta_file("r0").exists()


# -- startHA that fails after its checks: put back as it was (decision 36) ------------------------

class BusyPort:
    """A SecondarySide whose port another process holds; ``free_for`` names a pingInterval that listens."""

    free_for: float | None = None
    made: list["BusyPort"] = []

    def __init__(self, _home: Home, settings: config.Settings, *_: Any, **__: Any) -> None:
        self.settings = settings
        self.running = False
        BusyPort.made.append(self)

    def start(self) -> None:
        if self.settings.ping_interval != BusyPort.free_for:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self.running = True

    def stop(self) -> None:
        self.running = False


class PrimaryPeer(FakePart):
    """Heartbeats that hear the peer say it is primary (an idle appliance may then start as secondary)."""

    def silent_for(self, _network: str) -> float:
        return 0.0

    def peer_state(self, _network: str) -> dict[str, Any]:
        return {"mode": "primary", "version": __version__}


@pytest.fixture
def busy_port(monkeypatch: pytest.MonkeyPatch) -> None:
    BusyPort.free_for, BusyPort.made = None, []
    monkeypatch.setattr(daemon_module, "SecondarySide", BusyPort)


def options_of(settings: config.Settings) -> dict[str, Any]:
    return {k: v for k, v in settings.to_json().items() if k in config.FIELDS and v is not None}


def test_start_ha_as_secondary_that_cannot_listen_keeps_the_previous_settings(
        daemon: Daemon, disk: Path, busy_port: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "local_addresses", lambda: A2)
    old = settings_for(disk)  # left by an earlier HA session, after its stopHA
    config.save(daemon.home, old)
    daemon.settings = old
    with pytest.raises(MirrordError, match=r"Cannot listen on 198\.19\.0\.2:7788: Address already in use"):
        daemon.start_ha(**options_of(settings_for(disk, ping_interval="0.1")))
    assert daemon.settings is old and daemon.side is None and daemon.ends is None and daemon.metas == []
    assert daemon.mode is Mode.STANDALONE and state_file(daemon) == {"mode": "standalone", "side": None}
    assert config.load(daemon.home) == old and daemon.status()[1]["settings"]["ping_interval"] == 0.05
    assert daemon.heartbeat is None and all(not p.running for p in FakePart.made)


def test_start_ha_as_primary_that_cannot_expose_its_disk_keeps_no_settings(
        daemon: Daemon, disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Unmountable(FakePrimary):
        def start(self) -> None:
            raise MirrordError("Could not mount /srv/data: wrong fs type.")

    monkeypatch.setattr(daemon, "_primary_group", lambda *_: Unmountable())
    with pytest.raises(MirrordError, match="Could not mount /srv/data"):
        daemon.start_ha(**options_of(settings_for(disk)))
    assert daemon.settings is None and daemon.side is None and daemon.primary is None
    assert daemon.mode is Mode.STANDALONE and not daemon.home.settings_file.exists()
    assert daemon.status()[1]["settings"] is None
    assert daemon.heartbeat is None and all(not p.running for p in FakePart.made)


def test_start_ha_on_an_idle_appliance_that_cannot_listen_gets_its_old_heartbeats_back(
        daemon: Daemon, disk: Path, busy_port: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "Heartbeat", PrimaryPeer)
    old = settings_for(disk)
    running(daemon, Mode.IDLE, old, "primary")
    with pytest.raises(MirrordError, match="Cannot listen on 198.19.0.1:7788"):
        daemon.start_ha(**options_of(settings_for(disk, ping_interval="0.1")))
    assert daemon.mode is Mode.IDLE and daemon.settings is old and daemon.side == "primary"
    assert config.load(daemon.home) == old and state_file(daemon) == {"mode": "idle", "side": "primary"}
    assert daemon.heartbeat is not None and daemon.heartbeat is heartbeats(daemon)[-1] and daemon.heartbeat.running
    assert daemon.heartbeat.kwargs["interval"] == daemon_module.tick_period(0.05)
    assert daemon._describe()["settings"]["ping_interval"] == 0.05


def test_start_ha_on_an_inconsistent_appliance_that_cannot_listen_waits_for_the_primary_again(
        daemon: Daemon, disk: Path, busy_port: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "local_addresses", lambda: A2)
    old = settings_for(disk)
    running(daemon, Mode.INCONSISTENT, old, "secondary")
    VolumeMeta(disk_state=DiskState.INCONSISTENT).save(daemon.home, "r0")
    cut_short = FakeSecondary()
    daemon.secondary = cut_short  # type: ignore[assignment]
    BusyPort.free_for = 0.05  # the new settings' port is taken; the old one is free again once released
    with pytest.raises(MirrordError, match="Cannot listen on 198.19.0.2:7788"):
        daemon.start_ha(**options_of(settings_for(disk, ping_interval="0.1")))
    assert cut_short.stopped, "a new start begins with a fresh secondary"
    assert daemon.mode is Mode.INCONSISTENT and daemon.settings is old and config.load(daemon.home) == old
    assert [p.settings.ping_interval for p in BusyPort.made] == [0.1, 0.05]
    assert daemon.secondary is not None and daemon.secondary.lead is BusyPort.made[-1] and BusyPort.made[-1].running
    assert daemon.metas[0].disk_state is DiskState.INCONSISTENT
    assert daemon.heartbeat is heartbeats(daemon)[-1] and daemon.heartbeat.running
    assert daemon.heartbeat.kwargs["interval"] == daemon_module.tick_period(0.05)


def test_configure_secondary_whose_restarts_both_fail_is_standalone_with_the_previous_settings(
        daemon: Daemon, disk: Path, busy_port: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "local_addresses", lambda: A2)
    old = settings_for(disk)
    running(daemon, Mode.SECONDARY, old, "secondary")
    daemon.secondary = FakeSecondary()  # type: ignore[assignment]
    checks: list[Path] = []

    def ensure_unused(path: Path) -> None:
        # Checked by configureHA, by the start with the new settings, then by the start with the
        # old ones: by then another process has opened the disk.
        checks.append(path)
        if len(checks) == 3:
            raise Refused(f"Disk {path} is in use by process 4242 (dd).")

    monkeypatch.setattr(volume, "ensure_unused", ensure_unused)
    with pytest.raises(MirrordError, match="Cannot listen on .* Starting again with the previous settings failed "
                                           "too: Disk .* in use .* This appliance is standalone: run startHA"):
        daemon.configure_ha(ping_interval="0.2")
    assert daemon.mode is Mode.STANDALONE and daemon.settings is old and daemon.side is None
    assert config.load(daemon.home) == old and daemon.status()[1]["settings"]["ping_interval"] == 0.05
    assert daemon.heartbeat is None and daemon.secondary is None


# -- mirrord trace on a daemon that is not (or no longer) in HA ----------------------------------

def test_trace_names_both_appliances_from_the_saved_settings(daemon: Daemon, disk: Path) -> None:
    config.save(daemon.home, settings_for(disk))
    daemon.settings = config.load(daemon.home)
    (daemon.home.log_dir / "ha.log").write_text("mine\n")
    peer_log_dir(daemon.home).mkdir(parents=True, exist_ok=True)
    (peer_log_dir(daemon.home) / "198.18.0.12_ha.log").write_text("theirs\n")
    with zipfile.ZipFile(daemon.trace()[1]["path"]) as zf:
        names = set(zf.namelist())
    assert {"198.18.0.11_ha.log", "198.18.0.12_ha.log"} <= names


# -- a disk left mid-sync stays Inconsistent, and is not backed up -------------------------------

def test_teardown_keeps_an_inconsistent_disk_inconsistent(tmp_path: Path, disk: Path) -> None:
    from mirrord.halog import HALog
    from mirrord.replication.group import SecondaryGroup
    from mirrord.replication.secondary import SecondarySide

    home = Home(tmp_path / "home")
    home.ensure()
    settings = settings_for(disk)
    for before, after in ((DiskState.INCONSISTENT, DiskState.INCONSISTENT), (DiskState.UP_TO_DATE, DiskState.OUTDATED)):
        meta = VolumeMeta(disk_state=before)
        meta.save(home, "r0")
        side = SecondarySide(home, settings.volumes()[0], HALog(home), 1 << 20, meta, settings.endpoints("secondary"),
                             lambda: None, None)
        try:
            SecondaryGroup([side]).outdate()
        finally:
            side.stop()
        assert meta.disk_state is after and VolumeMeta.load(home, "r0").disk_state is after


def test_backup_refuses_an_inconsistent_disk_and_warns_about_an_outdated_one(daemon: Daemon, disk: Path,
                                                                             tmp_path: Path) -> None:
    config.save(daemon.home, settings_for(disk))
    daemon.settings = config.load(daemon.home)
    VolumeMeta(disk_state=DiskState.INCONSISTENT).save(daemon.home, "r0")
    with pytest.raises(Refused, match="This disk is Inconsistent"):
        daemon.backup(str(tmp_path / "one.tar"))
    assert not (tmp_path / "one.tar").exists()
    VolumeMeta(disk_state=DiskState.OUTDATED).save(daemon.home, "r0")
    message, _ = daemon.backup(str(tmp_path / "two.tar"))
    assert "Warning: this disk is Outdated" in message and (tmp_path / "two.tar").exists()


# -- a copy that may lack acknowledged writes is served only on the operator's word (decision 41) ---

class Serving(FakePrimary):
    def start(self) -> None:
        pass


@pytest.fixture
def can_serve(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "_primary_group", lambda *_: Serving())
    monkeypatch.setattr(floatip, "add", lambda *_: None)
    monkeypatch.setattr(arp, "announce", lambda *_, **__: None)


def test_start_ha_refuses_to_serve_the_copy_a_secondary_left_behind(daemon: Daemon, disk: Path,
                                                                   can_serve: None) -> None:
    VolumeMeta(following=True).save(daemon.home, "r0")
    before = daemon.home.meta_file("r0").read_bytes()
    with pytest.raises(Refused, match="was last the secondary's copy.*startHA --force"):
        daemon.start_ha(**options_of(settings_for(disk)))
    assert daemon.home.meta_file("r0").read_bytes() == before
    assert daemon.mode is Mode.STANDALONE and daemon.primary is None and not daemon.home.settings_file.exists()


def test_start_ha_refuses_to_serve_a_crashed_primarys_copy_while_its_peer_is_silent(
        daemon: Daemon, disk: Path, can_serve: None) -> None:
    """The secondary may have taken over after the crash and acknowledged writes before it died too
    (the session 8 review): only the operator, or the peer's identifiers, can say it did not."""
    VolumeMeta(primary_open=True, gen=Generations(OURS, OLDER)).save(daemon.home, "r0")
    before = daemon.home.meta_file("r0").read_bytes()
    with pytest.raises(Refused, match="crashed as primary.*does not answer.*startHA --force"):
        daemon.start_ha(**options_of(settings_for(disk)))
    assert daemon.home.meta_file("r0").read_bytes() == before  # the crash is still to be recovered


def _peer_says(daemon: Daemon, monkeypatch: pytest.MonkeyPatch, gen: Generations, busy: str | None = None) -> None:
    state = {"mode": "secondary", "version": __version__, "gen": gen.to_json(), "epoch": 0, "busy": busy}
    monkeypatch.setattr(daemon, "_peer_view", lambda: (0.0, 0.0, state))


#: This copy's generation, the one before it, and one the peer moved to without us.
OURS, OLDER, THEIRS = "00000000000000a1", "00000000000000a0", "00000000000000b1"


@pytest.mark.parametrize(("theirs", "refused"), [
    (Generations(OURS), ""),                          # r40: the same data generation
    (Generations(OLDER), ""),                         # r70: ours is newer, a bitmap resync to the peer
    (Generations(THEIRS, OURS), "holds newer data"),  # r50: it took over from our generation
    (Generations(THEIRS, "", (OURS,)), "holds newer data"),  # r60: further on than its bitmap reaches
])
@pytest.mark.parametrize("mark", ["following", "primary_open"])
def test_a_copy_that_may_be_behind_is_served_when_the_answering_peer_is_not_newer(
        daemon: Daemon, disk: Path, can_serve: None, monkeypatch: pytest.MonkeyPatch,
        theirs: Generations, refused: str, mark: str) -> None:
    VolumeMeta(gen=Generations(OURS, OLDER), **{mark: True}).save(daemon.home, "r0")
    _peer_says(daemon, monkeypatch, theirs)
    if refused:
        with pytest.raises(Refused, match=refused):
            daemon.start_ha(**options_of(settings_for(disk)))
        assert daemon.primary is None and not daemon.home.settings_file.exists()
    else:
        message, _ = daemon.start_ha(**options_of(settings_for(disk)))
        assert "is the primary" in message and not VolumeMeta.load(daemon.home, "r0").following


def test_start_ha_waits_for_a_peer_that_is_taking_over(daemon: Daemon, disk: Path, can_serve: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Its heartbeat still says secondary and its identifiers have not moved yet: asking now would
    let both appliances become primary."""
    VolumeMeta(gen=Generations(OURS, OLDER)).save(daemon.home, "r0")
    _peer_says(daemon, monkeypatch, Generations(OURS), busy="taking over")
    with pytest.raises(Refused, match=r"The peer is busy \(taking over\)"):
        daemon.start_ha(**options_of(settings_for(disk)))
    assert daemon.primary is None


def test_an_outdated_copy_the_answering_peer_lets_serve_is_recorded_up_to_date(
        daemon: Daemon, disk: Path, can_serve: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A secondary's stopHA left it Outdated; its peer, waiting as its secondary, is older: it serves,
    and a later start with the peer silent must not ask for --force because of the old mark."""
    VolumeMeta(disk_state=DiskState.OUTDATED, gen=Generations(OURS, OLDER)).save(daemon.home, "r0")
    _peer_says(daemon, monkeypatch, Generations(OLDER))
    daemon.start_ha(**options_of(settings_for(disk)))
    assert VolumeMeta.load(daemon.home, "r0").disk_state is DiskState.UP_TO_DATE


def test_copies_that_changed_apart_serve_a_copy_that_may_be_behind_only_when_forced(
        daemon: Daemon, disk: Path, can_serve: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Split brain with the peer answering: its identifiers vouch for nothing, and --force (refused
    while a peer answers that could be asked) is how the operator picks this copy."""
    VolumeMeta(following=True, gen=Generations(OURS, OLDER)).save(daemon.home, "r0")
    _peer_says(daemon, monkeypatch, Generations(THEIRS, OLDER))  # r90: both went on from OLDER
    with pytest.raises(Refused, match="changed apart"):
        daemon.start_ha(**options_of(settings_for(disk)))
    message, _ = daemon.start_ha(force=True, **options_of(settings_for(disk)))
    assert "is the primary" in message


def test_start_ha_force_is_refused_while_a_peer_answers_that_settles_it(
        daemon: Daemon, disk: Path, can_serve: None, monkeypatch: pytest.MonkeyPatch) -> None:
    VolumeMeta(following=True, gen=Generations(OURS, OLDER)).save(daemon.home, "r0")
    _peer_says(daemon, monkeypatch, Generations(OLDER))
    with pytest.raises(Refused, match="--force is for an appliance whose peer is lost for good"):
        daemon.start_ha(force=True, **options_of(settings_for(disk)))


@pytest.mark.parametrize("state", [DiskState.UP_TO_DATE, DiskState.OUTDATED])
def test_start_ha_force_serves_the_own_copy_and_says_so(daemon: Daemon, disk: Path, can_serve: None,
                                                        state: DiskState) -> None:
    VolumeMeta(disk_state=state, following=True, epoch=4).save(daemon.home, "r0")
    message, data = daemon.start_ha(force=True, **options_of(settings_for(disk)))
    assert "is the primary" in message and daemon.mode is Mode.PRIMARY
    saved = VolumeMeta.load(daemon.home, "r0")
    assert (saved.disk_state, saved.following, saved.epoch) == (DiskState.UP_TO_DATE, False, 5)
    assert data["disk"]["following"] is False
    log = (daemon.home.log_dir / "ha.log").read_text()
    assert "startHA --force: serving this appliance's copy" in log


def test_start_ha_force_never_serves_half_copied_data(daemon: Daemon, disk: Path, can_serve: None) -> None:
    VolumeMeta(disk_state=DiskState.INCONSISTENT, following=True).save(daemon.home, "r0")
    with pytest.raises(Refused, match="Inconsistent.*not even with --force"):
        daemon.start_ha(force=True, **options_of(settings_for(disk)))
    assert VolumeMeta.load(daemon.home, "r0").disk_state is DiskState.INCONSISTENT and daemon.primary is None


def test_start_ha_force_where_it_is_not_needed_or_cannot_apply_is_refused(
        daemon: Daemon, disk: Path, can_serve: None, monkeypatch: pytest.MonkeyPatch) -> None:
    VolumeMeta(epoch=2).save(daemon.home, "r0")
    with pytest.raises(Refused, match="--force is not needed"):
        daemon.start_ha(force=True, **options_of(settings_for(disk)))
    monkeypatch.setattr(daemon_module, "local_addresses", lambda: A2)  # the configured secondary
    with pytest.raises(Refused, match="it becomes the secondary here"):
        daemon.start_ha(force=True, **options_of(settings_for(disk)))
    assert VolumeMeta.load(daemon.home, "r0").epoch == 2 and daemon.mode is Mode.STANDALONE


def test_a_secondary_marks_its_copy_following_before_it_listens(daemon: Daemon, disk: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    class Listening(BusyPort):
        def start(self) -> None:
            seen.append(VolumeMeta.load(daemon.home, self.settings.volume).following)
            super().start()  # then fails: the port is busy

    monkeypatch.setattr(daemon_module, "SecondarySide", Listening)
    monkeypatch.setattr(daemon_module, "local_addresses", lambda: A2)
    with pytest.raises(MirrordError, match="Cannot listen"):
        daemon.start_ha(**options_of(settings_for(disk)))
    # Marked although the start failed: a mark too many only asks for --force, one too few loses writes.
    assert seen == [True] and VolumeMeta.load(daemon.home, "r0").following is True


def test_backup_warns_about_the_copy_a_secondary_left_behind(daemon: Daemon, disk: Path, tmp_path: Path) -> None:
    config.save(daemon.home, settings_for(disk))
    daemon.settings = config.load(daemon.home)
    VolumeMeta(following=True).save(daemon.home, "r0")
    message, _ = daemon.backup(str(tmp_path / "b.tar"))
    assert "Warning: this disk was last the secondary's copy" in message


def test_status_of_a_daemon_started_standalone_shows_the_saved_disks(daemon: Daemon, disk: Path) -> None:
    config.save(daemon.home, settings_for(disk))
    daemon.settings = config.load(daemon.home)
    VolumeMeta(disk_state=DiskState.OUTDATED, following=True).save(daemon.home, "r0")
    data = daemon.status()[1]
    assert data["mode"] == "standalone" and data["disk"]["state"] == "Outdated" and data["disk"]["following"]
    assert [v["state"] for v in data["volumes"]] == ["Outdated"]
    VolumeMeta(primary_open=True).save(daemon.home, "r0")  # crashed as primary: its peer may have taken over
    assert daemon.status()[1]["disk"]["following"] is True
    daemon.home.meta_file("r0").write_text("{not json")
    assert daemon.status()[1]["disk"]["state"] == "Unknown"  # startHA names the problem


# -- ha.json is saved before a command changes anything with it ------------------------------------

def _no_space(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_: Any, **__: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(config.atomicfile, "write_json", full)


def test_start_ha_whose_settings_cannot_be_saved_starts_nothing(daemon: Daemon, disk: Path, can_serve: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    monkeypatch.setattr(daemon, "_new_term", lambda: started.append("primary"))
    _no_space(monkeypatch)
    with pytest.raises(MirrordError, match="Cannot save the HA settings .*No space left on device. Nothing was "
                                           "changed"):
        daemon.start_ha(**options_of(settings_for(disk)))
    assert started == [] and daemon.primary is None and daemon.mode is Mode.STANDALONE
    assert daemon.settings is None and not daemon.home.settings_file.exists()


def test_start_ha_that_fails_after_saving_its_settings_puts_the_old_ones_back(
        daemon: Daemon, disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = settings_for(disk)
    config.save(daemon.home, old)
    daemon.settings = old

    class Unmountable(FakePrimary):
        def start(self) -> None:
            assert config.load(daemon.home).ping_interval == 0.1  # saved before anything ran
            raise MirrordError("Could not mount /srv/data: wrong fs type.")

    monkeypatch.setattr(daemon, "_primary_group", lambda *_: Unmountable())
    with pytest.raises(MirrordError, match="Could not mount"):
        daemon.start_ha(**options_of(settings_for(disk, ping_interval="0.1")))
    assert config.load(daemon.home) == old and daemon.settings is old


def test_configure_primary_whose_settings_cannot_be_saved_changes_nothing(
        daemon: Daemon, disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(disk)
    running(daemon, Mode.PRIMARY, settings, "primary")
    daemon.primary = FakePrimary()  # type: ignore[assignment]
    interval = daemon.heartbeat.kwargs["interval"]  # type: ignore[union-attr]
    _no_space(monkeypatch)
    with pytest.raises(MirrordError, match="Cannot save the HA settings"):
        daemon.configure_ha(ping_interval="0.2")
    assert daemon.settings is settings and daemon.heartbeat.kwargs["interval"] == interval  # type: ignore[union-attr]


class Unservable(FakePrimary):
    def start(self) -> None:
        raise MirrordError("Could not mount /srv/data: wrong fs type.")


@pytest.mark.parametrize("state", [DiskState.UP_TO_DATE, DiskState.OUTDATED])
def test_a_forced_start_that_fails_leaves_the_copy_marked(daemon: Daemon, disk: Path, can_serve: None,
                                                           monkeypatch: pytest.MonkeyPatch, state: DiskState) -> None:
    VolumeMeta(disk_state=state, following=True).save(daemon.home, "r0")
    monkeypatch.setattr(daemon, "_primary_group", lambda *_: Unservable())
    with pytest.raises(MirrordError, match="Could not mount"):
        daemon.start_ha(force=True, **options_of(settings_for(disk)))
    saved = VolumeMeta.load(daemon.home, "r0")
    assert (saved.disk_state, saved.following) == (state, True)  # the next start needs --force again


def test_a_takeover_that_cannot_serve_leaves_the_copy_marked(daemon: Daemon, disk: Path, can_serve: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(disk)
    running(daemon, Mode.SECONDARY, settings, "secondary")
    daemon.metas = [VolumeMeta(following=True)]
    daemon.metas[0].save(daemon.home, "r0")
    monkeypatch.setattr(arp, "address_in_use", lambda *_, **__: None)
    monkeypatch.setattr(daemon, "_primary_group", lambda *_: Unservable())
    with pytest.raises(MirrordError, match="Could not mount"):
        daemon._promote(daemon_module.Event.TAKEOVER, "the primary is silent")
    assert daemon.mode is Mode.STANDALONE and VolumeMeta.load(daemon.home, "r0").following
    monkeypatch.setattr(daemon, "_primary_group", lambda *_: Serving())
    running(daemon, Mode.SECONDARY, settings, "secondary")
    daemon.metas = [VolumeMeta(following=True)]
    daemon._promote(daemon_module.Event.TAKEOVER, "the primary is silent")
    assert daemon.mode is Mode.PRIMARY and not VolumeMeta.load(daemon.home, "r0").following


@pytest.mark.parametrize("became", [
    {"disk_state": DiskState.INCONSISTENT, "verify_found": True},  # a verify's out_of_sync came
    {"disk_state": DiskState.INCONSISTENT},  # a primary back from a freeze began its resync
])
def test_a_takeover_refuses_a_disk_state_that_changed_before_it_stopped_following(
        daemon: Daemon, disk: Path, can_serve: None, monkeypatch: pytest.MonkeyPatch, became: dict[str, Any]) -> None:
    """Decision 47 (c): what the takeover checked first may change until the secondary stops
    following; checked again then, a changed state refuses and the appliance follows anew."""
    settings = settings_for(disk)
    running(daemon, Mode.SECONDARY, settings, "secondary")
    daemon.metas = [VolumeMeta(following=True)]
    daemon.metas[0].save(daemon.home, "r0")
    old, fresh = FakeSecondary(), FakeSecondary()
    old.stop_following = lambda: daemon.metas[0].update(daemon.home, "r0", **became)  # type: ignore[method-assign]
    daemon.secondary = old  # type: ignore[assignment]
    monkeypatch.setattr(arp, "address_in_use", lambda *_, **__: None)
    monkeypatch.setattr(daemon, "_start_secondary", lambda *_: fresh)
    with pytest.raises(Refused, match="became Inconsistent while the takeover began"):
        daemon._promote(daemon_module.Event.TAKEOVER, "the primary is silent")
    assert daemon.mode is Mode.SECONDARY and old.stopped and daemon.secondary is fresh and not fresh.stopped
    assert VolumeMeta.load(daemon.home, "r0").disk_state is DiskState.INCONSISTENT  # not served, not marked UpToDate


def test_a_restore_cut_short_leaves_the_disk_inconsistent(daemon: Daemon, disk: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config.save(daemon.home, settings_for(disk))
    daemon.settings = config.load(daemon.home)
    VolumeMeta(epoch=3).save(daemon.home, "r0")
    daemon.backup(str(tmp_path / "b.tar"))

    def cut_short(_src: Path, _manifest: dict[str, Any], target: Path) -> None:
        with open(target, "r+b") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(daemon_module.archive, "restore_disk", cut_short)
    with pytest.raises(MirrordError, match="stopped part way.*marked Inconsistent.*run mirrord restore again"):
        daemon.restore(str(tmp_path / "b.tar"))
    assert VolumeMeta.load(daemon.home, "r0").disk_state is DiskState.INCONSISTENT


def test_start_ha_force_is_refused_while_the_peer_answers(daemon: Daemon, disk: Path, can_serve: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    class StandalonePeer(PrimaryPeer):
        def peer_state(self, _network: str) -> dict[str, Any]:
            return {"mode": "standalone", "version": __version__}

    monkeypatch.setattr(daemon_module, "Heartbeat", StandalonePeer)
    VolumeMeta(disk_state=DiskState.OUTDATED, following=True).save(daemon.home, "r0")
    with pytest.raises(Refused, match=r"198\.18\.0\.12 answers \(standalone\): start HA there first"):
        daemon.start_ha(force=True, **options_of(settings_for(disk)))
    assert VolumeMeta.load(daemon.home, "r0").disk_state is DiskState.OUTDATED and daemon.primary is None
