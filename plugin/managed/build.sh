#!/bin/sh
# Build the horcrux managed Docker plugin, offline: a rootfs made from this host (the horcrux
# binary, its shared libraries, CA certificates, fusermount3), plugin/managed/config.json, then
# `docker plugin create`. No image is pulled and no registry is contacted.
#
#   plugin/managed/build.sh [--binary PATH] [--name NAME[:TAG]] [--build-dir DIR] [--no-create]
#
#   --binary PATH    use this horcrux executable (default: `cargo build --release -p horcrux-cli`
#                    and target/release/horcrux, or $CARGO_TARGET_DIR/release/horcrux)
#   --name NAME      plugin name (default horcrux:<workspace version>); an existing plugin of
#                    that name is replaced if it is disabled (refused if enabled)
#   --build-dir DIR  where the package is assembled (default plugin/managed/build; emptied first)
#   --no-create      assemble the package only
#
# Needs: root (or a user in the docker group that can read the files), docker, ldd, tar.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
binary=
name=
build_dir=$here/build
create=1

die() { echo "build.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=${2:?--binary needs a path}; shift 2 ;;
        --binary=*) binary=${1#*=}; shift ;;
        --name) name=${2:?--name needs a name}; shift 2 ;;
        --name=*) name=${1#*=}; shift ;;
        --build-dir) build_dir=${2:?--build-dir needs a directory}; shift 2 ;;
        --build-dir=*) build_dir=${1#*=}; shift ;;
        --no-create) create=0; shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$top/Cargo.toml" | head -n1)
[ -n "$version" ] || version=dev
[ -n "$name" ] || name=horcrux:$version
case $name in *:*) ;; *) name=$name:latest ;; esac

if [ -z "$binary" ]; then
    echo "==> cargo build --release -p horcrux-cli" >&2
    (cd "$top" && cargo build --release -p horcrux-cli)
    binary=${CARGO_TARGET_DIR:-$top/target}/release/horcrux
fi
[ -x "$binary" ] || die "no executable at $binary"

# The build directory is removed and made again: only what this script writes is in it.
case $build_dir in /|"") die "refusing build dir '$build_dir'" ;; esac
rm -rf "$build_dir"
rootfs=$build_dir/rootfs
mkdir -p "$rootfs"
echo "==> rootfs in $rootfs" >&2

for d in usr/bin etc tmp dev proc sys run/docker/plugins root/.ssh root/.aws var/lib/horcrux srv/horcrux; do
    mkdir -p "$rootfs/$d"
done
chmod 1777 "$rootfs/tmp"
chmod 700 "$rootfs/root" "$rootfs/root/.ssh"

# The binary, without its debug information (it is ~10x the code).
if command -v objcopy >/dev/null 2>&1; then
    objcopy --strip-debug "$binary" "$rootfs/usr/bin/horcrux"
else
    cp "$binary" "$rootfs/usr/bin/horcrux"
fi
chmod 755 "$rootfs/usr/bin/horcrux"

cp "$here/config.json" "$build_dir/config.json"

# An init as PID 1 (the host's tini, the `docker-init` of docker run --init): it passes
# SIGTERM on to `horcrux plugin` (a PID 1 without a handler ignores it, and `docker plugin
# disable` then waits 10 s for its SIGKILL) and reaps the exited `horcrux mount` daemons.
progs="$rootfs/usr/bin/horcrux"
init=
for c in tini-static docker-init tini; do
    init=$(command -v "$c" || true)
    [ -n "$init" ] && break
done
if [ -n "$init" ]; then
    cp -L "$init" "$rootfs/usr/bin/tini"
    progs="$progs $rootfs/usr/bin/tini"
else
    echo "warning: no tini on this host (apt-get install tini): horcrux runs as PID 1" >&2
    sed -i -e '/"\/usr\/bin\/tini",/d' -e '/^ *"-s",$/d' -e '/^ *"--",$/d' "$build_dir/config.json"
