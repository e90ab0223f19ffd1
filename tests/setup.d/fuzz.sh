#!/usr/bin/env bash
# Hook of tests/setup.sh: what fuzz/run-ci.sh (the short fuzz run of CI) needs. Idempotent.
# - cargo-fuzz from crates.io (about a minute to build, once);
# - a C++ compiler: libfuzzer-sys compiles libFuzzer itself (g++ from build-essential, which
#   tests/setup.sh installs; checked here);
# - the AddressSanitizer runtime ships with the Rust toolchain (no package); fuzz/run.sh falls
#   back to `-s none` when it is missing.
set -euo pipefail

log() { printf 'setup.d/fuzz: %s\n' "$*" >&2; }

if [ "${HORCRUX_FUZZ:-1}" = 0 ]; then
    exit 0
fi
if ! command -v c++ >/dev/null 2>&1; then
    log "no C++ compiler (c++): install build-essential (libfuzzer-sys builds libFuzzer with it)"
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi
