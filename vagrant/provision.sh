#!/usr/bin/env bash
# Provision one mirrord appliance of the two-VM lab on Debian 12.
#
#   provision.sh a1|a2                 install and start the daemon (as root)
#   provision.sh --print-only a1|a2    only print the startHA command for that node
#
# Shared by both VMs (the Vagrantfile runs it with the node's name) and safe to
# run again: packages are installed only when missing, the source is staged and
# reinstalled, links and the unit are refreshed, an existing disk image is never
# touched, and a running daemon is never restarted (a restart interrupts HA: a primary comes back standalone).
#
# The roles and addresses are those of the network-namespace lab
# (mirrord/net/lab.py, DESIGN.md section 5): a1 is the first primary, a2 the
# first secondary; public 198.18.0.0/24 with a1 .11, a2 .12 and the floating IP
# .10; the dedicated sync link 198.19.0.0/30 with a1 .1 and a2 .2.
#
# Environment (all optional):
#   MIRRORD_SRC     the repository, default /vagrant-src (the Vagrantfile syncs it there)
#   MIRRORD_VENV    the virtualenv, default /opt/mirrord
#   MIRRORD_DISK_SIZE  size of a new disk image, default 1G (a sparse file)
set -euo pipefail

# --- the lab's roles and addresses (tests/unit/test_packaging.py checks them) ---
PRIMARY_IP=198.18.0.11          # a1, public network
SECONDARY_IP=198.18.0.12        # a2, public network
PRIMARY_SYNC_IP=198.19.0.1      # a1, sync link (/30)
SECONDARY_SYNC_IP=198.19.0.2    # a2, sync link (/30)
FLOATING_IP=198.18.0.10/24
PING_INTERVAL=1

SRC=${MIRRORD_SRC:-/vagrant-src}
VENV=${MIRRORD_VENV:-/opt/mirrord}
STAGE=${VENV}-src
MIRRORD_HOME=/var/lib/mirrord
DISK=$MIRRORD_HOME/disk.img
DISK_SIZE=${MIRRORD_DISK_SIZE:-1G}
MOUNT=/srv/data
UNIT=/etc/systemd/system/mirrord.service
COMMANDS=(mirrord startHA configureHA stopHA failOver HAstatus)
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc e2fsprogs python3-venv python3-dev git)

usage() {
    echo "usage: $0 [--print-only] a1|a2" >&2
    exit 2
}

print_only=0
if [[ ${1:-} == --print-only ]]; then
    print_only=1
    shift
fi
[[ $# -eq 1 ]] || usage
NODE=$1
case $NODE in
    a1) MY_PUBLIC_IP=$PRIMARY_IP; MY_SYNC_IP=$PRIMARY_SYNC_IP ;;
    a2) MY_PUBLIC_IP=$SECONDARY_IP; MY_SYNC_IP=$SECONDARY_SYNC_IP ;;
    *) usage ;;
esac

# The same startHA as in the namespace lab; only --disk and --mount are the VM's.
# a1 also gets --mkfs ext4: it is the first primary, and mkfs only ever runs on a
# disk that has no filesystem yet.
startha_command() {
    local cmd="startHA --primary-ip $PRIMARY_IP --secondary-ip $SECONDARY_IP"
    cmd+=" --primary-sync-ip $PRIMARY_SYNC_IP --secondary-sync-ip $SECONDARY_SYNC_IP"
    cmd+=" --floating-ip $FLOATING_IP --ping-interval $PING_INTERVAL"
    cmd+=" --disk $DISK --mount $MOUNT"
    if [[ $NODE == a1 ]]; then
        cmd+=" --mkfs ext4"
    fi
    printf '%s\n' "$cmd"
}

if (( print_only )); then
    startha_command
    exit 0
fi

log() { printf '[provision %s] %s\n' "$NODE" "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "provision.sh: run as root (Vagrant's shell provisioner does)." >&2
    exit 1
fi
if [[ ! -f $SRC/pyproject.toml ]]; then
    echo "provision.sh: no mirrord repository at $SRC (set MIRRORD_SRC, or sync the repo root there)." >&2
    exit 1
fi

# 1. packages, only the missing ones (a warm VM does not touch the network)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if (( ${#missing[@]} )); then
    log "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# 2. stage a clean copy of the source: pip builds in the source tree, and neither
#    the host's build products (.venv, build/, the host's _native*.so) nor this
#    VM's should travel between the two.
log "staging $SRC in $STAGE"
rm -rf "$STAGE"
mkdir -p "$STAGE"
tar -C "$SRC" \
    --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
    --exclude='./.stamp-*' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.benchmarks \
    --exclude='./mirrord/_native*' --exclude=./vagrant/.vagrant \
    -cf - . | tar -C "$STAGE" -xf -

# 3. the virtualenv and the package (reinstalled every time, so a re-provision
#    picks up source changes)
if [[ ! -x $VENV/bin/python ]]; then
    log "creating the virtualenv $VENV"
    python3 -m venv "$VENV"
fi
log "pip install $SRC into $VENV"
"$VENV/bin/python" -m pip install -q "$STAGE"

# 4. the operator commands on PATH (the unit's ExecStart uses /usr/local/bin/mirrord)
for c in "${COMMANDS[@]}"; do
    ln -sfn "$VENV/bin/$c" "/usr/local/bin/$c"
done

# 5. state directory, disk image (sparse; never recreated or resized), mount point
# (mkdir -p, not install -d -m: on a primary /srv/data is the mounted volume,
# whose root must not be chmod-ed behind the application's back)
mkdir -p "$MIRRORD_HOME" "$MOUNT"
if [[ ! -e $DISK ]]; then
    log "creating the sparse disk image $DISK ($DISK_SIZE)"
    truncate -s "$DISK_SIZE" "$DISK"
fi

# 6. the systemd unit; start the daemon unless it is already running
unit_changed=0
if ! cmp -s "$STAGE/packaging/mirrord.service" "$UNIT"; then
    install -m 0644 "$STAGE/packaging/mirrord.service" "$UNIT"
    unit_changed=1
fi
systemctl daemon-reload
was_running=0
systemctl is-active --quiet mirrord.service && was_running=1
systemctl enable --now mirrord.service
if (( was_running && unit_changed )); then
    log "the unit changed; it applies at the next 'systemctl restart mirrord'."
fi
systemctl is-active --quiet mirrord.service || {
    echo "provision.sh: mirrord.service is not running; see: journalctl -u mirrord" >&2
    exit 1
}

# 7. the VM's addresses must be the lab's, or startHA will refuse
for ip in "$MY_PUBLIC_IP" "$MY_SYNC_IP"; do
    if ! ip -4 -o addr show | grep -qF " $ip/"; then
        log "WARNING: $ip is not configured on this VM; startHA will refuse (check the Vagrantfile's networks)."
    fi
done

cat <<EOF

mirrord is installed on $NODE and its daemon is running (mode standalone).
A daemon that was already running was not restarted; to load new code run
'systemctl restart mirrord' (HA is torn down; the appliance comes back
standalone) and then startHA again.

Start HA on $NODE (as root; on a2 first or on a1 first, in any order):

    $(startha_command)

From the host: vagrant ssh $NODE -c 'sudo $(startha_command)'
EOF
