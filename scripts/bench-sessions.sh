#!/usr/bin/env bash
# Many concurrent device sessions over several edge instances, as production would run them:
#
#     scripts/bench-sessions.sh [EDGES] [DEVICES_PER_EDGE] [RATE_PER_EDGE] [SECONDS]
#
# (defaults: 6 edges × 16,700 devices = 100,200 sessions, 20 msg/s per edge, 240 s of sending).
#
# A process here may hold at most 20,000 open files (a hard limit), so one edge process can hold
# about 19,500 sessions. The script therefore starts `pushgate all` (ingress, router, bridges,
# webhook; its own edge stays empty) and EDGES separate `xmpp-edge` processes on their own
# ports, all in one fresh namespace on the local NATS and Redis, then one `pushgate-bench`
# process per edge (`--api` mode, `--edge-pid` = that edge, `--device-offset` so names never
# collide, sessions spread over several 127.0.0.x source addresses). Every bench process
# registers its devices, logs them all in, sends at a low rate for SECONDS and reconciles.
#
# While they run, the script samples every edge's `pushgate_xmpp_sessions` gauge and RSS each
# 5 s, and at the end prints the highest number of sessions held at the same time across all
# edges, each edge's RSS per session, and each bench's own report (JSON in the work dir).
# The namespace is purged afterwards (`pushgate purge`). Results belong in docs/benchmarks.md.
#
# Environment: CARGO_TARGET_DIR (release binaries are built there if missing; default
# /var/tmp/pushgate-release), PUSHGATE_BENCH_DIR (work dir; default a new /var/tmp/pg-sessions-*),
# PUSHGATE_EDGE_WRAPPER (a command the edges run under, e.g. "heaptrack -o DIR/edge"; the
# RSS figures then belong to the wrapper, not the edge), PUSHGATE_BENCH_ARGS (extra
# pushgate-bench arguments for every bench process), PUSHGATE_RELOGIN=1 (a reconnect storm:
# once every bench process has all its sessions up, they all close every stream and log in
# again at the same moment; the combined logins/s is printed with the results).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/deps.sh
source scripts/lib/deps.sh
pg_trap_cleanup

edges="${1:-6}"
per_edge="${2:-16700}"
rate="${3:-20}"
seconds="${4:-240}"
for v in "$edges" "$per_edge" "$rate" "$seconds"; do
    [[ "$v" =~ ^[0-9]+$ ]] || {
        _pg_err "arguments must be whole numbers: EDGES DEVICES_PER_EDGE RATE_PER_EDGE SECONDS"
        exit 2
    }
done
if ((per_edge > 19000)); then
    _pg_err "at most 19,000 devices per edge (each process may hold 20,000 open files)"
    exit 2
fi

pg_step "sessions 1/5: NATS and Redis, release binaries"
pg_ensure_packages
pg_ensure_nats
pg_ensure_redis
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/pushgate-release}"
cargo build --release -p pushgate -p xmpp-edge -p pushgate-bench
bin="$CARGO_TARGET_DIR/release"

ts="$(date -u +%Y%m%d%H%M%S)"
work="${PUSHGATE_BENCH_DIR:-/var/tmp/pg-sessions-$ts}"
mkdir -p "$work"
ns="bs$(date -u +%y%m%d%H%M%S)"  # at most 16 characters
admin="adm_$(od -An -v -tx1 -N 24 /dev/urandom | tr -d ' \n')"
secret="$(od -An -v -tx1 -N 32 /dev/urandom | tr -d ' \n')"
cat >"$work/pg.toml" <<TOML
[common]
namespace = "$ns"
xmpp_domain = "localhost"
nats_url = "nats://127.0.0.1:${PUSHGATE_NATS_PORT:-4222}"
redis_url = "redis://127.0.0.1:${PUSHGATE_REDIS_PORT:-6379}"
device_secret = "$secret"
[ingress]
listen = "127.0.0.1:18443"
ops_listen = "127.0.0.1:19101"
admin_token = "$admin"
rate_limit_per_app = 0
[router]
ops_listen = "127.0.0.1:19102"
[edge]
starttls_listen = "127.0.0.1:15222"
direct_tls_listen = ""
websocket_listen = ""
ops_listen = "127.0.0.1:19103"
[bridge]
ops_listen = "127.0.0.1:19104"
[sms]
ops_listen = "127.0.0.1:19105"
dlr_listen = "127.0.0.1:19107"
[webhook]
ops_listen = "127.0.0.1:19106"
TOML
pids=()
stop_all() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    # a wrapper (PUSHGATE_EDGE_WRAPPER) may not pass the signal on to the edge it started
    pkill -f -- "--config $work/pg.toml" 2>/dev/null || true
    "$bin/pushgate" purge --config "$work/pg.toml" --yes >>"$work/purge.log" 2>&1 || true
}
trap 'stop_all; pg_cleanup' EXIT

pg_step "sessions 2/5: pushgate all and $edges xmpp-edge processes (namespace $ns, logs in $work)"
"$bin/pushgate" all --config "$work/pg.toml" --dev-certs "$work/tls" >"$work/suite.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    _pg_port_open 18443 && break
    sleep 0.2
done
_pg_port_open 18443 || {
    _pg_err "pushgate all did not come up; see $work/suite.log"
    exit 1
}
edge_pids=()
for k in $(seq 0 $((edges - 1))); do
    PUSHGATE__EDGE__STARTTLS_LISTEN="127.0.0.1:$((15232 + 10 * k))" \
        PUSHGATE__EDGE__OPS_LISTEN="127.0.0.1:$((19203 + 10 * k))" \
        PUSHGATE__EDGE__DIRECT_TLS_LISTEN="" \
        PUSHGATE__EDGE__WEBSOCKET_LISTEN="" \
        PUSHGATE__EDGE__TLS_CERT="$work/tls/server.pem" \
        PUSHGATE__EDGE__TLS_KEY="$work/tls/server.key" \
        ${PUSHGATE_EDGE_WRAPPER:-} "$bin/xmpp-edge" --config "$work/pg.toml" >"$work/edge$k.log" 2>&1 &
    pids+=($!)
    edge_pids+=($!)
