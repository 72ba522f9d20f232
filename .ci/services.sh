#!/usr/bin/env bash
# Starts PostgreSQL on loopback (127.0.0.1:55432, trust auth, a throw-away cluster under /tmp) for the
# scale-out tests, installing Debian's server package when it is missing, and writes .ci/services.env
# (MASKSSD_TEST_POSTGRES_URL). The tests skip, saying why, when it is not there.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${MASKSSD_PG_PORT:-55432}
DATA=${MASKSSD_PG_DATA:-/tmp/maskssd-ci-pg}

pgbin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(pgbin)" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "services: no PostgreSQL and no way to install it"; exit 1
  fi
fi
BIN=$(pgbin)
RUNAS=()
if [ "$(id -u)" = 0 ]; then RUNAS=(runuser -u postgres --); fi

if "${RUNAS[@]}" "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  echo "services: PostgreSQL already running in $DATA"
else
  rm -rf "$DATA"; mkdir -p "$DATA"
  [ "$(id -u)" = 0 ] && chown postgres "$DATA"
  "${RUNAS[@]}" "$BIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
  "${RUNAS[@]}" "$BIN/pg_ctl" -D "$DATA" -w -l "$DATA/server.log" \
      -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA -c max_connections=200 -c fsync=off" start >/dev/null
fi
echo "MASKSSD_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:$PORT/postgres" > .ci/services.env
echo "services: PostgreSQL on 127.0.0.1:$PORT"
