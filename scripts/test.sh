#!/usr/bin/env bash
# Pushgate's one test command (the README's, and what .ci/run runs):
#
#     scripts/test.sh [ARGS...]
#
# On a fresh Debian 12 machine with a Rust toolchain and python3 it installs what is missing
# (nats-server, redis-server, a venv with the Python test peers), reuses NATS (JetStream) and
# Redis if they already answer on loopback or starts its own, then runs, failing fast:
#   1. cargo fmt --all -- --check
#   2. cargo clippy --workspace --all-targets -- -D warnings
#   3. cargo nextest run --workspace --profile ci ARGS   (cargo test --workspace ARGS without nextest)
# and exits with the test runner's exit code. Servers it started are stopped when it exits.
#
# ARGS go to the test runner, e.g. `scripts/test.sh -p router` or `scripts/test.sh some_test_name`.
# Environment: PUSHGATE_NATS_PORT, PUSHGATE_REDIS_PORT, PUSHGATE_STATE_DIR, PUSHGATE_VENV_DIR
# (see scripts/lib/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/deps.sh
source scripts/lib/deps.sh
pg_trap_cleanup

pg_step "test 1/6: system packages (nats-server, redis-server, curl, ca-certificates)"
pg_ensure_packages
pg_step "test 2/6: NATS with JetStream on 127.0.0.1:${PUSHGATE_NATS_PORT:-4222}, Redis on 127.0.0.1:${PUSHGATE_REDIS_PORT:-6379}"
pg_ensure_nats
pg_ensure_redis
pg_step "test 3/6: Python test peers, Rust components"
pg_ensure_python_peers
pg_ensure_kannel
pg_ensure_rust_tools

export PUSHGATE_TEST_NATS_URL="$PG_NATS_URL"
export PUSHGATE_TEST_REDIS_URL="$PG_REDIS_URL"
export PUSHGATE_PYTHON
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
printf '[pushgate] PUSHGATE_TEST_NATS_URL=%s PUSHGATE_TEST_REDIS_URL=%s PUSHGATE_PYTHON=%s\n' \
    "$PUSHGATE_TEST_NATS_URL" "$PUSHGATE_TEST_REDIS_URL" "$PUSHGATE_PYTHON" >&2

pg_step "test 4/6: cargo fmt --all -- --check"
cargo fmt --all -- --check

pg_step "test 5/6: cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

pg_step "test 5b/6: deployment files (Helm chart lint, render, schema validation; compose)"
scripts/check-deploy.sh

# --workspace, unless the caller picked packages with -p/--package.
scope=(--workspace)
for arg in "$@"; do
    case "$arg" in
        --) break ;;
        -p | --package | -p?* | --package=*)
            scope=()
            break
            ;;
    esac
done

if cargo nextest --version >/dev/null 2>&1; then
    runner=(cargo nextest run "${scope[@]}" --profile ci)
else
    runner=(cargo test "${scope[@]}")
fi
pg_step "test 6/6: ${runner[*]}${*:+ $*}"
rc=0
"${runner[@]}" "$@" || rc=$?
if ((rc == 0)); then
    pg_step "tests passed"
else
    pg_step "tests FAILED (exit $rc)"
fi
exit "$rc"
