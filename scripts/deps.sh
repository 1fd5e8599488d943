#!/usr/bin/env bash
# Start Pushgate's backing services for development and LEAVE THEM RUNNING:
#
#     scripts/deps.sh          install if missing, then reuse or start NATS (JetStream) and Redis
#     scripts/deps.sh stop     stop the servers a previous `scripts/deps.sh` started
#                              (found through the pid files in $PUSHGATE_STATE_DIR/run)
#
# Unlike scripts/test.sh and scripts/up.sh this does not stop what it started when it exits.
# Environment: PUSHGATE_NATS_PORT, PUSHGATE_REDIS_PORT, PUSHGATE_STATE_DIR (see scripts/lib/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/deps.sh
source scripts/lib/deps.sh
export PUSHGATE_KEEP_SERVICES=1

case "${1:-start}" in
    start | up)
        pg_step "deps: system packages"
        pg_ensure_packages
        pg_step "deps: NATS with JetStream and Redis"
        pg_ensure_nats
        pg_ensure_redis
        printf '\nNATS:  %s\nRedis: %s\n(left running; stop the ones started here with: scripts/deps.sh stop)\n' \
            "$PG_NATS_URL" "$PG_REDIS_URL"
        ;;
    stop)
        pg_stop_recorded
        ;;
    -h | --help | help)
        sed -n '2,9p' "$0"
        ;;
    *)
        printf 'usage: %s [start|stop]\n' "$0" >&2
        exit 2
        ;;
esac