done
for k in $(seq 0 $((edges - 1))); do
    for _ in $(seq 1 100); do
        _pg_port_open $((15232 + 10 * k)) && break
        sleep 0.2
    done
    _pg_port_open $((15232 + 10 * k)) || {
        _pg_err "xmpp-edge $k did not come up; see $work/edge$k.log"
        exit 1
    }
done

pg_step "sessions 3/5: $edges bench processes × $per_edge devices, $rate msg/s each for $seconds s"
sources=$(((edges * per_edge + 19999) / 20000 + 1))
bench_pids=()
relogin_args=()
if [[ "${PUSHGATE_RELOGIN:-0}" == 1 ]]; then
    relogin_args=(--relogin-when "$work/relogin.go")
fi
for k in $(seq 0 $((edges - 1))); do
    "$bin/pushgate-bench" --api https://localhost:18443 --admin-token "$admin" \
        --ca "$work/tls/ca.pem" --xmpp "127.0.0.1:$((15232 + 10 * k))" --tls-name localhost \
        --edge-pid "${edge_pids[$k]}" --devices "$per_edge" --device-offset $((k * per_edge)) \
        --source-ips "$sources" --rate "$rate" --duration "$seconds" \
        --register-concurrency 16 --connect-concurrency 32 ${PUSHGATE_BENCH_ARGS:-} "${relogin_args[@]}" \
        --out "$work/bench$k.json" >"$work/bench$k.out" 2>"$work/bench$k.err" &
    pids+=($!)
    bench_pids+=($!)
done

pg_step "sessions 4/5: sampling sessions and RSS every 5 s (samples in $work/samples.tsv)"
printf 'utc\tsessions_total\t%s\n' "$(for k in $(seq 0 $((edges - 1))); do printf 'edge%s_sessions\tedge%s_rss_kib\t' "$k" "$k"; done)" >"$work/samples.tsv"
running() {
    local p
    for p in "${bench_pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done
    return 1
}
max_total=0
max_at=""
while running; do
    total=0
    line=""
    for k in $(seq 0 $((edges - 1))); do
        s="$( (curl -s "http://127.0.0.1:$((19203 + 10 * k))/metrics" || true) | awk '/^pushgate_xmpp_sessions /{print $2}')"
        s="${s:-0}"
        s="${s%.*}"
        rss="$(awk '/^VmRSS:/{print $2}' "/proc/${edge_pids[$k]}/status" 2>/dev/null || echo 0)"
        total=$((total + s))
        line+="$s	$rss	"
    done
    now="$(date -u +%H:%M:%S)"
    printf '%s\t%s\t%s\n' "$now" "$total" "$line" >>"$work/samples.tsv"
    if ((total > max_total)); then
        max_total=$total
        max_at=$now
    fi
    printf '[sessions] %s  %d sessions across %d edges (max %d at %s)\n' "$now" "$total" "$edges" "$max_total" "$max_at" >&2
    if ((${#relogin_args[@]})) && [[ ! -e "$work/relogin.go" ]]; then
        ready=0
        for k in $(seq 0 $((edges - 1))); do
            grep -q 'relogin   waiting' "$work/bench$k.err" 2>/dev/null && ready=$((ready + 1))
        done
        if ((ready == edges)); then
            touch "$work/relogin.go"
            printf '[sessions] %s  every bench is connected: reconnect storm\n' "$now" >&2
            sleep 1
            continue
        fi
    fi
    sleep 5
done
failed=0
for k in $(seq 0 $((edges - 1))); do
    wait "${bench_pids[$k]}" || {
        failed=1
        _pg_err "bench $k failed; see $work/bench$k.err"
    }
done

pg_step "sessions 5/5: results"
printf 'most sessions held at the same time: %d (at %s UTC) across %d edge processes\n' "$max_total" "$max_at" "$edges"
for k in $(seq 0 $((edges - 1))); do
    printf -- '--- bench %d (edge %d)\n' "$k" "$k"
    cat "$work/bench$k.out"
done
if ((${#relogin_args[@]})); then
    # the storm's combined rate: every process's second logins over the union of their phases
    field() { { grep -m1 -o "\"$1\": *[0-9.]*" "$2" || true; } | sed 's/.*: *//'; }
    n=0 first="" last=""
    for k in $(seq 0 $((edges - 1))); do
        f="$work/bench$k.json"
        b="$({ grep -A3 '"relogin": {' "$f" || true; } | { grep -m1 -o '"bound": *[0-9]*' || true; } | sed 's/.*: *//')"
        s="$(field started_unix_ms "$f")"
        e="$(field ended_unix_ms "$f")"
        [[ -n "$b" && -n "$s" && -n "$e" ]] || continue
        n=$((n + b))
        [[ -z "$first" || "$s" -lt "$first" ]] && first=$s
        [[ -z "$last" || "$e" -gt "$last" ]] && last=$e
    done
    if [[ -n "$first" ]] && ((last > first)); then
        printf 'reconnect storm: %d sessions logged in again in %d ms across %d edges: %d logins/s\n' \
            "$n" "$((last - first))" "$edges" "$((n * 1000 / (last - first)))"
    fi
fi
printf 'work dir: %s\n' "$work"
exit "$failed"
