"""The operator packaging: the systemd unit and the two-VM Vagrant lab.

Nothing here starts a VM or a daemon: the unit is parsed, the provisioning
script is syntax-checked (and linted with shellcheck when it is installed) and
asked for the startHA command it prints, and the Vagrantfile is syntax-checked
with ruby when it is installed. The addresses must be the namespace lab's.
"""

from __future__ import annotations

import configparser
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from mirrord import config
from mirrord.net import lab
from under_ci import skip_or_fail, under_ci

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "mirrord.service"
PROVISION = ROOT / "vagrant" / "provision.sh"
VAGRANTFILE = ROOT / "vagrant" / "Vagrantfile"
CONSOLE_SCRIPTS = ("mirrord", "startHA", "configureHA", "stopHA", "failOver", "HAstatus")
ROLES = {"a1": "primary", "a2": "secondary"}  # the lab's first roles


def _run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- the unit


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_sections(unit: configparser.ConfigParser) -> None:
    assert {"Unit", "Service", "Install"} <= set(unit.sections())


def test_unit_ordering_and_install(unit: configparser.ConfigParser) -> None:
    assert "network-online.target" in unit["Unit"]["After"].split()
    assert "network-online.target" in unit["Unit"]["Wants"].split()
    assert unit["Install"]["WantedBy"].split() == ["multi-user.target"]


