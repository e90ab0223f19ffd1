#!/usr/bin/env bash
# The short fuzz run of CI: every target for HORCRUX_FUZZ_SECONDS (default 20) seconds, two at
# a time, after an incremental build. Prints one summary line per target; exits 1 on any
# crash, panic, overflow, timeout or out-of-memory (the input is kept in fuzz/artifacts/).
# Set HORCRUX_FUZZ=0 to skip it (prints a SKIP line).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ "${HORCRUX_FUZZ:-1}" = 0 ]; then
    echo "fuzz: SKIP (HORCRUX_FUZZ=0)"
    exit 0
fi
exec "$here/run.sh" -t "${HORCRUX_FUZZ_SECONDS:-20}" -j "${HORCRUX_FUZZ_JOBS:-2}"
