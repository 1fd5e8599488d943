#!/usr/bin/env bash
# Bounded fuzzing of the XMPP stream parser (a benchmark-style job, not part of the test
# command): `scripts/fuzz.sh [SECONDS]` (default 300). Needs a nightly toolchain and
# cargo-fuzz (installed if missing). Any crash input is copied to
# crates/xmpp-stream/fuzz/regressions/, where the regular test suite replays it forever after.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-300}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
rustup toolchain list | grep '^nightly' >/dev/null || rustup toolchain install nightly --profile minimal
fuzz=crates/xmpp-stream/fuzz
rc=0
(cd "$fuzz" && cargo +nightly fuzz run stream corpus/stream -- \
    -max_total_time="$secs" -max_len=16384 -rss_limit_mb=1024 -timeout=5) || rc=$?
if ((rc != 0)); then
    shopt -s nullglob
    for f in "$fuzz"/artifacts/stream/*; do
        cp "$f" "$fuzz/regressions/"
        echo "[fuzz] kept $(basename "$f") as a regression input"
    done
fi
exit "$rc"