def test_unit_runs_the_daemon_in_the_foreground(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert shlex.split(service["ExecStart"]) == ["/usr/local/bin/mirrord", "daemon"]
    assert service.get("Type", "simple") == "simple"  # `mirrord daemon` does not fork
    assert service["Environment"] == "MIRRORD_HOME=/var/lib/mirrord"
    # `daemon` really is a subcommand of the installed `mirrord`
    from mirrord_cli.main import mirrord as mirrord_group

    assert "daemon" in mirrord_group.commands


def test_unit_restart_and_stop_policy(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["RestartSec"] == "2"
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) >= 60  # long enough for a stopHA-like teardown
    assert int(service["LimitNOFILE"]) >= 4096


def test_unit_documents_its_assumptions() -> None:
    comments = " ".join(line.lstrip().lstrip("#") for line in UNIT.read_text().splitlines()
                        if line.lstrip().startswith("#"))
    assert "/usr/local/bin" in comments
    assert "standalone" in comments
    assert re.search(r"never\s+resumes?\s+as\s+primary", comments)
    assert "resumes as secondary by itself only if" in comments and "stopHA is final" in comments


# --------------------------------------------------------------------------- provision.sh


def test_provision_sh_syntax() -> None:
    result = _run("bash", "-n", str(PROVISION))
    assert result.returncode == 0, result.stderr


def test_provision_sh_lint() -> None:
    """shellcheck (Debian's shellcheck package; `make test` installs it)."""
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        skip_or_fail("shellcheck is not installed (apt-get install shellcheck; `make test` does it)")
    result = _run(shellcheck, "-x", str(PROVISION))
    assert result.returncode == 0, result.stdout + result.stderr


def test_provision_sh_installs_what_operators_need() -> None:
    text = PROVISION.read_text()
    for command in CONSOLE_SCRIPTS:
        assert re.search(rf"\b{command}\b", text.split("COMMANDS=(", 1)[1].split(")", 1)[0]), command
    for package in ("fuse3", "libfuse3-dev", "pkg-config", "gcc", "e2fsprogs", "python3-venv", "python3-dev", "git"):
        assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", text), package
    assert "/vagrant-src" in text and "/opt/mirrord" in text
    assert "packaging/mirrord.service" in text
    assert "systemctl enable --now mirrord" in text
    assert "truncate -s" in text  # sparse image, not a 1 GiB write


@pytest.mark.parametrize("argv", [[], ["a3"], ["client"], ["a1", "a2"], ["--print-only"]])
def test_provision_sh_rejects_bad_node_names(argv: list[str]) -> None:
    result = _run("bash", str(PROVISION), *argv)
    assert result.returncode == 2
    assert "usage" in result.stderr


def _printed_startha(node: str) -> list[str]:
    result = _run("bash", str(PROVISION), "--print-only", node)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    argv = shlex.split(lines[0])
    assert argv[0] == "startHA"
    return argv[1:]


@pytest.mark.parametrize("node", ["a1", "a2"])
def test_printed_startha_uses_the_namespace_labs_addresses(node: str) -> None:
    from mirrord_cli.iwd import given, start_ha

    args = _printed_startha(node)
    params = start_ha.make_context("startHA", list(args)).params  # the real parser
    options = given(params)
    assert options["primary_ip"] == lab.PUBLIC_IP["a1"]
    assert options["secondary_ip"] == lab.PUBLIC_IP["a2"]
    assert options["primary_sync_ip"] == lab.SYNC_IP["a1"]
    assert options["secondary_sync_ip"] == lab.SYNC_IP["a2"]
    assert options["floating_ip"] == f"{lab.FLOATING_IP}/{lab.FLOATING_PREFIX}"
    assert options["disk"] == "/var/lib/mirrord/disk.img"
    assert options["mount"] == "/srv/data"
    assert options.get("mkfs") == ("ext4" if ROLES[node] == "primary" else None)
    config.parse(options)  # and the settings are valid as a whole


def test_both_nodes_print_the_same_settings_apart_from_mkfs() -> None:
    a1, a2 = _printed_startha("a1"), _printed_startha("a2")
    assert a1[-2:] == ["--mkfs", "ext4"]
    assert a1[:-2] == a2


# --------------------------------------------------------------------------- Vagrantfile


def _netmask(prefix: int) -> str:
    return str(ipaddress.ip_network(f"0.0.0.0/{prefix}").netmask)


def test_vagrantfile_mentions_both_roles_and_the_lab_addresses() -> None:
    text = VAGRANTFILE.read_text()
    assert "debian/bookworm64" in text
    for node in lab.APPLIANCES:
        assert f'"{node}"' in text, node
        # each node's entry carries its own public and sync address
        entry = re.search(rf'"{node}"\s*=>\s*\{{([^}}]*)\}}', text)
        assert entry, f"no NODES entry for {node}"
        assert f'"{lab.PUBLIC_IP[node]}"' in entry.group(1)
        assert f'"{lab.SYNC_IP[node]}"' in entry.group(1)
    assert _netmask(lab.PUBLIC_PREFIX) in text
    assert _netmask(lab.SYNC_PREFIX) in text
    assert 'virtualbox__intnet: SYNC_INTNET' in text and 'SYNC_INTNET = "mirrord-sync"' in text
    assert '"/vagrant-src"' in text
    assert 'path: "provision.sh"' in text


# A stand-in for Vagrant: records every call the Vagrantfile makes and prints them as JSON.
_FAKE_VAGRANT = r"""
require "json"
CALLS = []
class Recorder
  def initialize(scope)
    @scope = scope
  end
  def method_missing(name, *args, **kw, &blk)
    return self if name == :vm
    CALLS << { "scope" => @scope, "call" => name.to_s, "args" => args, "kw" => kw }
    blk.call(Recorder.new(name == :define ? args.first : @scope)) if blk
    self
  end
  def respond_to_missing?(*)
    true
  end
end
module Vagrant
  def self.configure(_version)
    yield Recorder.new(nil)
  end
end
load ARGV.fetch(0)
puts JSON.generate(CALLS)
"""


def test_vagrantfile_is_valid_ruby_and_wires_the_lab() -> None:
    """`ruby -c`, then evaluated against a stand-in Vagrant (when ruby is installed)."""
    ruby = shutil.which("ruby")
    if ruby is None:  # the text checks above are all there is, which is not enough under CI
        assert not under_ci(), "ruby is not installed (Debian's vagrant package, which `make test` installs, needs it)"
        assert VAGRANTFILE.read_text().count("Vagrant.configure") == 1
        return
    result = _run(ruby, "-c", str(VAGRANTFILE))
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stderr
    result = _run(ruby, "-e", _FAKE_VAGRANT, str(VAGRANTFILE), cwd=VAGRANTFILE.parent)
    assert result.returncode == 0, result.stderr
    calls = json.loads(result.stdout)
    assert [c["args"][0] for c in calls if c["call"] == "define"] == list(lab.APPLIANCES)
    synced = [c for c in calls if c["call"] == "synced_folder" and not c["kw"].get("disabled")]
    assert [c["args"] for c in synced] == [["..", "/vagrant-src"]]
    for node in lab.APPLIANCES:
        nets = [c["kw"] for c in calls if c["scope"] == node and c["call"] == "network"]
        public = [n for n in nets if n["ip"] == lab.PUBLIC_IP[node]]
        sync = [n for n in nets if n["ip"] == lab.SYNC_IP[node]]
        assert len(nets) == 2 and len(public) == 1 and len(sync) == 1, nets
        assert public[0]["netmask"] == _netmask(lab.PUBLIC_PREFIX)
        assert sync[0]["netmask"] == _netmask(lab.SYNC_PREFIX)
        assert sync[0]["virtualbox__intnet"] == "mirrord-sync"
        assert public[0].get("virtualbox__intnet") != "mirrord-sync"
        provision = [c for c in calls if c["scope"] == node and c["call"] == "provision"]
        assert len(provision) == 1
        assert provision[0]["kw"] == {"path": "provision.sh", "args": [node]}
        assert (VAGRANTFILE.parent / provision[0]["kw"]["path"]).is_file()


def test_vagrant_validate() -> None:
    """`vagrant validate` (Debian's vagrant package; `make test` installs it). No VM is started."""
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        message = "vagrant is not installed (apt-get install vagrant; `make test` does it)"
        skip_or_fail(message)
    result = subprocess.run([vagrant, "validate"], cwd=VAGRANTFILE.parent, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Vagrantfile validated successfully" in result.stdout
