//! `horcrux demo`: the main job end to end on a built-in sample.
//!
//! It builds a small tree with the awkward cases (a sparse file, a hundred small files, a
//! symlink, a hard link, nested directories, an xattr), then runs the very commands a user would
//! type — `generate`, `mount`, `cache stats`, `status`, `commit`, `log`, `umount` — by invoking
//! this executable,
//! printing each command first. In between it walks the mount like `ls -lR`, compares every
//! entry with the source (metadata, and a blake3 checksum of every file), then writes: a 4 KiB
//! patch in the middle of the big file (nothing of it is fetched), an append, a new file, a
//! rename and a delete, and checks them again after a remount. Any mismatch makes it exit
//! non-zero.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use horcrux_fuse::mountinfo;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Work directory for the sample tree, repository, cache and mountpoint (emptied first)
    #[arg(long, default_value = "/tmp/horcrux-demo")]
    pub dir: PathBuf,
}

/// Marks a directory as the demo's own, so a re-run may delete it and nothing else.
const MARKER: &str = ".horcrux-demo";
const MIB: u64 = 1 << 20;
/// The chunk size the demo generates with: small, so the 20 MiB file spans several chunks.
const CHUNK_SIZE: &str = "4M";
const XATTR_NAME: &str = "user.horcrux.demo";
const XATTR_VALUE: &[u8] = b"stored in the manifest, served by the mount";

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the horcrux executable")?;
    println!(
        "horcrux demo: generate a volume from a sample tree, mount it, read it, compare, write."
    );
    println!("(`horcrux` below is {})", exe.display());

    let dir = prepare_dir(&exe, &a.dir)?;
    let src = dir.join("src");
    let repo = dir.join("repo");
    let mnt = dir.join("mnt");
    let cache = dir.join("cache");

    section("1. a sample tree");
    let xattr = build_tree(&src)?;
    let (entries, bytes) = tree_size(&src)?;
    println!(
        "{}: {entries} entries, {} of file data (a 20 MiB file with an 8 MiB hole, 100 small files, \
         a symlink, a hard link, nested directories{})",
        src.display(),
        human(bytes),
        if xattr {
            ", an xattr"
        } else {
            "; this filesystem has no user xattrs"
        }
    );

    section("2. generate: cut it into content-addressed chunks and a manifest");
    let t = Instant::now();
    horcrux(
        &exe,
        &[
            "generate",
            "--chunk-size",
            CHUNK_SIZE,
            "demo",
            path_str(&src)?,
            path_str(&repo)?,
        ],
    )?;
    println!("generated in {:.2} s", t.elapsed().as_secs_f64());

    section("3. mount: lazily, fetching only what is read; writable");
    fs::create_dir_all(&mnt)?;
    let access = format!("file://{}", repo.display());
    let overlay = dir.join("overlay");
    let mount_args = [
        "mount",
        &access,
        path_str(&mnt)?,
        "--name",
        "demo",
        "--cache-dir",
        path_str(&cache)?,
        "--overlay-dir",
        path_str(&overlay)?,
    ];
    let t = Instant::now();
    horcrux(&exe, &mount_args)?;
    println!("mounted (live) in {:.2} s", t.elapsed().as_secs_f64());

    // From here on, unmount whatever happens.
    let result = read_and_compare(&exe, &src, &mnt, &cache, xattr)
        .and_then(|failures| Ok(failures + write_and_check(&exe, &mnt, &cache)?));
    section("7. umount, mount again: the changes are still there");
    let unmounted = horcrux(&exe, &["umount", path_str(&mnt)?]);
    let mut failures = result?;
    unmounted?;
    horcrux(&exe, &mount_args)?;
    let again = check_writes(&mnt);
    let unmounted = horcrux(&exe, &["umount", path_str(&mnt)?]);
    failures += again?;
    unmounted?;

    section("result");
    if failures > 0 {
        bail!(
            "{failures} mismatches between the mount and what was expected (see FAIL lines above)"
        );
    }
    println!(
        "OK: every entry of the mount matched the source, and every write read back, also after \
         a remount. Work directory: {}",
        dir.display()
    );
    Ok(())
}

