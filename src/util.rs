//! Small filesystem helpers shared by the cache, stores and generate.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Write `data` to `path` atomically: temp file in the same directory, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = temp_name(path);
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `len` bytes at `offset` of `file` in a new buffer that is not zeroed first: the bytes are
/// overwritten at once, and zeroing 1 MiB costs a good part of reading it from the page cache.
/// Short only at the end of the file.
pub fn read_at_uninit(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let done = buf.len();
        // SAFETY: pread writes at most `len - done` bytes into the spare capacity that starts
        // at `done`; only the bytes it reports written are then marked initialised.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => break,
            n if n > 0 => unsafe { buf.set_len(done + n as usize) },
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(buf)
}

/// A unique temporary name next to `path` (same filesystem, so rename is atomic).
pub fn temp_name(path: &Path) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

/// fsync a directory so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Human-readable size: `1.5 GiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Lowers the calling thread's CPU priority (its nice value) by `by` until dropped, where the
/// process may raise it back: root, or an `RLIMIT_NICE` that allows it. Elsewhere it does
/// nothing, since a pooled thread left behind at a lower priority would slow whatever runs on
/// it next. Bulk transfers use it so that, on a busy machine, the work of a small read (its
/// wake-ups, its decryption) is not queued behind theirs.
#[derive(Debug)]
#[must_use = "the priority is restored when this is dropped"]
pub struct LowerPriority(Option<libc::c_int>);

impl LowerPriority {
    pub fn new(by: libc::c_int) -> Self {
        static CAN_RESTORE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        // Probed on a thread of its own, so that a failed restore strands no pooled thread.
        let can = *CAN_RESTORE.get_or_init(|| {
            std::thread::spawn(|| {
                let before = thread_nice();
                set_thread_nice(before + 1) && set_thread_nice(before)
            })
            .join()
            .unwrap_or(false)
        });
        if !can {
            return LowerPriority(None);
        }
        let before = thread_nice();
        LowerPriority(set_thread_nice((before + by).min(19)).then_some(before))
    }
}

impl Drop for LowerPriority {
    fn drop(&mut self) {
        if let Some(before) = self.0 {
            set_thread_nice(before);
        }
    }
}

fn thread_nice() -> libc::c_int {
    // SAFETY: getpriority/gettid take plain integers; for the calling thread it cannot fail.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
}

fn set_thread_nice(nice: libc::c_int) -> bool {
    // SAFETY: as above; PRIO_PROCESS with a thread id sets that one thread's nice value.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) == 0 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lower_priority_is_undone_on_drop_or_never_taken() {
        std::thread::spawn(|| {
            let before = super::thread_nice();
            let can = {
                let _low = super::LowerPriority::new(5);
                let during = super::thread_nice();
                // Either lowered by 5 (capped at 19), or left alone where it could not be undone.
                assert!(
                    during == (before + 5).min(19) || during == before,
                    "{before} -> {during}"
                );
                during != before
            };
            assert_eq!(super::thread_nice(), before, "restored on drop");
            // Root (as the tests run in CI) may always restore, so it must have lowered.
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 && before < 19 {
                assert!(can, "root lowers the priority");
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn read_at_uninit_reads_the_range_and_stops_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert_eq!(
            super::read_at_uninit(&f, 1234, 50_000).unwrap(),
            &data[1234..51_234]
        );
        assert_eq!(
            super::read_at_uninit(&f, 99_990, 100).unwrap(),
            &data[99_990..]
        );
        assert!(super::read_at_uninit(&f, 200_000, 10).unwrap().is_empty());
    }

    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_size(10), "10 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(64 << 20), "64.0 MiB");
    }

    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path().join("a")).unwrap().count(), 1);
    }
}

/// A time in UTC, RFC 3339: `2026-12-01T10:46:30Z`, or with nanoseconds when `nanos` is given
/// (`2026-12-01T10:46:30.123456789Z`).
fn rfc3339_parts(secs: i64, nanos: Option<i64>) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let frac = nanos.map_or(String::new(), |n| format!(".{n:09}"));
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Seconds since the epoch as RFC 3339 in UTC (`2026-12-01T10:46:30Z`).
pub fn rfc3339(secs: i64) -> String {
    rfc3339_parts(secs, None)
}

/// Nanoseconds since the epoch as RFC 3339 in UTC with nanoseconds.
pub fn rfc3339_ns(t: i64) -> String {
    rfc3339_parts(
        t.div_euclid(1_000_000_000),
        Some(t.rem_euclid(1_000_000_000)),
    )
}

#[cfg(test)]
mod time_tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339_ns(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_ns(1_796_123_035_465_115_984),
            "2026-12-01T11:03:55.465115984Z"
        );
        assert_eq!(rfc3339_ns(-1), "1969-12-31T23:59:59.999999999Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
