#!/usr/bin/env bash
# Build and run the fuzz targets (cargo-fuzz + libFuzzer) on the stable toolchain.
#
#   fuzz/run.sh [-t SECONDS] [-j JOBS] [TARGET...]     run each target SECONDS (default 300)
#   fuzz/run.sh -l                                     list the targets
#
# - cargo-fuzz needs nightly rustc flags (-Zsanitizer, -Cpasses=sancov): RUSTC_BOOTSTRAP=1
#   lets the stable toolchain take them. cargo-fuzz is installed from crates.io if missing.
# - Sanitizer: AddressSanitizer when its runtime ships with the toolchain, else none
#   (HORCRUX_FUZZ_SANITIZER=address|none overrides). Panics, overflows (the fuzz profile has
#   overflow checks and debug assertions) and timeouts are findings either way.
# - New inputs go to a work corpus (HORCRUX_FUZZ_WORK, default $TMPDIR/horcrux-fuzz/<target>);
#   the committed seeds in fuzz/corpus/<target> are read, never written. Crashes are saved in
#   fuzz/artifacts/<target>/ and make the script exit 1. One summary line per target.
# - JOBS targets run at once (default 1; the machine may be shared).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

seconds=300
jobs=1
list=0
while getopts "t:j:l" o; do
    case "$o" in
        t) seconds="$OPTARG" ;;
        j) jobs="$OPTARG" ;;
        l) list=1 ;;
        *) echo "usage: fuzz/run.sh [-t SECONDS] [-j JOBS] [-l] [TARGET...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))

all_targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^horcrux-fuzz$')
if [ "$list" = 1 ]; then
    echo "$all_targets"
    exit 0
fi
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets <<<"$all_targets"
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

sanitizer="${HORCRUX_FUZZ_SANITIZER:-}"
if [ -z "$sanitizer" ]; then
    rtdir="$(rustc --print target-libdir)"
    if compgen -G "$rtdir/librustc-*_rt.asan.a" >/dev/null; then
        sanitizer=address
    else
        sanitizer=none
    fi
fi
build=(cargo fuzz build -O --debug-assertions -s "$sanitizer")
echo "==> ${build[*]} (sanitizer $sanitizer)"
start=$(date +%s)
# `cargo fuzz build` takes one target or none (= all).
one=()
[ "${#targets[@]}" -eq 1 ] && one=("${targets[0]}")
if ! "${build[@]}" "${one[@]}" >"${TMPDIR:-/tmp}/horcrux-fuzz-build.log" 2>&1; then
    grep -E '^error' -A12 "${TMPDIR:-/tmp}/horcrux-fuzz-build.log" | head -60 >&2
    echo "fuzz: build failed" >&2
    exit 1
fi
echo "==> built in $(( $(date +%s) - start )) s"
triple="$(rustc -vV | sed -n 's/^host: //p')"
bindir="${CARGO_TARGET_DIR:-$here/target}/$triple/release"
# As `cargo fuzz run` sets it: Rust's generic statics trip ASan's ODR check.
export ASAN_OPTIONS="detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"

work="${HORCRUX_FUZZ_WORK:-${TMPDIR:-/tmp}/horcrux-fuzz}"
mkdir -p "$work" "$here/artifacts"

run_one() {
    local t="$1" log="$work/$1.log" dict=()
    mkdir -p "$work/$t" "$here/artifacts/$t" "$here/corpus/$t"
    [ -f "$here/dict/$t.dict" ] && dict=("-dict=$here/dict/$t.dict")
    # -timeout: one input slower than 10 s is a hang; -rss_limit_mb: a leak or a huge
    # allocation is a finding too. Both are libFuzzer's crash kinds.
    # The binary built above, run directly: `cargo fuzz run` would rebuild first, and a source
    # edited meanwhile would make every target of a long run wait for a new build.
    local rc=0
    # The targets' scratch directories (a cache, catalogs) go under this run's own TMPDIR,
    # removed at exit: libFuzzer ends with exit(), so they never clean up after themselves.
    TMPDIR="$marks/tmp" "$bindir/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$here/artifacts/$t/" "${dict[@]}" \
        "$work/$t" "$here/corpus/$t" >"$log" 2>&1 || rc=$?
    local runs cov corp
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    corp=$(grep -o 'corp: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    if [ "$rc" -eq 0 ]; then
        echo "fuzz: $t ok: ${runs:-?} runs in ${seconds} s, coverage ${cov:-?}, corpus ${corp:-?}"
    else
        local art
        art=$(grep -o "$here/artifacts/$t/[^ ]*" "$log" | tail -1)
        echo "fuzz: $t FAILED (exit $rc) after ${runs:-?} runs: ${art:-see $log}"
        grep -m1 -E "panicked at|ERROR: (libFuzzer|AddressSanitizer)" "$log" | sed 's/^/fuzz:   /' || true
        return 1
    fi
}

# Failure markers of this run only (two runs may share the work corpus directory).
marks="$(mktemp -d)"
trap 'rm -rf "$marks"' EXIT
mkdir -p "$marks/tmp"
for t in "${targets[@]}"; do
    { run_one "$t" || touch "$marks/$t.failed"; } &
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
        wait -n || true
    done
done
wait
failed=0
for t in "${targets[@]}"; do
    [ -e "$marks/$t.failed" ] && failed=1
done
if [ "$failed" -ne 0 ]; then
    echo "fuzz: FAILED: reproduce with: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O --debug-assertions -s $sanitizer TARGET fuzz/artifacts/TARGET/crash-..." >&2
    exit 1
fi
echo "fuzz: all ${#targets[@]} targets ok"