/// The 4 KiB patch written into the middle of `big.bin`.
const PATCH_AT: u64 = 3 * MIB + 12_345;

/// Step 6: write through the mount; returns the number of mismatches.
fn write_and_check(exe: &Path, mnt: &Path, cache: &Path) -> anyhow::Result<usize> {
    section("6. write: copy-on-write into an overlay beside the cache");
    let before = cache_bytes(cache);
    let t = Instant::now();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big.bin"))?;
    f.write_all_at(&[b'#'; 4096], PATCH_AT)?;
    f.sync_all()?;
    println!(
        "wrote 4 KiB at offset {PATCH_AT} of big.bin and fsync'd in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut log = fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("texts/00/file-000.txt"))?;
    log.write_all(b"appended through the mount\n")?;
    fs::write(mnt.join("new.txt"), b"created through the mount\n")?;
    fs::rename(mnt.join("run.sh"), mnt.join("a/run-moved.sh"))?;
    fs::remove_file(mnt.join("empty"))?;
    println!(
        "appended to texts/00/file-000.txt, created new.txt, renamed run.sh to a/run-moved.sh, \
         removed empty"
    );
    let fetched = cache_bytes(cache).saturating_sub(before);
    println!("bytes the writes fetched from the repository: {fetched}");
    horcrux(exe, &["status", path_str(mnt)?])?;
    let failures = check_writes(mnt)?;
    section("6b. commit: the changes become a new version (only what changed is stored)");
    horcrux(
        exe,
        &[
            "commit",
            "-m",
            "demo: a patch, an append, a new file, a rename, a delete",
            "--author",
            "horcrux demo <demo@localhost>",
            path_str(mnt)?,
        ],
    )?;
    horcrux(exe, &["log", "--oneline", path_str(mnt)?])?;
    horcrux(exe, &["status", path_str(mnt)?])?;
    Ok(failures)
}

/// Bytes in the cache's chunk files (what was fetched).
fn cache_bytes(cache: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        let Ok(rd) = fs::read_dir(p) else { return 0 };
        rd.flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.blocks() * 512,
                Err(_) => 0,
            })
            .sum()
    }
    walk(&cache.join("chunks"))
}

/// Read back what step 6 wrote; returns the number of mismatches.
fn check_writes(mnt: &Path) -> anyhow::Result<usize> {
    let mut failures = 0;
    let mut check = |what: &str, ok: bool| {
        println!("{} {what}", if ok { "OK  " } else { "FAIL" });
        failures += usize::from(!ok);
    };
    let f = fs::File::open(mnt.join("big.bin"))?;
    let mut buf = vec![0u8; 4096 + 2];
    f.read_exact_at(&mut buf, PATCH_AT - 1)?;
    let first = pseudo_random(1, (6 * MIB) as usize);
    let at = PATCH_AT as usize;
    check(
        "big.bin: the patch, and the base bytes around it",
        buf[1..4097].iter().all(|b| *b == b'#')
            && buf[0] == first[at - 1]
            && buf[4097] == first[at + 4096],
    );
    let mut head = vec![0u8; 16];
    f.read_exact_at(&mut head, 14 * MIB)?;
    let second = pseudo_random(2, 16);
    check("big.bin: untouched data still the base's", head == second);
    let text = fs::read_to_string(mnt.join("texts/00/file-000.txt"))?;
    check(
        "texts/00/file-000.txt: appended line (and its hard link sees it)",
        text.ends_with("appended through the mount\n")
            && fs::read_to_string(mnt.join("hardlink-to-file-000.txt"))? == text,
    );
    check(
        "new.txt created",
        fs::read(mnt.join("new.txt")).ok().as_deref() == Some(b"created through the mount\n"),
    );
    check(
        "run.sh moved to a/run-moved.sh",
        !mnt.join("run.sh").exists() && mnt.join("a/run-moved.sh").exists(),
    );
    check("empty removed", !mnt.join("empty").exists());
    Ok(failures)
}

