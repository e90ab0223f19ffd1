#!/usr/bin/env bash
# Set up the machine, build the workspace and run the whole test suite (as root, with real FUSE).
# Exit code = the test runner's. Uses cargo-nextest when installed, else `cargo test`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
tests/setup.sh
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

echo "==> cargo build --workspace"
cargo build --workspace

status=0
if cargo nextest --version >/dev/null 2>&1; then
    echo "==> cargo nextest run --workspace --no-fail-fast"
    cargo nextest run --workspace --no-fail-fast || status=$?
else
    echo "==> cargo test --workspace --no-fail-fast (cargo-nextest not installed)"
    cargo test --workspace --no-fail-fast || status=$?
fi
exit "$status"
