#!/bin/sh
# A worker of docker/compose.host.yml: `host-worker AGENT CELERY-WORKER-OPTIONS...`.
# On the host's network every container has the host's hostname, so docker-compose.yml's node
# name (<env>-<agent>-%h@%h) would be the same for every replica, and a ping would not tell
# them apart. Here the name has a random part of its own, written to /tmp/celery-node for the
# health check, which pings exactly this replica.
set -eu
agent="$1"; shift
node="${CICD_ENV:-stage}-${agent}-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')@$(hostname)"
echo "$node" > /tmp/celery-node
exec python -m celery -A workers.app:celery_app worker -n "$node" "$@"
