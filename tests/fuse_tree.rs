//! A generated tree with every kind of entry, mounted through the kernel, is the source's tree:
//! byte for byte and stat for stat.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use common::*;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// lgetxattr into a buffer of `size` bytes: Ok(length) or Err(errno).
fn lgetxattr(p: &Path, name: &str, size: usize) -> Result<usize, i32> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; size.max(1)];
    // SAFETY: valid strings; `buf` holds at least `size` bytes.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(r as usize)
    }
}

fn llistxattr(p: &Path, size: usize) -> Result<usize, i32> {
    let c = cpath(p);
    let mut buf = vec![0u8; size.max(1)];
    // SAFETY: valid path; `buf` holds at least `size` bytes.
    let r = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), size) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(r as usize)
    }
}

#[test]
fn mounted_tree_matches_the_source() {
    let t = tempdir();
    let src = t.path().join("src");
    let tree = rich_tree(&src);
    let repo = t.path().join("repo");
    generate("rich", &src, &repo);
    let m = Mount::new(
        &repo,
        &t.path().join("mnt"),
        &t.path().join("cache"),
        &["--name", "rich", "--read-only"],
    );

    let n = compare_trees(&src, &m.mountpoint, tree.xattrs);
    assert!(n >= 1570, "only {n} entries compared");
    // A second pass is served from the kernel's caches and ours: still identical.
    compare_trees(&src, &m.mountpoint, tree.xattrs);

    // The xattr size-probe protocol: size 0 asks for the length, too small is ERANGE.
    if tree.xattrs {
        let p = m.path("small.txt");
        assert_eq!(lgetxattr(&p, "user.colour", 0), Ok(5));
        assert_eq!(lgetxattr(&p, "user.colour", 2), Err(libc::ERANGE));
        assert_eq!(lgetxattr(&p, "user.colour", 64), Ok(5));
        assert_eq!(lgetxattr(&p, "user.nope", 64), Err(libc::ENODATA));
        let list_len = llistxattr(&p, 0).unwrap();
        assert_eq!(list_len, "user.binary\0user.colour\0".len());
        assert_eq!(llistxattr(&p, 3), Err(libc::ERANGE));
        assert_eq!(lgetxattr(&m.path("dir"), "user.empty", 0), Ok(0));
    }

    // Read-only: writes are refused by the kernel with EROFS.
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("small.txt"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = std::fs::create_dir(m.path("newdir")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

    // Missing names are ENOENT (and stay so: negative entries are cached).
    for _ in 0..2 {
        let e = std::fs::symlink_metadata(m.path("no/such")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
    // A file is not a directory.
    let e = std::fs::read_dir(m.path("small.txt")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR), "{e}");

    // statfs reports the volume's totals, read-only.
    let c = cpath(&m.mountpoint);
    // SAFETY: valid path and a zeroed statvfs to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert!(st.f_files >= 1500, "f_files {}", st.f_files);
    assert!(st.f_blocks > 0);
    assert_eq!(st.f_flag & libc::ST_RDONLY, libc::ST_RDONLY);

    m.unmount();
}
