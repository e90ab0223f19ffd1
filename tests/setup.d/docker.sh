#!/usr/bin/env bash
# Hook of tests/setup.sh: what tests/docker.rs needs besides the Docker engine itself —
# Debian's busybox-static, from which the test builds its image offline (`docker import` of a
# rootfs: no registry is reachable on the test machines). Idempotent. The engine is not
# installed here: where `docker info` fails, tests/docker.rs prints SKIP.
set -euo pipefail

log() { printf 'setup.d/docker: %s\n' "$*" >&2; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

if [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx sh; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "not a Debian system: install a static busybox at /bin/busybox yourself"
    exit 1
fi
log "installing busybox-static"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null \
    || { "${SUDO[@]}" apt-get update -q >/dev/null && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null; }
if ! docker info >/dev/null 2>&1; then
    log "note: no Docker engine answers \`docker info\`: tests/docker.rs will print SKIP"
fi
