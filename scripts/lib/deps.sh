#!/usr/bin/env bash
# shellcheck shell=bash
#
# scripts/lib/deps.sh: sourced by scripts/test.sh, scripts/up.sh and scripts/deps.sh.
#
# Makes sure that what Pushgate needs at run and test time is there, on a Debian 12 machine
# that may have nothing but a Rust toolchain and python3:
#
#   pg_ensure_packages      install nats-server, redis-server (+ redis-tools), curl, ca-certificates
#                           from Debian if their commands/files are missing
#   pg_ensure_nats          reuse a NATS server with JetStream on 127.0.0.1:$PUSHGATE_NATS_PORT,
#                           or start one (and remember to stop it)
#   pg_ensure_redis         reuse a Redis on 127.0.0.1:$PUSHGATE_REDIS_PORT, or start one with
#                           AOF persistence (and remember to stop it)
#   pg_ensure_python_peers  venv with the pinned Python test peers; exports PUSHGATE_PYTHON
#   pg_ensure_rust_tools    rustfmt and clippy components for the active toolchain
#   pg_ensure_prosody       Debian's prosody for `pushgate-bench --target prosody`
#   pg_cleanup              stop what the pg_ensure_* functions started in this shell, nothing else
#   pg_trap_cleanup         install EXIT/INT/TERM/HUP traps that run pg_cleanup
#   pg_stop_recorded        stop servers recorded in the state dir's pid files (scripts/deps.sh stop)
#
# Settings (environment, all optional):
#   PUSHGATE_NATS_PORT          4222
#   PUSHGATE_NATS_MONITOR_PORT  8222   only read, to double-check JetStream on a reused server
#   PUSHGATE_REDIS_PORT         6379
#   PUSHGATE_STATE_DIR          <repo>/.pushgate   (server data, logs, pid files, venv, dev config)
#   PUSHGATE_VENV_DIR           $PUSHGATE_STATE_DIR/venv
#   PUSHGATE_WAIT_SECS          30     how long to wait for a started server to answer
#   PUSHGATE_KEEP_SERVICES      0      1: do not install the automatic cleanup trap
#
# Servers are started in their own session (setsid), so a Ctrl-C in the terminal reaches the
# foreground program (tests, pushgate) but not NATS/Redis: those are stopped by pg_cleanup
# after the foreground program has finished.
#
# Sourcing this file does not change the caller's shell options; every function reports
# failure through its return status and an "ERROR:" line on stderr, so it works with and
# without `set -e`. The pg_ensure_nats/pg_ensure_redis functions must run in the main shell
# (not in a `$(...)` subshell), otherwise the started servers cannot be tracked.

if [[ -n "${_PG_DEPS_SOURCED:-}" ]]; then
    return 0
fi
_PG_DEPS_SOURCED=1

PG_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"

# Entries "name|pid|pidfile" of the servers started by this shell.
_PG_STARTED=()
_PG_APT_UPDATED=0
_PG_TRAPS_SET=0
# Overridable only for testing the apt logic.
_PG_POLICY_RC="${_PG_POLICY_RC:-/usr/sbin/policy-rc.d}"
_PG_POLICY_MARK="pushgate-deps-temporary-policy"
_PG_POLICY_OURS=0

# ---------------------------------------------------------------------------------------------
# small helpers

_pg_log() { printf '[pushgate] %s\n' "$*" >&2; }
_pg_err() { printf '[pushgate] ERROR: %s\n' "$*" >&2; }

# One clear banner line per step.
pg_step() { printf '\n==> [pushgate] %s\n' "$*" >&2; }

