#!/bin/sh
# Starts PostgreSQL from docker/postgres.Dockerfile: on the first start, makes the cluster in $PGDATA
# with the superuser $POSTGRES_USER and the database $POSTGRES_DB, the password read on initdb's
# stdin from POSTGRES_PASSWORD (never on a command line); then serves on $PGHOST:$PGPORT only.
set -eu
: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}" "${POSTGRES_DB:?}" "${PGPORT:=5432}" "${PGHOST:=127.0.0.1}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    printf '%s\n' "$POSTGRES_PASSWORD" | initdb --username="$POSTGRES_USER" --pwfile=/dev/stdin \
        --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 --no-instructions >/dev/null
    # Single-user mode: no server listens while the database is made.
    echo "CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$POSTGRES_USER\";" \
        | postgres --single -D "$PGDATA" -c listen_addresses='' postgres >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses="$PGHOST" -c port="$PGPORT"
