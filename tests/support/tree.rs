//! Builds source trees with every kind of entry, and repositories/volumes from them through
//! the core API (no kernel involved).

#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use horcrux::cache::{Cache, CacheConfig};
use horcrux::fetch::{FetchConfig, Fetcher};
use horcrux::generate::{GenerateOptions, GenerateReport, NoProgress, generate};
use horcrux::repo::Repository;
use horcrux::store::{FileStore, Store};
use horcrux::volume::Volume;

pub const MIB: u64 = 1 << 20;

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Whether the filesystem under `dir` accepts user xattrs.
pub fn xattrs_supported(dir: &Path) -> bool {
    let p = dir.join(".xattr-probe");
    fs::write(&p, b"").unwrap();
    let ok = xattr::set(&p, "user.probe", b"1").is_ok();
    fs::remove_file(&p).unwrap();
    ok
}

/// A tree with every file type and the size edge cases for a 1 MiB chunk size.
pub fn rich_tree(root: &Path) {
    fs::create_dir_all(root).unwrap();
    let w = |p: &str, data: &[u8]| {
        let path = root.join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, data).unwrap();
    };
    w("empty", b"");
    w("small.txt", b"hello horcrux\n");
    for (name, len) in [("chunk-1", MIB - 1), ("chunk", MIB), ("chunk+1", MIB + 1)] {
        w(name, &bytes(len, len as usize));
    }
    w("big.bin", &bytes(7, (3 * MIB + 12345) as usize));
    for i in 0..200 {
        w(
            &format!("many/f{i:03}"),
            &bytes(i, (i * 97 % 5000) as usize),
        );
    }
    w("dir/ünïcødé 文件 🚀.txt", b"unicode name\n");
    let deep: String = (0..40).map(|i| format!("d{i}/")).collect();
    w(&format!("{deep}leaf"), b"deep\n");
    // Sparse: data, a 2 MiB hole, data.
    let f = fs::File::create(root.join("sparse")).unwrap();
    f.write_all_at(&bytes(11, 5000), 0).unwrap();
    f.write_all_at(&bytes(12, 7000), 3 * MIB).unwrap();
    f.set_len(4 * MIB).unwrap();
    symlink("small.txt", root.join("link")).unwrap();
    symlink("/etc/passwd", root.join("abs-link")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    fs::hard_link(root.join("small.txt"), root.join("dir/hard")).unwrap();
    let fifo = CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    std::mem::forget(std::os::unix::net::UnixListener::bind(root.join("live.sock")).unwrap());
    if unsafe { libc::geteuid() } == 0 {
        let dev = CString::new(root.join("null-dev").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path; makedev(1, 3) is /dev/null's number.
        assert_eq!(
            unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) },
            0
        );
    }
    fs::set_permissions(root.join("small.txt"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir_all(root.join("sticky")).unwrap();
    fs::set_permissions(root.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    if xattrs_supported(root) {
        xattr::set(root.join("small.txt"), "user.colour", b"green").unwrap();
        xattr::set(root.join("dir"), "user.empty", b"").unwrap();
    }
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(root.join("many/f001"))
        .unwrap();
    f.write_all(b"x").unwrap();
}

/// A generated repository with its own cache, and a volume over it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub src: PathBuf,
    pub repo_dir: PathBuf,
    pub runtime: tokio::runtime::Runtime,
    pub report: GenerateReport,
}

impl Fixture {
    /// Generate `build`'s tree as volume `vol` with a 1 MiB chunk size.
    pub fn new(build: impl FnOnce(&Path)) -> Self {
        // Under /var/tmp: tmpfs may lack user xattrs.
        let dir = tempfile::Builder::new()
            .prefix("horcrux-test")
            .tempdir_in("/var/tmp")
            .unwrap();
        let src = dir.path().join("src");
        build(&src);
        let repo_dir = dir.path().join("repo");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store: Arc<dyn Store> = Arc::new(FileStore::new(repo_dir.clone()));
        let repo = runtime.block_on(Repository::open_or_init(store)).unwrap();
        let opts = GenerateOptions {
            name: "vol".into(),
            input: src.clone(),
            chunk_size: MIB,
            block_size: 256 << 10,
            message: "test".into(),
            author: "tester".into(),
            workers: 2,
        };
        let report = generate(&opts, &repo, runtime.handle(), &NoProgress).unwrap();
        Self {
            dir,
            src,
            repo_dir,
            runtime,
            report,
        }
    }

    pub fn store(&self) -> Arc<dyn Store> {
        Arc::new(FileStore::new(self.repo_dir.clone()))
    }

    pub fn cache(&self, name: &str, max: Option<u64>) -> Arc<Cache> {
        Cache::open(CacheConfig {
            dir: self.dir.path().join(name),
            max_size: max,
        })
        .unwrap()
    }

    /// A volume of branch `main` reading through `cache`.
    pub fn volume(&self, cache: Arc<Cache>) -> Volume {
        self.volume_from(self.store(), cache, FetchConfig::default())
    }

    /// A writable volume of branch `main` with its changes in `overlay_dir`.
    pub fn writable(&self, cache: Arc<Cache>, overlay_dir: &Path) -> Volume {
        let v = self.volume(cache);
        let m = v.manifest().clone();
        let ov = horcrux::overlay::Overlay::open(overlay_dir).unwrap();
        ov.set_base(&horcrux::overlay::BaseInfo {
            volume: "vol".into(),
            commit: self.report.commit.to_hex(),
            manifest: self.report.manifest.to_hex(),
            max_ino: m.max_ino().unwrap(),
        })
        .unwrap();
        let fetcher = v.fetcher().clone();
        drop(v);
        Volume::with_overlay(m, fetcher, self.runtime.handle().clone(), ov).unwrap()
    }

    pub fn volume_from(
        &self,
        store: Arc<dyn Store>,
        cache: Arc<Cache>,
        cfg: FetchConfig,
    ) -> Volume {
        let rt = self.runtime.handle();
        let repo = rt.block_on(Repository::open(store.clone())).unwrap();
        let commit = rt.block_on(repo.resolve("vol", "main")).unwrap();
        let c = rt.block_on(repo.commit(commit)).unwrap();
        let m = rt
            .block_on(repo.manifest(c.manifest_id().unwrap(), &cache))
            .unwrap();
        let bs = m.header().block_size;
        let fetcher = Arc::new(Fetcher::new(store, cache, bs, cfg));
        Volume::new(m, fetcher, rt.clone())
    }
}