_pg_is_port() { [[ "$1" =~ ^[0-9]+$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }

# Resolve settings at call time, so that variables set after sourcing are honoured.
_pg_init() {
    PG_NATS_PORT="${PUSHGATE_NATS_PORT:-4222}"
    PG_REDIS_PORT="${PUSHGATE_REDIS_PORT:-6379}"
    PG_WAIT_SECS="${PUSHGATE_WAIT_SECS:-30}"
    local p
    for p in "$PG_NATS_PORT" "$PG_REDIS_PORT" "${PUSHGATE_NATS_MONITOR_PORT:-8222}"; do
        if ! _pg_is_port "$p"; then
            _pg_err "invalid port number '$p' (PUSHGATE_NATS_PORT / PUSHGATE_REDIS_PORT / PUSHGATE_NATS_MONITOR_PORT)"
            return 1
        fi
    done
    if ! [[ "$PG_WAIT_SECS" =~ ^[0-9]+$ ]]; then
        _pg_err "PUSHGATE_WAIT_SECS must be a whole number of seconds, not '$PG_WAIT_SECS'"
        return 1
    fi
    local d="${PUSHGATE_STATE_DIR:-$PG_REPO_ROOT/.pushgate}"
    [[ "$d" == /* ]] || d="$PWD/$d"
    if ! mkdir -p -- "$d" 2>/dev/null; then
        _pg_err "cannot create the state directory $d (PUSHGATE_STATE_DIR)"
        return 1
    fi
    PUSHGATE_STATE_DIR="$(cd -- "$d" && pwd -P)" || return 1
    export PUSHGATE_STATE_DIR
    # shellcheck disable=SC2034  # read by the scripts that source this file
    PG_NATS_URL="nats://127.0.0.1:$PG_NATS_PORT"
    # shellcheck disable=SC2034
    PG_REDIS_URL="redis://127.0.0.1:$PG_REDIS_PORT"
}

# Print the path of a command; also looks in the sbin directories, which are not on a
# non-root user's PATH on Debian (nats-server lives in /usr/sbin).
_pg_find_cmd() {
    local c="$1" d p
    if p="$(command -v -- "$c" 2>/dev/null)" && [[ "$p" == /* ]]; then
        printf '%s\n' "$p"
        return 0
    fi
    for d in /usr/local/sbin /usr/sbin /sbin; do
        if [[ -x "$d/$c" ]]; then
            printf '%s\n' "$d/$c"
            return 0
        fi
    done
    return 1
}

# Run a command as root: directly when root, else through sudo (non-interactive sudo when
# there is no terminal to ask for a password on, e.g. in CI).
_pg_as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        if [[ -t 0 ]]; then sudo "$@"; else sudo -n "$@"; fi
    else
        _pg_err "root is needed for: $* (not root, and sudo is not installed)"
        return 1
    fi
}

# Is something accepting TCP connections on 127.0.0.1:$1? (bash's /dev/tcp, no nc needed)
_pg_port_open() {
    # shellcheck disable=SC2016  # $0 is expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null
}

# Alive and not a zombie?
_pg_alive() {
    local pid="$1" stat
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    { IFS= read -r stat <"/proc/$pid/stat"; } 2>/dev/null || return 1
    stat="${stat##*) }"
    [[ "${stat:0:1}" != "Z" ]]
}

_pg_log_tail() {
    local log="$1"
    if [[ -s "$log" ]]; then
        printf '[pushgate] --- last lines of %s ---\n' "$log" >&2
        # from the last start marker on (earlier runs append to the same log), 25 lines at most
        awk 'index($0, "started by Pushgate scripts") { n = 0 } { buf[++n] = $0 }
             END { for (i = (n > 25 ? n - 24 : 1); i <= n; i++) print buf[i] }' "$log" >&2 || true
        printf '[pushgate] --- end of %s ---\n' "$log" >&2
    else
        printf '[pushgate] (log %s is empty)\n' "$log" >&2
    fi
}

# Start "$@" in the background with stdout/stderr appended to $1's log; sets _PG_SPAWNED_PID.
# Without job control (scripts) the job shares our process group and would get the terminal's
# Ctrl-C: setsid gives it its own session (no fork, as the job is not a group leader, so $!
# is the server's pid). With job control (interactive shell) the job has its own group already.
_pg_spawn() {
    local log="$1"
    shift
    if [[ $- == *m* ]]; then
        "$@" </dev/null >>"$log" 2>&1 &
    else
        setsid "$@" </dev/null >>"$log" 2>&1 &
    fi
    _PG_SPAWNED_PID=$!
}

# Stop one process: TERM, wait up to 15 s, then KILL. Reaps it if it is our child.
_pg_stop_pid() {
    local name="$1" pid="$2" i
    if _pg_alive "$pid"; then
        _pg_log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 75; i++)); do
            _pg_alive "$pid" || break
            sleep 0.2
        done
        if _pg_alive "$pid"; then
            _pg_log "$name (pid $pid) did not stop within 15 s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

_pg_fate() {
    if [[ "${PUSHGATE_KEEP_SERVICES:-0}" == 1 ]]; then
        printf 'left running'
    else
        printf 'stopped when this script exits'
    fi
}

_pg_remember() {
    _PG_STARTED+=("$1|$2|$3")
    _pg_auto_trap
}

# If the caller has no EXIT trap yet, install ours, so that a server we start is never left
# behind by accident (PUSHGATE_KEEP_SERVICES=1 turns this off, as scripts/deps.sh does).
_pg_auto_trap() {
    [[ "${PUSHGATE_KEEP_SERVICES:-0}" == 1 ]] && return 0
    [[ "$_PG_TRAPS_SET" == 1 ]] && return 0
    if [[ -z "$(trap -p EXIT)" ]]; then
        pg_trap_cleanup
    fi
    return 0
}

# ---------------------------------------------------------------------------------------------
# cleanup

pg_trap_cleanup() {
    trap 'pg_cleanup' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    _PG_TRAPS_SET=1
}

# Stops, newest first, only the servers that pg_ensure_* started in this shell.
pg_cleanup() {
    local i name pid pidfile
    for ((i = ${#_PG_STARTED[@]} - 1; i >= 0; i--)); do
        IFS='|' read -r name pid pidfile <<<"${_PG_STARTED[i]}"
        _pg_stop_pid "$name" "$pid"
        rm -f -- "$pidfile"
    done
    _PG_STARTED=()
    _pg_policy_remove
    return 0
}

# Stops the servers recorded in the state dir's pid files (left running by scripts/deps.sh,
# or by a script that was killed with SIGKILL). Checks the process name before killing.
pg_stop_recorded() {
    _pg_init || return 1
    local name pidfile pid comm found=0
    for name in nats-server redis-server; do
        pidfile="$PUSHGATE_STATE_DIR/run/$name.pid"
        [[ -f "$pidfile" ]] || continue
        found=1
        pid="$(tr -dc '0-9' <"$pidfile")"
        comm=""
        [[ -n "$pid" && -r "/proc/$pid/comm" ]] && comm="$(<"/proc/$pid/comm")"
        if [[ -n "$pid" && "$comm" == "$name"* ]]; then
            _pg_stop_pid "$name" "$pid"
        else
            _pg_log "$name: stale pid file $pidfile (no such $name process)"
        fi
        rm -f -- "$pidfile"
    done
    ((found)) || _pg_log "no server recorded in $PUSHGATE_STATE_DIR/run: nothing to stop"
    return 0
}

# ---------------------------------------------------------------------------------------------
# Debian packages

# While we install nats-server/redis-server, keep their packages from starting the system
# services: Debian's nats-server.service would take 127.0.0.1:4222 *without* JetStream and
# redis-server.service 127.0.0.1:6379 with its own persistence settings. A policy-rc.d that
# answers 101 for these two is the standard Debian way (both invoke-rc.d and
# deb-systemd-invoke honour it). An existing policy-rc.d is left alone.
_pg_policy_install() {
    if [[ -e "$_PG_POLICY_RC" ]]; then
        # A leftover of ours (script killed mid-install) is taken over and removed later.
        if grep -q -- "$_PG_POLICY_MARK" "$_PG_POLICY_RC" 2>/dev/null; then
            _PG_POLICY_OURS=1
        fi
        return 0
    fi
    # shellcheck disable=SC2016  # $a and $@ are for the written sh script, not for us
    printf '%s\n' \
        '#!/bin/sh' \
        "# $_PG_POLICY_MARK: written by Pushgate's scripts/lib/deps.sh while it runs apt-get;" \
        '# removed right after. Keeps the packaged nats-server/redis-server services from starting.' \
        'for a in "$@"; do' \
        '    case "$a" in' \
        '        nats-server|nats-server.service|redis-server|redis-server.service|redis-server@*) exit 101 ;;' \
        '    esac' \
        'done' \
        'exit 0' |
        _pg_as_root tee -- "$_PG_POLICY_RC" >/dev/null &&
        _pg_as_root chmod 0755 -- "$_PG_POLICY_RC" &&
        _PG_POLICY_OURS=1
    return 0
}

_pg_policy_remove() {
    if [[ "$_PG_POLICY_OURS" == 1 ]]; then
        _pg_as_root rm -f -- "$_PG_POLICY_RC" || true
        _PG_POLICY_OURS=0
    fi
    return 0
}

# apt-get install "$@", running `apt-get update` first, once per shell.
_pg_apt_install() {
    (($#)) || return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        _pg_err "missing: $* ; apt-get is not available here, install these packages by hand"
        return 1
    fi
    local -a apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=300)
    if [[ "$_PG_APT_UPDATED" != 1 ]]; then
        _pg_log "apt-get update"
        if ! _pg_as_root "${apt[@]}" update; then
            _pg_err "apt-get update failed"
            return 1
        fi
        _PG_APT_UPDATED=1
    fi
    _pg_log "apt-get install $*"
    local rc=0
    _pg_policy_install
    _pg_as_root "${apt[@]}" install --no-install-recommends "$@" || rc=$?
    _pg_policy_remove
    if ((rc != 0)); then
        _pg_err "apt-get install $* failed (exit $rc)"
        return "$rc"
    fi
    return 0
}

pg_ensure_packages() {
    local -a missing=()
    _pg_find_cmd nats-server >/dev/null || missing+=(nats-server)
    _pg_find_cmd redis-server >/dev/null || missing+=(redis-server)
    _pg_find_cmd redis-cli >/dev/null || missing+=(redis-tools)
    _pg_find_cmd curl >/dev/null || missing+=(curl)
    [[ -s /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
    # building Pushgate compiles C (ring's assembly, jemalloc through its configure + make)
    _pg_find_cmd cc >/dev/null || missing+=(gcc libc6-dev)
    _pg_find_cmd make >/dev/null || missing+=(make)
    if ((${#missing[@]} == 0)); then
        _pg_log "packages: nats-server, redis-server, redis-cli, curl, ca-certificates, cc, make present"
        return 0
    fi
    _pg_apt_install "${missing[@]}" || return 1

    # The packages enable their system services for the next boot: turn that off for the
    # ones we just installed (the scripts start their own servers, with the right options),
    # and stop them in case an existing policy-rc.d let them start.
    local pkg
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        for pkg in nats-server redis-server; do
            if [[ " ${missing[*]} " == *" $pkg "* ]]; then
                _pg_log "disabling the packaged $pkg.service (Pushgate's scripts start their own $pkg)"
                _pg_as_root systemctl disable --now "$pkg.service" >/dev/null 2>&1 || true
            fi
        done
    fi
    local c
    for c in nats-server redis-server redis-cli curl cc make; do
        if ! _pg_find_cmd "$c" >/dev/null; then
            _pg_err "$c is still missing after apt-get install"
            return 1
        fi
    done
    return 0
}

# ---------------------------------------------------------------------------------------------
# NATS (JetStream)

# What answers on 127.0.0.1:$1? Prints one of: js, nojs, notnats, closed.
_pg_nats_probe() {
    local port="$1" info
    if ! _pg_port_open "$port"; then
        echo closed
        return 0
    fi
    # A NATS server greets every client with one "INFO {json}" line; it says
    # "jetstream":true when JetStream is enabled.
    # shellcheck disable=SC2016  # $0/$line are expanded by the inner bash
    info="$(timeout 4 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" || exit 1
        IFS= read -r -t 3 line <&3 || exit 1
        printf "%s\n" "$line"' "$port" 2>/dev/null)" || info=""
    if [[ "$info" != INFO* ]]; then
        echo notnats
        return 0
    fi
    if [[ "$info" =~ \"jetstream\":[[:space:]]*true ]]; then
        echo js
        return 0
    fi
    # Double-check on the monitoring port, if that server has one: /varz names its client
    # port and has a jetstream.config when JetStream is on.
    local varz
    if command -v curl >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1 &&
        varz="$(curl -fsS --max-time 3 "http://127.0.0.1:${PUSHGATE_NATS_MONITOR_PORT:-8222}/varz" 2>/dev/null)" &&
        printf '%s' "$varz" | python3 -c '
import json, sys
v = json.load(sys.stdin)
ok = v.get("port") == int(sys.argv[1]) and bool((v.get("jetstream") or {}).get("config"))
sys.exit(0 if ok else 1)' "$port" 2>/dev/null; then
        echo js
        return 0
    fi
    echo nojs
}

pg_ensure_nats() {
    _pg_init || return 1
    local port="$PG_NATS_PORT" state
    state="$(_pg_nats_probe "$port")"
    case "$state" in
        js)
            _pg_log "NATS with JetStream already answers on 127.0.0.1:$port: reusing it (not started here, left running)"
            return 0
            ;;
        nojs)
            _pg_err "the NATS server on 127.0.0.1:$port has JetStream disabled, which Pushgate needs."
            _pg_err "Restart it with -js (Debian's packaged one: 'systemctl disable --now nats-server'), or pick a free port with PUSHGATE_NATS_PORT=..."
            return 1
            ;;
        notnats)
            _pg_err "127.0.0.1:$port is taken by something that is not a NATS server; free it or pick another port with PUSHGATE_NATS_PORT=..."
            return 1
            ;;
    esac

    local bin
    if ! bin="$(_pg_find_cmd nats-server)"; then
        _pg_err "nats-server is not installed (run pg_ensure_packages first)"
        return 1
    fi
    local dir="$PUSHGATE_STATE_DIR/nats"
    local log="$PUSHGATE_STATE_DIR/logs/nats-server.log"
    local pidfile="$PUSHGATE_STATE_DIR/run/nats-server.pid"
    mkdir -p -- "$dir" "${log%/*}" "${pidfile%/*}" || return 1
    _pg_log "starting nats-server (JetStream) on 127.0.0.1:$port; data in $dir; log $log"
    printf '\n--- %s: started by Pushgate scripts on 127.0.0.1:%s ---\n' "$(date -Is)" "$port" >>"$log"
    _pg_spawn "$log" "$bin" -a 127.0.0.1 -p "$port" -js -sd "$dir" -l "$log" -P "$pidfile"
    local pid="$_PG_SPAWNED_PID"
    _pg_remember nats-server "$pid" "$pidfile"

    local deadline=$((SECONDS + PG_WAIT_SECS))
    while :; do
        if ! _pg_alive "$pid"; then
            wait "$pid" 2>/dev/null || true
            _pg_err "nats-server exited right after start (port $port)"
            _pg_log_tail "$log"
            return 1
        fi
        if [[ "$(_pg_nats_probe "$port")" == js ]]; then
            break
        fi
        if ((SECONDS >= deadline)); then
            _pg_err "nats-server did not answer with JetStream on 127.0.0.1:$port within ${PG_WAIT_SECS}s"
            _pg_log_tail "$log"
            _pg_stop_pid nats-server "$pid"
            return 1
        fi
        sleep 0.2
    done
    _pg_log "nats-server is up on 127.0.0.1:$port (pid $pid; $(_pg_fate))"
    return 0
}

# ---------------------------------------------------------------------------------------------
# Redis

# Prints the reply to PING on 127.0.0.1:$1 ("PONG" for a usable Redis).
_pg_redis_ping() {
    local port="$1" cli out
    if cli="$(_pg_find_cmd redis-cli)"; then
        out="$(timeout 4 "$cli" -h 127.0.0.1 -p "$port" ping 2>&1)" || true
    else
        # shellcheck disable=SC2016  # $0/$line are expanded by the inner bash
        out="$(timeout 4 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" || exit 1
            printf "PING\r\n" >&3
            IFS= read -r -t 3 line <&3 || exit 1
            printf "%s\n" "${line#+}"' "$port" 2>/dev/null)" || true
    fi
    out="${out%$'\r'}"
    printf '%s\n' "$out"
}

pg_ensure_redis() {
    _pg_init || return 1
    local port="$PG_REDIS_PORT" reply
    if _pg_port_open "$port"; then
        reply="$(_pg_redis_ping "$port")"
        if [[ "$reply" == PONG ]]; then
            _pg_log "Redis already answers on 127.0.0.1:$port: reusing it (not started here, left running)"
            return 0
        fi
        _pg_err "127.0.0.1:$port is taken, but PING did not get PONG (got: ${reply:-nothing})."
        _pg_err "Free the port, or pick another with PUSHGATE_REDIS_PORT=..."
        return 1
    fi

    local bin
    if ! bin="$(_pg_find_cmd redis-server)"; then
        _pg_err "redis-server is not installed (run pg_ensure_packages first)"
        return 1
    fi
    local dir="$PUSHGATE_STATE_DIR/redis"
    local log="$PUSHGATE_STATE_DIR/logs/redis-server.log"
    local pidfile="$PUSHGATE_STATE_DIR/run/redis-server.pid"
    mkdir -p -- "$dir" "${log%/*}" "${pidfile%/*}" || return 1
    _pg_log "starting redis-server on 127.0.0.1:$port (AOF persistence, fsync every second); data in $dir; log $log"
    printf '\n--- %s: started by Pushgate scripts on 127.0.0.1:%s ---\n' "$(date -Is)" "$port" >>"$log"
    # Pushgate relies on Redis keeping its state when it owns the server: append-only file on,
    # RDB snapshots off.
    _pg_spawn "$log" "$bin" --bind 127.0.0.1 --port "$port" --save "" \
        --appendonly yes --appendfsync everysec --dir "$dir" --daemonize no \
        --logfile "$log" --pidfile "$pidfile"
    local pid="$_PG_SPAWNED_PID"
    _pg_remember redis-server "$pid" "$pidfile"

    local deadline=$((SECONDS + PG_WAIT_SECS))
    while :; do
        if ! _pg_alive "$pid"; then
            wait "$pid" 2>/dev/null || true
            _pg_err "redis-server exited right after start (port $port)"
            _pg_log_tail "$log"
            return 1
        fi
        if _pg_port_open "$port" && [[ "$(_pg_redis_ping "$port")" == PONG ]]; then
            break
        fi
        if ((SECONDS >= deadline)); then
            _pg_err "redis-server did not answer PING on 127.0.0.1:$port within ${PG_WAIT_SECS}s"
            _pg_log_tail "$log"
            _pg_stop_pid redis-server "$pid"
            return 1
        fi
        sleep 0.2
    done
    _pg_log "redis-server is up on 127.0.0.1:$port (pid $pid; $(_pg_fate))"
    return 0
}

# ---------------------------------------------------------------------------------------------
# Python test peers

# Exit 0 if every NAME==VERSION line of the requirements file is installed at that version.
_PG_REQS_CHECK='
import re, sys
from importlib.metadata import PackageNotFoundError, version
for raw in open(sys.argv[1], encoding="utf-8"):
    line = raw.split("#", 1)[0].strip()
    if not line:
        continue
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
    if not m:
        sys.exit(1)  # not pinned: let pip decide
    try:
        if version(m.group(1)) != m.group(3):
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
'

_pg_venv_ok() {
    local venv="$1"
    [[ -f "$venv/pyvenv.cfg" && -x "$venv/bin/python" ]] || return 1
    "$venv/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null || return 1
    "$venv/bin/python" -m pip --version >/dev/null 2>&1
}

pg_ensure_python_peers() {
    _pg_init || return 1
    local req="$PG_REPO_ROOT/scripts/python-requirements.txt"
    local venv="${PUSHGATE_VENV_DIR:-$PUSHGATE_STATE_DIR/venv}"
    [[ "$venv" == /* ]] || venv="$PWD/$venv"
    local py="$venv/bin/python" sys_py
    if [[ ! -f "$req" ]]; then
        _pg_err "missing $req"
        return 1
    fi
    if ! sys_py="$(command -v python3)"; then
        _pg_err "python3 is not installed"
        return 1
    fi

    if ! _pg_venv_ok "$venv"; then
        if [[ -e "$venv" ]]; then
            if [[ -f "$venv/pyvenv.cfg" ]]; then
                _pg_log "the venv at $venv is broken: recreating it"
                rm -rf -- "$venv"
            else
                _pg_err "$venv exists and is not a Python venv; move it away or set PUSHGATE_VENV_DIR"
                return 1
            fi
        fi
        if ! "$sys_py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
            _pg_log "python3 has no working venv module: installing Debian's python3-venv"
            _pg_apt_install python3-venv || return 1
        fi
        _pg_log "creating the Python venv $venv"
        if ! "$sys_py" -m venv "$venv" || ! _pg_venv_ok "$venv"; then
            rm -rf -- "$venv"
            _pg_err "could not create a venv with $sys_py (on Debian: apt-get install python3-venv)"
            return 1
        fi
    fi

    if "$py" -c "$_PG_REQS_CHECK" "$req" 2>/dev/null; then
        _pg_log "Python test peers up to date in $venv"
    else
        _pg_log "installing the Python test peers from scripts/python-requirements.txt into $venv"
        if ! "$py" -m pip install --disable-pip-version-check --no-input -q -r "$req"; then
            _pg_err "pip install -r $req failed"
            return 1
        fi
        if ! "$py" -c "$_PG_REQS_CHECK" "$req"; then
            _pg_err "the Python test peers are still not at the pinned versions after pip install"
            return 1
        fi
    fi
    PUSHGATE_PYTHON="$py"
    export PUSHGATE_PYTHON
    return 0
}

# ---------------------------------------------------------------------------------------------
# Rust tools (rustup installs the toolchain of rust-toolchain.toml by itself; a toolchain that
# was installed earlier without the rustfmt/clippy components gets them here)

pg_ensure_rust_tools() {
    if ! command -v cargo >/dev/null 2>&1; then
        _pg_err "cargo is not on PATH (install Rust with rustup; then: source \$HOME/.cargo/env)"
        return 1
    fi
    local sub comp
    for sub in fmt:rustfmt clippy:clippy; do
        comp="${sub#*:}"
        if ! cargo "${sub%%:*}" --version >/dev/null 2>&1; then
            if ! command -v rustup >/dev/null 2>&1; then
                _pg_err "cargo ${sub%%:*} is missing and rustup is not available to add the $comp component"
                return 1
            fi
            _pg_log "adding the $comp component to the active Rust toolchain"
            rustup component add "$comp" || return 1
        fi
    done
    return 0
}

# ---------------------------------------------------------------------------------------------
# Kannel (the sms-fallback test runs a real bearerbox + smsbox with a fake SMSC, and
# fakesmsc from kannel-extras as the "handset" side; see crates/sms-fallback/tests/kannel.rs)

# Installs Debian's kannel (bearerbox, smsbox) and kannel-extras (fakesmsc) if missing. The
# test starts its own boxes on free loopback ports with its own config, so the packaged
# kannel service must not start: the same temporary policy-rc.d technique as for
# nats-server/redis-server (a policy with our mark is taken over by _pg_apt_install and
# removed right after apt-get), and on systemd the unit is disabled and stopped.
pg_ensure_kannel() {
    local -a missing=()
    local pkg
    for pkg in kannel kannel-extras; do
        if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" != installed ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        _pg_log "packages: kannel, kannel-extras present"
    else
        if [[ ! -e "$_PG_POLICY_RC" ]]; then
            # shellcheck disable=SC2016  # $a and $@ are for the written sh script, not for us
            printf '%s\n' \
                '#!/bin/sh' \
                "# $_PG_POLICY_MARK: written by Pushgate's scripts/lib/deps.sh while it runs apt-get;" \
                '# removed right after. Keeps the packaged kannel/nats-server/redis-server services from starting.' \
                'for a in "$@"; do' \
                '    case "$a" in' \
                '        kannel|kannel.service|nats-server|nats-server.service|redis-server|redis-server.service|redis-server@*) exit 101 ;;' \
                '    esac' \
                'done' \
                'exit 0' |
                _pg_as_root tee -- "$_PG_POLICY_RC" >/dev/null &&
                _pg_as_root chmod 0755 -- "$_PG_POLICY_RC"
        fi
        if ! _pg_apt_install "${missing[@]}"; then
            # _pg_apt_install removes a policy of ours only once it has taken it over
            if grep -q -- "$_PG_POLICY_MARK" "$_PG_POLICY_RC" 2>/dev/null; then
                _pg_as_root rm -f -- "$_PG_POLICY_RC" || true
            fi
            return 1
        fi
        if [[ " ${missing[*]} " == *" kannel "* ]] &&
            [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
            _pg_log "disabling the packaged kannel.service (the tests start their own boxes)"
            _pg_as_root systemctl disable --now kannel.service >/dev/null 2>&1 || true
        fi
    fi
    local f
    for f in /usr/sbin/bearerbox /usr/sbin/smsbox; do
        if [[ ! -x "$f" ]]; then
            _pg_err "$f is missing although kannel is installed"
            return 1
        fi
    done
    # The path the Kannel test uses (crates/sms-fallback/tests/it/kannel.rs). Checked as a file,
    # not by piping `dpkg -L` into `grep -q`: under pipefail, grep -q quitting at the first match
    # kills dpkg with SIGPIPE and the whole check fails at random.
    if [[ ! -x /usr/lib/kannel/test/fakesmsc ]]; then
        _pg_err "/usr/lib/kannel/test/fakesmsc is missing although kannel-extras is installed"
        return 1
    fi
    return 0
}

# ---------------------------------------------------------------------------------------------
# Prosody (`pushgate-bench --target prosody` runs the same device workload against a Prosody it
# starts itself, for a side-by-side comparison of the XMPP hop; see scripts/bench-prosody.sh)

# Installs Debian's prosody if missing. The bench starts its own Prosody (own config, data dir
# and loopback port, in a temporary directory), so the packaged prosody service must not start
# and must not stay enabled (it would take 5222/5269 and run as a system daemon nobody asked
# for): the same temporary policy-rc.d technique as for kannel, and on systemd the unit is
# disabled and stopped. Idempotent: a second call only checks.
pg_ensure_prosody() {
    if [[ "$(dpkg-query -W -f='${db:Status-Status}' prosody 2>/dev/null)" == installed ]]; then
        _pg_log "package: prosody present ($(dpkg-query -W -f='${Version}' prosody 2>/dev/null))"
    else
        if [[ ! -e "$_PG_POLICY_RC" ]]; then
            # shellcheck disable=SC2016  # $a and $@ are for the written sh script, not for us
            printf '%s\n' \
                '#!/bin/sh' \
                "# $_PG_POLICY_MARK: written by Pushgate's scripts/lib/deps.sh while it runs apt-get;" \
                '# removed right after. Keeps the packaged prosody/nats-server/redis-server services from starting.' \
                'for a in "$@"; do' \
                '    case "$a" in' \
                '        prosody|prosody.service|nats-server|nats-server.service|redis-server|redis-server.service|redis-server@*) exit 101 ;;' \
                '    esac' \
                'done' \
                'exit 0' |
                _pg_as_root tee -- "$_PG_POLICY_RC" >/dev/null &&
                _pg_as_root chmod 0755 -- "$_PG_POLICY_RC"
        fi
        if ! _pg_apt_install prosody; then
            # _pg_apt_install removes a policy of ours only once it has taken it over
            if grep -q -- "$_PG_POLICY_MARK" "$_PG_POLICY_RC" 2>/dev/null; then
                _pg_as_root rm -f -- "$_PG_POLICY_RC" || true
            fi
            return 1
        fi
        # The package enables prosody.service for the next boot even where systemd is not
        # running now (a container, a chroot): `systemctl disable` works offline too (it
        # removes the unit's links and the SysV ones); `--now` only where systemd runs.
        if command -v systemctl >/dev/null 2>&1; then
            _pg_log "disabling the packaged prosody.service (the bench starts its own Prosody)"
            if [[ -d /run/systemd/system ]]; then
                _pg_as_root systemctl disable --now prosody.service >/dev/null 2>&1 || true
            else
                _pg_as_root systemctl disable prosody.service >/dev/null 2>&1 || true
            fi
        fi
    fi
    local c
    for c in prosody prosodyctl; do
        if ! _pg_find_cmd "$c" >/dev/null; then
            _pg_err "$c is missing although prosody is installed"
            return 1
        fi
    done
    return 0
}
