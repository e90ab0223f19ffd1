#!/usr/bin/env bash
# Regenerate the fixture repository (fuzz/fixtures/repo) and the seed corpora under
# fuzz/corpus/<target>/ from a small tree with every kind of node, using the horcrux binary
# (HORCRUX_BIN, else $CARGO_TARGET_DIR/debug/horcrux, else target/debug/horcrux).
# Only needed when a format changes; the outputs are committed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
bin="${HORCRUX_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/horcrux}"
[ -x "$bin" ] || { echo "make-corpus: no horcrux binary at $bin (cargo build first)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
t="$tmp/tree"
mkdir -p "$t/dir/sub" "$t/empty-dir"
printf 'hello world\n' >"$t/hello.txt"
head -c 3000 /dev/zero | tr '\0' 'x' >"$t/dir/sub/data.bin"
: >"$t/dir/empty"
printf 'with xattr\n' >"$t/dir/x.txt"
setfattr -n user.test -v value "$t/dir/x.txt" 2>/dev/null || true
ln -s hello.txt "$t/link"
ln -s /etc/passwd "$t/abs"
ln "$t/hello.txt" "$t/dir/hard"
mkfifo "$t/pipe"
printf 'tail' | dd of="$t/sparse" bs=1 seek=$((2 << 20)) conv=notrunc status=none
chmod 4755 "$t/dir/sub/data.bin"
touch -d '2020-01-02 03:04:05 UTC' "$t" "$t"/* "$t"/dir/* 2>/dev/null || true

repo="$here/fixtures/repo"
rm -rf "$repo"
mkdir -p "$(dirname "$repo")"
"$bin" generate -q --chunk-size 1M -m "fuzz fixture" fixture "$t" "$repo"

c="$here/corpus"
rm -rf "$c"/{manifest,commit,repo_text}
mkdir -p "$c"/{manifest,commit,repo_text}
cp "$repo"/manifests/* "$c/manifest/"
for f in "$repo"/commits/*; do cp "$f" "$c/commit/$(basename "$f")"; done
# repo_text inputs: selector byte, then the text (see fuzz_targets/repo_text.rs).
printf '\0%s' "$(cat "$repo/horcrux.json")" >"$c/repo_text/config"
printf '\001%s' "$(cat "$repo"/volumes/fixture/refs/heads/main)" >"$c/repo_text/ref"
printf '\002main~2^' >"$c/repo_text/rev"
printf '\003s3://bucket/fixture?region=garage' >"$c/repo_text/remote"
printf '\004%s' "$(basename "$(ls "$repo"/commits/*)" | cut -c1-8)" >"$c/repo_text/prefix"
# A second catalog seed: the same tree with 512-byte pages (a smaller input mutates faster).
python3 - "$repo" "$c" <<'PY'
import os, shutil, sqlite3, sys
repo, c = sys.argv[1], sys.argv[2]
m = os.listdir(os.path.join(repo, "manifests"))[0]
dst = os.path.join(c, "manifest", "small-pages")
shutil.copy(os.path.join(repo, "manifests", m), dst)
db = sqlite3.connect(dst)
db.execute("PRAGMA journal_mode=DELETE")
db.execute("PRAGMA page_size=512")
db.execute("VACUUM")
db.close()
PY
python3 "$here/seeds.py" "$repo" "$c"
echo "make-corpus: fixture repository in $repo, seeds in $c"
