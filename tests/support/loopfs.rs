//! A small real filesystem for disk-full tests: an ext4 image loop-mounted (`mount -o loop`,
//! which sets up an auto-clearing loop device) under a temporary directory, with a filler file
//! to leave a chosen amount of free space. Unmounted and deleted on drop. Run as root.

#![allow(dead_code)]

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What `fill_all` leaves to plain writes after its fallocate.
const MIB_LEFT: u64 = 1 << 20;

#[derive(Debug)]
pub struct LoopFs {
    /// Where the filesystem is mounted.
    pub root: PathBuf,
    image: PathBuf,
}

impl LoopFs {
    /// A fresh `size_mib` MiB ext4 filesystem mounted at `<dir>/loopfs`.
    pub fn new(dir: &Path, size_mib: u64) -> LoopFs {
        let image = dir.join("loopfs.img");
        let root = dir.join("loopfs");
        fs::create_dir_all(&root).unwrap();
        fs::File::create(&image)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        // -m 0: no blocks reserved for root (the tests run as root, who may use them).
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-E", "nodiscard"])
            .arg(&image)
            .status()
            .expect("run mkfs.ext4 (e2fsprogs)");
        assert!(st.success(), "mkfs.ext4 {} failed", image.display());
        let st = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&root)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mount -o loop {} {} failed (root and loop devices needed)",
            image.display(),
            root.display()
        );
        LoopFs { root, image }
    }

    /// Bytes available to unprivileged and privileged writers alike (`-m 0`).
    pub fn free(&self) -> u64 {
        let s = crate::common::statvfs(&self.root).unwrap();
        s.f_bavail as u64 * s.f_frsize as u64
    }

    /// Fill the filesystem with `<root>/filler` until about `leave` bytes remain free.
    pub fn fill_leaving(&self, leave: u64) -> PathBuf {
        let p = self.root.join("filler");
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        let have = f.metadata().unwrap().len();
        let grow = self.free().saturating_sub(leave);
        if grow > 0 {
            // SAFETY: fallocate on a descriptor we own.
            let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, have as i64, grow as i64) };
            assert_eq!(
                rc,
                0,
                "fallocate filler: {}",
                std::io::Error::last_os_error()
            );
        }
        f.sync_all().unwrap();
        p
    }

    /// Fill the filesystem completely: the filler grows until a write fails with ENOSPC.
    pub fn fill_all(&self) {
        self.fill_leaving(MIB_LEFT);
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.root.join("filler"))
            .unwrap();
        let page = vec![0x5au8; 4096];
        loop {
            match std::io::Write::write_all(&mut f, &page).and_then(|()| f.sync_data()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.root.display()),
            }
        }
    }

    /// Remove the filler file: space is free again.
    pub fn unfill(&self) {
        let _ = fs::remove_file(self.root.join("filler"));
        let _ = fs::File::open(&self.root).and_then(|d| d.sync_all());
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.root)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds it (a daemon being killed): detach lazily; the loop
            // device is released when the last user goes.
            let _ = Command::new("umount").arg("-l").arg(&self.root).status();
        }
        let _ = fs::remove_file(&self.image);
    }
}
