#!/usr/bin/env bash
# Pushgate's one run command (the README's):
#
#     scripts/up.sh
#
# Brings the whole suite up on loopback: installs nats-server/redis-server if missing, reuses
# NATS (JetStream) and Redis if they already answer or starts its own, writes a development
# config (.pushgate/dev.toml, random secrets) on first run, builds the release binary and runs
# all six services in the foreground with `pushgate all`. Ctrl-C stops Pushgate, then the
# servers this script started (servers it found running are left alone).
#
# Extra arguments are passed to `pushgate all`.
# Environment: PUSHGATE_NATS_PORT, PUSHGATE_REDIS_PORT, PUSHGATE_STATE_DIR (see scripts/lib/deps.sh),
# CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/deps.sh
source scripts/lib/deps.sh
pg_trap_cleanup

pg_step "up 1/4: system packages (nats-server, redis-server, curl, ca-certificates)"
pg_ensure_packages
pg_step "up 2/4: NATS with JetStream on 127.0.0.1:${PUSHGATE_NATS_PORT:-4222}, Redis on 127.0.0.1:${PUSHGATE_REDIS_PORT:-6379}"
pg_ensure_nats
pg_ensure_redis

# The state dir as the config should name it: relative to the repo root (the working
# directory) when it is inside the repo, as with the default ".pushgate".
repo="$(pwd -P)"
state="$PUSHGATE_STATE_DIR"
if [[ "$state" == "$repo"/* ]]; then
    state="${state#"$repo"/}"
fi
config="$state/dev.toml"
tls_dir="$state/tls"

# TOML basic string
toml_str() {
    local s="${1//\\/\\\\}"
    printf '"%s"' "${s//\"/\\\"}"
}

random_hex() { # $1 bytes -> 2*$1 hex chars
    od -An -v -tx1 -N "$1" /dev/urandom | tr -d ' \n'
}

pg_step "up 3/4: development config $config"
if [[ -f "$config" ]]; then
    printf '[pushgate] using the existing %s\n' "$config" >&2
else
    device_secret="$(random_hex 32)"
    admin_token="adm_$(random_hex 24)"
    if ((${#device_secret} != 64 || ${#admin_token} != 52)); then
        printf '[pushgate] ERROR: could not read random bytes from /dev/urandom\n' >&2
        exit 1
    fi
    tmp="$(mktemp "$state/.dev.toml.XXXXXX")"
    chmod 600 "$tmp"
    cat >"$tmp" <<TOML
# Pushgate development config, written by scripts/up.sh on $(date -u +%Y-%m-%d).
# Secrets are random and local to this checkout; delete this file to get new ones.
[common]
nats_url = $(toml_str "$PG_NATS_URL")
redis_url = $(toml_str "$PG_REDIS_URL")
namespace = "dev"
xmpp_domain = "localhost"
device_secret = "$device_secret"

[common.telemetry]
log_format = "text"

[ingress]
listen = "127.0.0.1:8443"
admin_token = "$admin_token"
tls_cert = $(toml_str "$tls_dir/server.pem")
tls_key = $(toml_str "$tls_dir/server.key")

[edge]
starttls_listen = "127.0.0.1:5222"
direct_tls_listen = "127.0.0.1:5223"
tls_cert = $(toml_str "$tls_dir/server.pem")
tls_key = $(toml_str "$tls_dir/server.key")
TOML
    mv -f "$tmp" "$config"
    printf '[pushgate] wrote %s (random device_secret and admin_token)\n' "$config" >&2
fi

# An older dev.toml may name other ports than the servers ensured above: the environment
# (PUSHGATE__SECTION__KEY, read after the file) makes Pushgate use the ones this script checked.
if ! grep -qxF "nats_url = $(toml_str "$PG_NATS_URL")" "$config"; then
    printf '[pushgate] note: %s names another nats_url; using %s\n' "$config" "$PG_NATS_URL" >&2
    export PUSHGATE__COMMON__NATS_URL="$PG_NATS_URL"
fi
if ! grep -qxF "redis_url = $(toml_str "$PG_REDIS_URL")" "$config"; then
    printf '[pushgate] note: %s names another redis_url; using %s\n' "$config" "$PG_REDIS_URL" >&2
    export PUSHGATE__COMMON__REDIS_URL="$PG_REDIS_URL"
fi
mkdir -p "$tls_dir"
chmod 700 "$tls_dir" 2>/dev/null || true

pg_step "up 4/4: cargo build --release -p pushgate"
cargo build --release -p pushgate
bin="${CARGO_TARGET_DIR:-target}/release/pushgate"
if [[ ! -x "$bin" ]]; then
    printf '[pushgate] ERROR: %s was not built\n' "$bin" >&2
    exit 1
fi

pg_step "running: $bin all --config $config --dev-certs $tls_dir${*:+ $*}   (Ctrl-C to stop)"
rc=0
"$bin" all --config "$config" --dev-certs "$tls_dir" "$@" || rc=$?
exit "$rc"
