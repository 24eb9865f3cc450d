"""PostgreSQL 15 as the pair's application, and a client that records every committed transaction.

The start script (run by mirrord on whichever appliance becomes primary)
creates the cluster on the mirrored ext4 the first time (``initdb``, trust
for the public subnet) and starts it listening on the floating IP only; the
stop script stops it (fast) and kills anything left on the mount. The
client runs in the client namespace: each transaction is one ``psql -c
'INSERT … RETURNING id'`` through the floating IP, and ``COMMIT id token``
is printed (to a file on the host) only after psql reported the commit.
"""

from __future__ import annotations

import shutil
from typing import Any

PG_BIN = "/usr/lib/postgresql/15/bin"
FLOATING = "198.18.0.10"

APP = f"""#!/bin/sh
# PostgreSQL 15 on the mirrored filesystem, started and stopped by mirrord on the primary.
D="$MIRRORD_MOUNT/pgdata"
case "$1" in
start)
  if [ ! -f "$D/PG_VERSION" ]; then
    rm -rf "$D" && mkdir "$D" && chown postgres:postgres "$D" || exit 1
    runuser -u postgres -- {PG_BIN}/initdb -D "$D" --auth=trust --encoding=UTF8 --locale=C >/dev/null 2>&1 || exit 1
    echo "host all all 198.18.0.0/24 trust" >> "$D/pg_hba.conf"
    # initdb fsyncs what it wrote; this line must be durable too, or a takeover finds a cluster without it.
    sync -f "$D/pg_hba.conf" || exit 1
  fi
  # A crash leaves postmaster.pid behind; no other postgres can use this just-mounted filesystem.
  rm -f "$D/postmaster.pid"
  runuser -u postgres -- {PG_BIN}/pg_ctl -D "$D" -w -t 120 -l "$D/server.log" \\
      -o "-c listen_addresses=$MIRRORD_FLOATING_IP -c unix_socket_directories='' -c fsync=on -c synchronous_commit=on" \\
      start >/dev/null 2>&1 || exit 1 ;;
stop)
  [ -f "$D/postmaster.pid" ] && runuser -u postgres -- {PG_BIN}/pg_ctl -D "$D" -m fast -w -t 60 stop >/dev/null 2>&1
  fuser -k -m "$MIRRORD_MOUNT" >/dev/null 2>&1 ;;
esac
exit 0
"""

# argv: seconds tag. One transaction at a time; a line is printed only for a reported commit.
CLIENT = r"""
import os, subprocess, sys, time
end, tag, n = time.monotonic() + float(sys.argv[1]), sys.argv[2], 0
while time.monotonic() < end:
    token = f"{tag}-{n}"
    n += 1
    try:
        done = subprocess.run(["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h", "198.18.0.10",
                               "-U", "postgres", "-d", "postgres", "-c",
                               f"INSERT INTO commits (token) VALUES ('{token}') RETURNING id"],
                              capture_output=True, text=True, timeout=10,
                              env={**os.environ, "PGCONNECT_TIMEOUT": "2"})
    except subprocess.TimeoutExpired:
        continue
    if done.returncode == 0 and done.stdout.strip().isdigit():
        print(f"COMMIT {done.stdout.strip()} {token}", flush=True)
    else:
        time.sleep(0.05)
"""

SCHEMA = "CREATE TABLE IF NOT EXISTS commits (id bigserial PRIMARY KEY, token text UNIQUE NOT NULL)"


def psql(lab: Any, sql: str, timeout: float = 30) -> Any:
    """One statement through the floating IP from the client namespace."""
    return lab.run("client", ["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h", FLOATING, "-U",
                              "postgres", "-d", "postgres", "-c", sql],
                   env={"PGCONNECT_TIMEOUT": "2"}, timeout=timeout)


def committed(output: str) -> dict[int, str]:
    """id -> token of every commit the client reported."""
    found = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "COMMIT":
            found[int(parts[1])] = parts[2]
    return found


def table(lab: Any) -> dict[int, str]:
    done = psql(lab, "COPY (SELECT id, token FROM commits) TO STDOUT", timeout=120)
    assert done.returncode == 0, f"reading the commits table failed: {done.stderr}"
    return {int(i): t for i, t in (line.split("\t") for line in done.stdout.splitlines())}


def installed() -> str | None:
    """What is missing for the PostgreSQL test, or None."""
    if not shutil.which("psql") or not shutil.which(f"{PG_BIN}/initdb"):
        return "PostgreSQL 15 (Debian package postgresql-15)"
    if not shutil.which("runuser"):
        return "runuser (util-linux)"
    return None