/// Steps 4 and 5; returns the number of mismatches.
fn read_and_compare(
    exe: &Path,
    src: &Path,
    mnt: &Path,
    cache: &Path,
    xattr: bool,
) -> anyhow::Result<usize> {
    section("4. read: ls -lR of the mount");
    list_tree(mnt, mnt)?;

    section("5. compare with the source (metadata, and blake3 of every file)");
    let t = Instant::now();
    let mut cmp = Compare::default();
    cmp.dir(src, mnt, Path::new(""), xattr)?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{} entries compared, {} files read ({} in {:.2} s): {} OK, {} FAIL",
        cmp.entries,
        cmp.files,
        human(cmp.bytes),
        secs,
        cmp.entries - cmp.failures,
        cmp.failures
    );

    section("cache: what the reads fetched");
    horcrux(exe, &["cache", "stats", "--cache-dir", path_str(cache)?])?;
    Ok(cmp.failures)
}

fn section(title: &str) {
    println!("\n==> {title}");
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not valid UTF-8", p.display()))
}

/// Run `horcrux ARGS...`, printing the command first; an unsuccessful exit is an error.
fn horcrux(exe: &Path, args: &[&str]) -> anyhow::Result<()> {
    // Printed as a shell would need it: arguments with spaces or `<>` quoted.
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains([' ', '<', '>']) {
                format!("'{a}'")
            } else {
                a.to_string()
            }
        })
        .collect();
    println!("$ horcrux {}", shown.join(" "));
    std::io::stdout().flush().ok();
    let status = Command::new(exe)
        .args(args)
        .status()
        .with_context(|| format!("running {}", exe.display()))?;
    if !status.success() {
        bail!("`horcrux {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Make `dir` an empty demo directory: unmount a stale mount left at `dir/mnt`, then delete the
/// previous run (only if it carries the demo's marker). Returns the absolute path.
fn prepare_dir(exe: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let mnt = dir.join("mnt");
    if mountinfo::find(&mnt)?.is_some() {
        println!(
            "a previous demo's mount is still at {}: unmounting it",
            mnt.display()
        );
        if horcrux(exe, &["umount", path_str(&mnt)?]).is_err() {
            // A dead daemon: detach the mount lazily.
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&mnt)
                .status();
            let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        }
        if mountinfo::find(&mnt)?.is_some() {
            bail!(
                "{} is still mounted; unmount it (umount -l {}) and run the demo again",
                mnt.display(),
                mnt.display()
            );
        }
    }
    let is_empty = fs::read_dir(&dir)?.next().is_none();
    if !is_empty {
        if !dir.join(MARKER).exists() {
            bail!(
                "{} is not empty and is not a directory the demo made; choose another --dir",
                dir.display()
            );
        }
        for e in fs::read_dir(&dir)? {
            let p = e?.path();
            if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            }
            .with_context(|| format!("removing {}", p.display()))?;
        }
    }
    fs::write(
        dir.join(MARKER),
        b"work directory of `horcrux demo`; deleted by its next run\n",
    )?;
    Ok(dir)
}

