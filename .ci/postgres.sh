#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1 for the run-store integration tests.
#
#   eval "$(.ci/postgres.sh)"        # start (or reuse) it and export MOE_LAB_TEST_POSTGRES_URL
#   .ci/postgres.sh stop             # stop it and delete its data directory
#
# Installs Debian's `postgresql` when no server binaries are found (apt-get update first), creates a cluster
# with initdb in $MOE_LAB_PG_DIR (default: /tmp/moe-lab-ci-postgres-$UID) owned by the `postgres` user when run
# as root, listens on 127.0.0.1 only on a free port, creates the role and database `moe_lab_test` with a random
# password, and prints `export MOE_LAB_TEST_POSTGRES_URL=...` on stdout (all logs go to stderr).
# Idempotent: a second call reuses the running server. Every wait is bounded.
set -euo pipefail

PG_DIR="${MOE_LAB_PG_DIR:-${TMPDIR:-/tmp}/moe-lab-ci-postgres-$(id -u)}"
DATA="$PG_DIR/data"
DB_NAME="moe_lab_test"
DB_USER="moe_lab_test"
WAIT_S="${MOE_LAB_PG_WAIT_S:-60}"

log() { printf '[postgres.sh] %s\n' "$*" >&2; }

find_bindir() {
    local d
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir
        return 0
    fi
    for d in $(printf "%s\n" /usr/lib/postgresql/*/bin | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

BINDIR="$(find_bindir || true)"
if [ -z "$BINDIR" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        log "PostgreSQL server binaries not found and not root: install Debian's 'postgresql' package"
        exit 1
    fi
    log "installing PostgreSQL (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq >&2
    timeout 900 apt-get install -y -qq --no-install-recommends postgresql >&2
    BINDIR="$(find_bindir)"
fi

# Run PostgreSQL tools as the `postgres` user when we are root (the server refuses to run as root).
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

if [ "${1:-start}" = "stop" ]; then
    if [ -f "$DATA/PG_VERSION" ]; then
        as_pg "$BINDIR/pg_ctl" -D "$DATA" -m fast -w -t "$WAIT_S" stop >&2 || true
    fi
    rm -rf "$PG_DIR"
    log "stopped and removed $PG_DIR"
    exit 0
fi

mkdir -p "$PG_DIR"
chmod 700 "$PG_DIR"
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$PG_DIR"
fi

if [ ! -f "$DATA/PG_VERSION" ]; then
    log "initdb in $DATA"
    rm -rf "$DATA"
    as_pg "$BINDIR/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --no-locale >/dev/null
    python3 -c 'import secrets; print(secrets.token_hex(16))' >"$PG_DIR/password"
    free_port >"$PG_DIR/port"
    chmod 600 "$PG_DIR/password" "$PG_DIR/port"
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$PG_DIR/password" "$PG_DIR/port"; fi
fi
PORT="$(cat "$PG_DIR/port")"
PASSWORD="$(cat "$PG_DIR/password")"

if ! as_pg "$BINDIR/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    # the remembered port may have been taken meanwhile: pick a new free one
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        PORT="$(free_port)"
        echo "$PORT" >"$PG_DIR/port"
    fi
    log "starting PostgreSQL on 127.0.0.1:$PORT"
    as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$PG_DIR/server.log" -w -t "$WAIT_S" \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PG_DIR -c max_connections=100 -c fsync=off" start >&2
fi

deadline=$((SECONDS + WAIT_S))
until "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "PostgreSQL did not become ready within ${WAIT_S}s; see $PG_DIR/server.log"
        exit 1
    fi
    sleep 0.5
done

psql_pg() { as_pg "$BINDIR/psql" -h "$PG_DIR" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_pg -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'")" != "1" ]; then
    psql_pg -d postgres -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$PASSWORD'" >/dev/null
fi
if [ "$(psql_pg -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != "1" ]; then
    psql_pg -d postgres -c "CREATE DATABASE $DB_NAME OWNER $DB_USER" >/dev/null
fi

URL="postgresql+psycopg://$DB_USER:$PASSWORD@127.0.0.1:$PORT/$DB_NAME"
log "ready: postgresql+psycopg://$DB_USER:***@127.0.0.1:$PORT/$DB_NAME"
echo "export MOE_LAB_TEST_POSTGRES_URL='$URL'"
