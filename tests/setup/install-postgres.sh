#!/usr/bin/env bash
# Called by `make test`: puts a PostgreSQL server on the machine when it can (as root, with
# apt-get), so the store tests also run on PostgreSQL; they start a throwaway cluster of their
# own. Never fails the run: without PostgreSQL those tests skip and say what to install.
set -u

installed() {
    command -v initdb >/dev/null 2>&1 && return 0
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
    command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]
}

installed && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "PostgreSQL is not installed: its store tests will skip (apt-get install postgresql to run them)" >&2
    exit 0
fi
echo "Installing PostgreSQL for the store tests (apt-get install postgresql)..."
log=$(mktemp)
if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >"$log" 2>&1; then
    echo "PostgreSQL installed."
else
    tail -5 "$log" >&2
    echo "Could not install PostgreSQL: its store tests will skip." >&2
fi
rm -f "$log"
exit 0