fi

# fusermount3: unused as root (the plugin mounts with mount(2)), a fallback otherwise.
fusermount=$(command -v fusermount3 || true)
if [ -n "$fusermount" ]; then
    cp "$fusermount" "$rootfs/usr/bin/fusermount3"
    progs="$progs $fusermount"
fi

# Shared libraries (and the dynamic loader) at the paths the host resolves them to; the paths
# the binaries were linked with (e.g. /lib64/ld-linux-x86-64.so.2) are kept too.
copy_lib() {
    src=$1
    [ -e "$src" ] || return 0
    dst=$rootfs$src
    [ -e "$dst" ] && return 0
    mkdir -p "$(dirname "$dst")"
    cp -L "$src" "$dst"
}
for p in $progs; do
    ldd "$p" | while read -r a b c _; do
        case $a in linux-vdso*|linux-gate*) continue ;; esac
        if [ "$b" = "=>" ]; then
            [ "$c" = "not" ] && die "$p: library $a not found"
            copy_lib "$c"
        else
            copy_lib "$a"
        fi
    done
done
# Debian and Ubuntu hosts resolve /lib through the /usr merge: keep both spellings.
for d in lib lib64; do
    if [ -L "/$d" ] && [ -d "$rootfs/usr/$d" ] && [ ! -e "$rootfs/$d" ]; then
        ln -s "usr/$d" "$rootfs/$d"
    fi
done

# CA certificates for https:// and s3:// access: the host's directory, and its bundle at the
# path SSL_CERT_FILE names in config.json.
mkdir -p "$rootfs/etc/ssl/certs"
if [ -d /etc/ssl/certs ]; then
    cp -rL /etc/ssl/certs/. "$rootfs/etc/ssl/certs/" 2>/dev/null || true
fi
if [ ! -s "$rootfs/etc/ssl/certs/ca-certificates.crt" ]; then
    for b in /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem /etc/ssl/ca-bundle.pem; do
        if [ -s "$b" ]; then cp -L "$b" "$rootfs/etc/ssl/certs/ca-certificates.crt"; break; fi
    done
fi
[ -s "$rootfs/etc/ssl/certs/ca-certificates.crt" ] || \
    echo "warning: no CA bundle found on this host: https:// and s3:// access will fail" >&2

printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$rootfs/etc/group"
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
: > "$rootfs/etc/hosts"
: > "$rootfs/etc/resolv.conf"

"$rootfs/usr/bin/horcrux" --version >/dev/null 2>&1 || \
    echo "warning: $rootfs/usr/bin/horcrux --version failed on the host" >&2
echo "==> package: $build_dir ($(du -sh "$build_dir" | cut -f1))" >&2

[ "$create" = 1 ] || exit 0

# Replace an older build of the same name (only when it is disabled: an enabled plugin may
# serve volumes that containers use).
if docker plugin inspect "$name" >/dev/null 2>&1; then
    if [ "$(docker plugin inspect -f '{{.Enabled}}' "$name")" = true ]; then
        die "plugin $name is enabled: \`docker plugin disable $name\` first (its volumes must be unused)"
    fi
    echo "==> docker plugin rm $name (older build)" >&2
    docker plugin rm "$name" >/dev/null
fi
echo "==> docker plugin create $name $build_dir" >&2
docker plugin create "$name" "$build_dir" >/dev/null

cat >&2 <<MSG
Created the Docker plugin $name. Next:

    mkdir -p /srv/horcrux /root/.ssh /root/.aws      # the mount sources must exist
    # optional: docker plugin set $name RUST_LOG=debug AWS_REGION=eu-west-1 \\
    #     repos.source=/data/repos ssh.source=/home/me/.ssh aws.source=/home/me/.aws
    docker plugin enable $name
    docker volume create -d $name -o access=scp://dev@dbhost:/opt/repo -o name=AMCC v1
    docker run -v v1:/data IMAGE ...
MSG
