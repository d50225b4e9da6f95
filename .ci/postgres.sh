#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the stored-responses tests (Debian's postgresql package,
# installed when missing); prints its URL. Safe to run again: a server already running is reused.
set -euo pipefail
PORT=${LLMCTL_TEST_POSTGRES_PORT:-55432}
DATA=${LLMCTL_TEST_POSTGRES_DATA:-/tmp/llmctl-test-postgres}
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql) >&2
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_postgres() { runuser -u postgres -- "$@"; }
if ! as_postgres "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    rm -rf "$DATA"
    install -d -o postgres "$DATA"
    as_postgres "$BIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
    as_postgres "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA" start >&2
fi
echo "postgresql://postgres@127.0.0.1:$PORT/postgres"
