#!/usr/bin/env bash
# Hook of tests/setup.sh: Debian's MariaDB server for tests/database.rs (a real database on a
# writable horcrux mount). Idempotent. The tests start their own `mariadbd` on a private datadir
# and socket; the distribution's service is never left running or enabled.
set -euo pipefail

log() { printf 'setup.d/mariadb: %s\n' "$*" >&2; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

have_all() {
    command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || return 1
    command -v mariadb-install-db >/dev/null 2>&1 || return 1
    command -v mariadb >/dev/null 2>&1 || return 1
    command -v mariadb-admin >/dev/null 2>&1 || return 1
}

if ! have_all; then
    if ! command -v apt-get >/dev/null 2>&1; then
        log "not a Debian system: install MariaDB (mariadbd, mariadb-install-db, mariadb, mariadb-admin) yourself"
        exit 1
    fi
    log "installing mariadb-server and mariadb-client"
    # Keep the package's maintainer scripts from starting the service: a policy-rc.d that denies
    # every start (101), removed afterwards unless one was there before us.
    policy=/usr/sbin/policy-rc.d
    ours=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 0755 "$policy"
        ours=1
    fi
    cleanup() { if [ "$ours" = 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi; }
    trap cleanup EXIT
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends mariadb-server mariadb-client >/dev/null
    cleanup
    trap - EXIT
fi

# The distribution's service must not run (it would hold /run/mysqld and port 3306) nor start at
# boot. With systemd: disable and stop it. Without systemd (containers): stop the SysV instance
# if one was started anyway.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    "${SUDO[@]}" systemctl disable --now mariadb >/dev/null 2>&1 || true
elif [ -x /etc/init.d/mariadb ] && [ -e /run/mysqld/mysqld.pid ]; then
    "${SUDO[@]}" /etc/init.d/mariadb stop >/dev/null 2>&1 || true
fi

have_all || { log "MariaDB binaries still missing after installation"; exit 1; }
log "ready ($(mariadbd --version 2>/dev/null || /usr/sbin/mariadbd --version))"
