# Developer shortcuts. Nothing here is required: the README's two commands are
# scripts/up.sh (run the suite) and scripts/test.sh (run all tests).

set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments

# List the recipes
default:
    @just --list

# Build the whole workspace (debug)
build *args:
    cargo build --workspace --all-targets "$@"

# All checks and tests, as CI runs them (starts/stops NATS and Redis as needed)
test *args:
    scripts/test.sh "$@"

# Run the whole suite on loopback (Ctrl-C stops it and what it started)
up *args:
    scripts/up.sh "$@"

# Formatting check and clippy, as in CI
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Format the code
fmt:
    cargo fmt --all

# Benchmarks
bench *args:
    cargo bench --workspace "$@"

# Start NATS (JetStream) and Redis if not running, and leave them running
deps:
    scripts/deps.sh

# Stop the NATS/Redis servers that `just deps` started
deps-stop:
    scripts/deps.sh stop
