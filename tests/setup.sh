#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) to build horcrux, run its tests and its demo.
# Idempotent: installs only what is missing, so a second run takes about a second.
#
# What it ensures:
#   - Debian packages the build, the tests and the demo use (fuse3 for fusermount3, attr, ...);
#   - /dev/fuse (loads the `fuse` module or creates the node if needed);
#   - a Rust toolchain with rustfmt and clippy (rustup, installed non-interactively if missing);
#   - moto[server] (the S3 server of the tests) for python3, or $HORCRUX_PYTHON;
#   - cargo-nextest only if HORCRUX_INSTALL_NEXTEST=1 (tests/run.sh falls back to `cargo test`);
#   - then runs every tests/setup.d/*.sh (hooks later features add for their own services).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { printf 'setup: %s\n' "$*" >&2; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        log "not root and no sudo: run tests/setup.sh as root"
        exit 1
    fi
fi

# --- Debian packages -------------------------------------------------------------------------
packages=(
    build-essential pkg-config    # C toolchain for bundled SQLite, libssh2
    libssl-dev zlib1g-dev         # openssl-sys / libssh2-sys (ssh:// stores)
    fuse3                         # fusermount3: unprivileged mount helper fuser uses
    kmod                          # modprobe fuse
    attr                          # getfattr/setfattr: xattr checks in tests and the demo
    psmisc procps util-linux      # fuser, pgrep/ps, mountpoint, nsenter, setpriv
    iproute2                      # ip netns, tc: multi-host tests (peers_netns.rs, source_cut.rs)
    e2fsprogs                     # mkfs.ext4: loop-mounted full disks (tests/disk_full.rs)
    systemd                       # systemd-analyze verify of the units (tests/metrics.rs)
    faketime                      # libfaketime: a skewed wall clock (tests/clock_skew.rs)
    openssh-server openssh-client # loopback sshd for ssh:// tests
    python3 python3-pip python3-venv ca-certificates curl git
)
if command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for p in "${packages[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        "${SUDO[@]}" apt-get update -qq
        "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
else
    log "not a Debian system: install the equivalents of ${packages[*]} yourself"
fi

# --- /dev/fuse ---------------------------------------------------------------------------------
if [ ! -c /dev/fuse ]; then
    "${SUDO[@]}" modprobe fuse 2>/dev/null || true
fi
if [ ! -c /dev/fuse ]; then
    # In a container the module may be loaded on the host while the node is missing here.
    "${SUDO[@]}" mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
fi
if [ -c /dev/fuse ]; then
    :
else
    log "WARNING: /dev/fuse is not available: FUSE mounts (tests, demo) will fail"
fi
# Let non-root users pass -o allow_other (harmless for root, which may anyway).
if [ -f /etc/fuse.conf ] && ! grep -q '^[[:space:]]*user_allow_other' /etc/fuse.conf; then
    echo user_allow_other | "${SUDO[@]}" tee -a /etc/fuse.conf >/dev/null
fi

# --- Rust toolchain ----------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
    log "installing the Rust toolchain with rustup (stable, minimal profile, rustfmt, clippy)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
        | sh -s -- -y --profile minimal --default-toolchain stable -c rustfmt -c clippy
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
if command -v rustup >/dev/null 2>&1; then
    for c in rustfmt clippy; do
        if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
            log "adding rustup component $c"
            rustup component add "$c" >/dev/null
        fi
    done
fi
# The workspace uses edition 2024: rustc >= 1.85.
rustc_minor="$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')"
if [ "${rustc_minor:-0}" -lt 85 ]; then
    log "rustc $(rustc --version) is too old (need >= 1.85): run \`rustup update stable\`"
    exit 1
fi

if [ "${HORCRUX_INSTALL_NEXTEST:-0}" = 1 ] && ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi

# --- S3 test server: moto[server] for the python3 the tests run ($HORCRUX_PYTHON or python3) ----
py="${HORCRUX_PYTHON:-python3}"
if ! "$py" -c 'import moto.server, flask, flask_cors' >/dev/null 2>&1; then
    log "installing moto[server] for $py (S3 server of the tests)"
    # Debian's own python3 is "externally managed": pip refuses without the flag, and installs
    # into /usr/local (not over Debian's packages) with it. A test machine is what it is for.
    "$py" -m pip install --quiet --disable-pip-version-check 'moto[server]' 2>/dev/null \
        || "$py" -m pip install --quiet --disable-pip-version-check --break-system-packages 'moto[server]'
fi

# --- hooks of later features (sshd keys, S3 server, Docker image, ...) -------------------------
if [ -d "$here/setup.d" ]; then
    for hook in "$here"/setup.d/*.sh; do
        [ -e "$hook" ] || continue
        log "running ${hook#"$here"/}"
        bash "$hook"
    done
fi

log "ready ($(rustc --version | cut -d' ' -f1-2), $(fusermount3 --version 2>&1 | head -n1))"
