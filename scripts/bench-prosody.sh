#!/usr/bin/env bash
# Run pushgate-bench against a local Prosody, for the side-by-side comparison of the XMPP hop
# (docs/benchmarks.md, "Pushgate vs Prosody"):
#
#     scripts/bench-prosody.sh [BENCH OPTIONS…]     e.g. --devices 2000 --rate 1000 --duration 30
#     scripts/bench-prosody.sh --install-only        only make sure Prosody is installed
#
# Installs Debian's `prosody` package if it is missing (apt-get, as root or through sudo; the
# packaged system service is kept from starting and disabled, see pg_ensure_prosody in
# scripts/lib/deps.sh), then runs `pushgate-bench --target prosody BENCH OPTIONS…`. The bench
# starts its own Prosody (own configuration, port, data and log in a temporary directory) and
# stops it at the end. NATS and Redis are not needed for this target.
#
# Environment:
#   PUSHGATE_BENCH   the pushgate-bench binary to run (default: `cargo run --release -p
#                    pushgate-bench --`, built in $CARGO_TARGET_DIR if set)
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/deps.sh
source scripts/lib/deps.sh

install_only=0
if [[ "${1:-}" == --install-only ]]; then
    install_only=1
    shift
fi
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
    sed -n '2,16p' "$0"
    exit 0
fi

pg_step "bench: Prosody (Debian package)"
pg_ensure_prosody
((install_only)) && exit 0

pg_step "bench: pushgate-bench --target prosody $*"
if [[ -n "${PUSHGATE_BENCH:-}" ]]; then
    exec "$PUSHGATE_BENCH" --target prosody "$@"
fi
exec cargo run --release -q -p pushgate-bench -- --target prosody "$@"