/// Deterministic incompressible bytes (xorshift64*).
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Build the sample tree; returns whether the xattr could be set.
fn build_tree(src: &Path) -> anyhow::Result<bool> {
    fs::create_dir_all(src)?;
    // A 20 MiB file: 6 MiB of data, an 8 MiB hole, 6 MiB of data.
    let big = src.join("big.bin");
    let f = fs::File::create(&big)?;
    f.write_all_at(&pseudo_random(1, (6 * MIB) as usize), 0)?;
    f.write_all_at(&pseudo_random(2, (6 * MIB) as usize), 14 * MIB)?;
    f.set_len(20 * MIB)?;
    f.sync_all()?;
    // A hundred small text files in ten directories.
    for d in 0..10 {
        let dir = src.join("texts").join(format!("{d:02}"));
        fs::create_dir_all(&dir)?;
        for i in 0..10 {
            let n = d * 10 + i;
            let mut text = String::new();
            for line in 0..(n % 7 + 1) * 3 {
                text.push_str(&format!(
                    "file {n:03}, line {line}: horcrux serves this byte for byte\n"
                ));
            }
            fs::write(dir.join(format!("file-{n:03}.txt")), text)?;
        }
    }
    // Nested directories, an empty file, an executable, a symlink, a hard link.
    let deep = src.join("a/b/c/d");
    fs::create_dir_all(&deep)?;
    fs::write(deep.join("deep.txt"), b"four levels down\n")?;
    fs::write(src.join("empty"), b"")?;
    let script = src.join("run.sh");
    fs::write(&script, b"#!/bin/sh\necho hello from a horcrux volume\n")?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    symlink("big.bin", src.join("link-to-big"))?;
    symlink("a/b/c/d/deep.txt", src.join("link-to-deep"))?;
    fs::hard_link(
        src.join("texts/00/file-000.txt"),
        src.join("hardlink-to-file-000.txt"),
    )?;
    Ok(set_xattr(&big, XATTR_NAME, XATTR_VALUE).is_ok())
}

fn tree_size(root: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut entries, mut bytes) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            entries += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                bytes += m.len();
            }
        }
    }
    Ok((entries, bytes))
}

