"""Seed inputs of the fuzz targets that are not files of the fixture repository: protobuf
messages of the peer protocol (hand-encoded: the wire format is small), plugin requests,
control lines, URLs, .meta files, config files and hash-tree shapes. Run by make-corpus.sh."""
import hashlib, json, os, struct, sys

repo, out = sys.argv[1], sys.argv[2]


def put(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def varint(n):
    b = bytearray()
    while True:
        x = n & 0x7F
        n >>= 7
        if n:
            b.append(x | 0x80)
        else:
            b.append(x)
            return bytes(b)


def field(num, value):
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


chunks = []
for fan in sorted(os.listdir(os.path.join(repo, "chunks"))):
    for name in sorted(os.listdir(os.path.join(repo, "chunks", fan))):
        with open(os.path.join(repo, "chunks", fan, name), "rb") as f:
            chunks.append((name, len(f.read())))

# peer_messages: selector byte, then the message.
for i, (cid, size) in enumerate(chunks):
    key = f"chunks/{cid[:2]}/{cid}"
    raw = bytes.fromhex(cid)
    # A one-block chunk's block hash is its id (block size 1 MiB).
    hint = field(1, raw) + field(2, size) + field(3, 1 << 20) + field(4, raw)
    for repo_name in ("fixture", "through"):
        req = field(1, repo_name) + field(2, key) + field(3, 1) + field(4, max(size - 2, 0)) + field(5, hint)
        put("peer_messages", f"read-{repo_name}-{i}", b"\x01" + req)
    put("peer_messages", f"read-nohint-{i}", b"\x01" + field(1, "fixture") + field(2, key) + field(4, size))
    put("peer_messages", f"have-{i}", b"\x00" + field(1, "fixture") + field(2, key) + field(3, raw))
put("peer_messages", "get", b"\x02" + field(1, "fixture") + field(2, "horcrux.json"))
put("peer_messages", "get-traversal", b"\x02" + field(1, "fixture") + field(2, "../horcrux.json"))
put("peer_messages", "list", b"\x03" + field(1, "fixture") + field(2, "volumes/"))
put("peer_messages", "have-reply", b"\x04\x02\x01" + field(1, 1) + field(1, 0) + field(2, field(1, b"\x00" * 32) + field(2, 1 << 20) + field(3, 5) + field(4, b"\x01")))
frames = b""
for j, data in enumerate([b"hello ", b"peer"]):
    msg = field(1, data) + (field(2, 10) if j == 0 else b"")
    frames += varint(len(msg)) + msg
put("peer_messages", "get-reply", b"\x05" + frames)
put("peer_messages", "list-reply", b"\x06" + field(1, field(1, "chunks/aa/bb") + field(2, 7)))

# plugin_requests: one request per line, `PATH BODY`.
put("plugin_requests", "lifecycle", "\n".join([
    "/Plugin.Activate",
    "/VolumeDriver.Capabilities",
    '/VolumeDriver.Create {"Name":"v1","Opts":{"access":"file:///srv/repo","name":"fixture","ref":"main"}}',
    '/VolumeDriver.Create {"Name":"v2","Opts":{"--access":"scp://dev@db:/opt/h,s3://b/p?region=r","read-only":"","cache-size":"10G"}}',
    '/VolumeDriver.Get {"Name":"v1"}',
    "/VolumeDriver.List",
    '/VolumeDriver.Mount {"Name":"v1","ID":"c1"}',
    '/VolumeDriver.Mount {"Name":"v1","ID":"c2"}',
    '/VolumeDriver.Path {"Name":"v1"}',
    '/VolumeDriver.Unmount {"Name":"v1","ID":"c1"}',
    '/VolumeDriver.Unmount {"Name":"v1","ID":"c2"}',
    '/VolumeDriver.Remove {"Name":"v1"}',
]))
put("plugin_requests", "bad", "\n".join([
    '/VolumeDriver.Create {"Name":"../x","Opts":{"access":"file:///r"}}',
    '/VolumeDriver.Create {"Name":"v","Opts":null}',
    '/VolumeDriver.Create {"Name":"v3","Opts":{"access":"s3://b/p?secret_access_key=x"}}',
    "/VolumeDriver.Mount null",
    "/VolumeDriver.Nope {}",
]))

# access_url
for i, u in enumerate([
    "file:///opt/horcrux-amcc", "cp:///opt/x%20y", "/opt/x, file:///b",
    "scp://dev@db:/opt/h", "ssh://dev@db:2222/opt/h", "ssh://[::1]:22/p",
    "s3://bucket/prefix?region=us-west-1&endpoint=http://127.0.0.1:9000&path_style",
    "horcrux://10.0.0.5:7443/amcc", "horcrux://[::1]:1/r", "ftp://x/y",
    "scp://u:pw@h:/p",
]):
    put("access_url", f"url-{i}", u)

# control_lines
for i, m in enumerate([
    {"v": 1, "type": "ping"}, {"v": 1, "type": "status"},
    {"v": 1, "type": "diff", "path": "db/ibdata1"},
    {"v": 1, "type": "discard", "path": {"hex": "61ff"}},
    {"v": 1, "type": "commit", "message": "m", "author": "a <a@b>"},
    {"v": 1, "type": "checkout", "rev": "main~1", "discard": False},
    {"v": 1, "type": "prefetch", "all": True, "paths": ["a", "b/c"], "bandwidth": 100, "concurrency": 4},
    {"v": 1, "type": "pong", "data": {"volume": "AMCC", "commit": "3f2a", "pid": 4242}},
    {"v": 1, "type": "diff", "data": [{"change": {"path": "a", "kind": {"renamed": {"from": "b"}}, "node_kind": "file", "data": True, "meta": False, "bytes": 3}, "old_size": 1, "new_size": 3, "ranges": [[0, 3]], "meta": [{"field": "mode", "old": "0644", "new": "0600"}]}]},
    {"v": 1, "type": "error", "data": {"message": "no"}},
    {"v": 2, "type": "ping"},
]):
    put("control_lines", f"line-{i}", json.dumps(m) + "\n")

# import_meta
def entry(name, prefix, mode, size, chunks):
    return {"Name": name, "Prefix": prefix, "IsDir": bool(mode & (1 << 31)),
            "Stat": {"Mode": mode, "Size": size, "Uid": 1, "Gid": 2}, "Number of Chunks": chunks}
meta = {"Config": {"Version": "00.03-rc2", "Chunk Type": 1, "Chunk Size": 4},
        "Current Version": "v1", "Num Files": 4,
        "Entry List": [entry("r", "", (1 << 31) | 0o755, 4096, 1),
                       entry("d", "r", (1 << 31) | 0o700, 4096, 1),
                       entry("f", "r/d", 0o644, 9, 3),
                       entry("e", "r", 0o600, 0, 0)]}
put("import_meta", "tree", json.dumps(meta, indent=4))
put("import_meta", "minimal", '{"Config": {"Chunk Size": 1048576}, "Entry List": [{"Name": "r", "Prefix": "", "IsDir": true, "Stat": {"Mode": 2147484141, "Size": 0}, "Number of Chunks": 1}]}')

# config_file
put("config_file", "full", '''log_level = "info"
tls_dir = "/etc/horcrux/tls"
[cache]
dir = "~/cache"
size = "20G"
[ssh]
identity = "~/.ssh/id_ed25519"
known_hosts = "~/.ssh/known_hosts"
[s3]
endpoint = "http://10.0.0.9:3900"
region = "eu-west-1"
profile = "backups"
[sources]
amcc = "scp://dev@dbhost:/opt/horcrux-amcc"
''')
put("config_file", "bytes", "[cache]\nsize = 10737418240\n")

# hashtree: mode byte (odd = honest data at 1/2/4 KiB blocks; even = hostile shape).
put("hashtree", "honest", b"\x01" + bytes(range(256)) * 20)
put("hashtree", "honest-4k", b"\x05" + bytes(range(256)) * 40)
shape = struct.pack("<QIi", 3000, 0, 2) + hashlib.blake2b(b"x", digest_size=32).digest() * 3
put("hashtree", "shape", b"\x50" + shape)