fn c_path(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).context("path with a NUL byte")
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> anyhow::Result<()> {
    let p = c_path(path)?;
    let n = CString::new(name)?;
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// The `user.*` extended attributes of `path` (not following symlinks), by name.
fn user_xattrs(path: &Path) -> anyhow::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let p = c_path(path)?;
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: valid path, buffer of the given length.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTSUP) {
            return Ok(BTreeMap::new());
        }
        return Err(e.into());
    }
    names.truncate(n as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
        let cn = CString::new(name)?;
        let mut val = vec![0u8; 64 * 1024];
        // SAFETY: valid strings, buffer of the given length.
        let m =
            unsafe { libc::lgetxattr(p.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        if m < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        val.truncate(m as usize);
        out.insert(name.to_vec(), val);
    }
    Ok(out)
}

fn mode_string(m: &fs::Metadata) -> String {
    let ft = m.file_type();
    let t = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else {
        '-'
    };
    let mode = m.mode();
    let mut s = String::from(t);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// `ls -lR`: each directory, then its entries with mode, links, owner, size and name.
fn list_tree(root: &Path, dir: &Path) -> anyhow::Result<()> {
    let rel = dir.strip_prefix(root).unwrap_or(dir);
    println!("./{}:", rel.display());
    let mut names: Vec<_> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let mut subdirs = Vec::new();
    for name in names {
        let p = dir.join(&name);
        let m = fs::symlink_metadata(&p)?;
        let target = if m.file_type().is_symlink() {
            format!(" -> {}", fs::read_link(&p)?.display())
        } else {
            String::new()
        };
        println!(
            "  {} {:>2} {:>5} {:>5} {:>9} {}{}",
            mode_string(&m),
            m.nlink(),
            m.uid(),
            m.gid(),
            m.len(),
            name.to_string_lossy(),
            target
        );
        if m.is_dir() {
            subdirs.push(p);
        }
    }
    for d in subdirs {
        list_tree(root, &d)?;
    }
    Ok(())
}

/// Walks source and mount side by side.
#[derive(Debug, Default)]
struct Compare {
    entries: usize,
    files: usize,
    bytes: u64,
    failures: usize,
}

impl Compare {
    fn fail(&mut self, rel: &Path, why: String) {
        self.failures += 1;
        println!("FAIL {}: {why}", rel.display());
    }

    fn names(dir: &Path) -> anyhow::Result<Vec<std::ffi::OsString>> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        v.sort();
        Ok(v)
    }

    fn dir(&mut self, src: &Path, mnt: &Path, rel: &Path, xattr: bool) -> anyhow::Result<()> {
        let s_names = Self::names(&src.join(rel))?;
        let m_names = Self::names(&mnt.join(rel))?;
        if s_names != m_names {
            let show = |v: &[std::ffi::OsString]| {
                v.iter()
                    .map(|n| n.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            self.fail(
                rel,
                format!(
                    "directory lists differ: source [{}], mount [{}]",
                    show(&s_names),
                    show(&m_names)
                ),
            );
        }
        for name in s_names.iter().filter(|n| m_names.contains(n)) {
            let r = rel.join(name);
            self.entry(src, mnt, &r, xattr)?;
        }
        Ok(())
    }

    fn entry(&mut self, src: &Path, mnt: &Path, rel: &Path, xattr: bool) -> anyhow::Result<()> {
        self.entries += 1;
        let (sp, mp) = (src.join(rel), mnt.join(rel));
        let s = fs::symlink_metadata(&sp)?;
        let m = match fs::symlink_metadata(&mp) {
            Ok(m) => m,
            Err(e) => {
                self.fail(rel, format!("stat on the mount failed: {e}"));
                return Ok(());
            }
        };
        let before = self.failures;
        let mut check = |what: &str, a: String, b: String| {
            if a != b {
                self.fail(rel, format!("{what}: source {a}, mount {b}"));
            }
        };
        check("mode", format!("{:o}", s.mode()), format!("{:o}", m.mode()));
        check("uid", s.uid().to_string(), m.uid().to_string());
        check("gid", s.gid().to_string(), m.gid().to_string());
        check(
            "mtime",
            format!("{}.{:09}", s.mtime(), s.mtime_nsec()),
            format!("{}.{:09}", m.mtime(), m.mtime_nsec()),
        );
        if !s.is_dir() {
            check("size", s.len().to_string(), m.len().to_string());
            check("link count", s.nlink().to_string(), m.nlink().to_string());
        }
        if s.file_type().is_symlink() && m.file_type().is_symlink() {
            check(
                "symlink target",
                fs::read_link(&sp)?.display().to_string(),
                fs::read_link(&mp)?.display().to_string(),
            );
        }
        if xattr {
            let sx = user_xattrs(&sp)?;
            match user_xattrs(&mp) {
                Ok(mx) if mx == sx => {}
                Ok(mx) => self.fail(rel, format!("xattrs: source {sx:?}, mount {mx:?}")),
                Err(e) => self.fail(rel, format!("listing xattrs on the mount failed: {e}")),
            }
        }
        if s.is_dir() && m.is_dir() {
            return self.dir(src, mnt, rel, xattr);
        }
        if s.is_file() && m.is_file() {
            self.files += 1;
            let a = fs::read(&sp)?;
            match fs::read(&mp) {
                Ok(b) => {
                    self.bytes += b.len() as u64;
                    let (ha, hb) = (blake3_hex(&a), blake3_hex(&b));
                    if ha != hb {
                        self.fail(
                            rel,
                            format!("content: source blake3 {ha}, mount blake3 {hb}"),
                        );
                    } else if self.failures == before {
                        println!("OK   {}  {}", &hb[..16], rel.display());
                    }
                }
                Err(e) => self.fail(rel, format!("reading through the mount failed: {e}")),
            }
        }
        Ok(())
    }
}

fn blake3_hex(data: &[u8]) -> String {
    // A chunk id is exactly the blake3 of the bytes.
    horcrux::ids::ChunkId::of(data).to_hex()
}

fn human(bytes: u64) -> String {
    horcrux::util::human_size(bytes)
}
