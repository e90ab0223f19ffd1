//! A real database server on a writable horcrux mount (issue 4): Debian's MariaDB.
//!
//! `mariadb-install-db` creates a data directory on the mount, `mariadbd` (private socket, no
//! networking) loads a table, `ALTER TABLE` rebuilds it (ALGORITHM=COPY and an in-place
//! rebuild: new files, renames, unlinks), the server restarts cleanly, and after an unmount and
//! a mount with the same `--overlay-dir` it starts again with every row and the altered schema.
//! The same scenario runs on a plain directory first, to check the harness.
//!
//! Needs the MariaDB server: `tests/setup.sh` installs it (hook `tests/setup.d/mariadb.sh`).
//! Run as root.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A MariaDB program, looked up on PATH and in the sbin directories; a missing one fails the
/// test with what to do.
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed: this test needs Debian's MariaDB server. Run `tests/setup.sh` \
         (as root; its hook tests/setup.d/mariadb.sh installs mariadb-server) and try again."
    );
}

/// A running `mariadbd`; killed on drop if it is still running.
struct Server {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Server {
    fn start(datadir: &Path, run: &Path) -> Server {
        fs::create_dir_all(run).unwrap();
        let socket = run.join("mysqld.sock");
        let log = run.join("error.log");
        let tmp = run.join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let child = Command::new(program("mariadbd"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            // A private tmpdir: its temporary tables are nobody else's business (a shared /tmp
            // may be cleaned under it by other tests).
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", run.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", log.display()))
            .args(["--skip-networking", "--user=root"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        let mut s = Server { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = s.child.try_wait().unwrap() {
                panic!(
                    "mariadbd on {} exited during startup ({st}); its error log:\n{}",
                    datadir.display(),
                    s.log_text()
                );
            }
            if s.admin(&["ping"]).status.success() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd on {} not answering after 120 s; its error log:\n{}",
                datadir.display(),
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn admin(&self, args: &[&str]) -> std::process::Output {
        Command::new(program("mariadb-admin"))
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .arg("--user=root")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb-admin")
    }

    /// Run SQL through the `mariadb` client (batch mode, no column names); returns stdout.
    fn sql(&self, sql: &str) -> String {
        let out = Command::new(program("mariadb"))
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["--user=root", "--batch", "--skip-column-names", "-e", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb");
        assert!(
            out.status.success(),
            "SQL failed: {sql}\n{}\nserver error log (tail):\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log_text(), 30)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `mariadb-admin shutdown` and wait for the process to exit cleanly.
    fn shutdown(mut self) {
        let out = self.admin(&["shutdown"]);
        assert!(
            out.status.success(),
            "mariadb-admin shutdown: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd did not exit after shutdown"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            st.success(),
            "mariadbd exited with {st} after shutdown; error log:\n{}",
            self.log_text()
        );
        let log = self.log_text();
        for bad in ["[ERROR]", "corrupt", "Corrupt"] {
            assert!(
                !log.contains(bad),
                "the server's error log has {bad:?}:\n{log}"
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

const ROWS: u32 = 5000;
const SUMMARY: &str = "SELECT COUNT(*), SUM(n), SUM(CRC32(v)), SUM(extra), MAX(id) FROM horcrux.t";
const COLUMNS: &str = "SELECT GROUP_CONCAT(COLUMN_NAME ORDER BY ORDINAL_POSITION) \
                       FROM information_schema.COLUMNS WHERE TABLE_SCHEMA='horcrux' AND TABLE_NAME='t'";

/// The expected summary after `load`, computed independently of the server.
fn expected_summary() -> String {
    let (mut count, mut sum_n, mut sum_crc, mut sum_extra, mut max_id) =
        (0u64, 0u64, 0u64, 0u64, 0);
    for i in 1..=ROWS {
        if i % 10 == 0 {
            continue; // deleted
        }
        let v = format!("row-{i}");
        let mut n = u64::from(i) * u64::from(i);
        if i % 7 == 0 {
            n += 1;
        }
        count += 1;
        sum_n += n;
        sum_crc += u64::from(crc32(v.as_bytes()));
        sum_extra += 7;
        max_id = i;
    }
    format!("{count}\t{sum_n}\t{sum_crc}\t{sum_extra}\t{max_id}")
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Install a data directory under `datadir`, load and alter, restart: the part that is the same
/// on a plain directory and on the mount.
fn create_load_alter_restart(datadir: &Path, run: &Path) {
    let tmp = run.join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let out = Command::new(program("mariadb-install-db"))
        .arg("--no-defaults")
        .arg(format!("--datadir={}", datadir.display()))
        .arg(format!("--tmpdir={}", tmp.display()))
        .args(["--user=root", "--skip-test-db"])
        .stdin(Stdio::null())
        .output()
        .expect("run mariadb-install-db");
    assert!(
        out.status.success(),
        "mariadb-install-db --datadir={} failed ({}):\n{}\n{}",
        datadir.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let s = Server::start(datadir, run);
    s.sql(
        "CREATE DATABASE horcrux; \
         CREATE TABLE horcrux.t (id INT PRIMARY KEY AUTO_INCREMENT, v VARCHAR(100) NOT NULL, \
                                 n BIGINT NOT NULL, KEY (v)) ENGINE=InnoDB",
    );
    s.sql(&format!(
        "SET SESSION max_recursive_iterations = 1000000; \
         INSERT INTO horcrux.t (v, n) WITH RECURSIVE s(i) AS \
         (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {ROWS}) \
         SELECT CONCAT('row-', i), i * i FROM s"
    ));
    s.sql(
        "DELETE FROM horcrux.t WHERE id % 10 = 0; \
         UPDATE horcrux.t SET n = n + 1 WHERE id % 7 = 0",
    );
    // Rebuilds: a copying ALTER (a new #sql table file renamed over the old one) and an
    // in-place one (same dance inside InnoDB).
    s.sql("ALTER TABLE horcrux.t ADD COLUMN extra INT NOT NULL DEFAULT 7, ALGORITHM=COPY");
    s.sql("ALTER TABLE horcrux.t ENGINE=InnoDB, ALGORITHM=INPLACE");
    s.sql("CREATE TABLE horcrux.gone (x INT) ENGINE=InnoDB; DROP TABLE horcrux.gone");
    let want = expected_summary();
    assert_eq!(s.sql(SUMMARY), want, "table summary after load and ALTER");
    assert_eq!(s.sql(COLUMNS), "id,v,n,extra", "columns after ALTER");
    s.shutdown();
    check(datadir, run, "restart");
}

/// Start the server on `datadir`, check the table, shut down.
fn check(datadir: &Path, run: &Path, when: &str) {
    let s = Server::start(datadir, run);
    assert_eq!(
        s.sql(SUMMARY),
        expected_summary(),
        "table summary after {when}"
    );
    assert_eq!(s.sql(COLUMNS), "id,v,n,extra", "columns after {when}");
    let chk = s.sql("CHECK TABLE horcrux.t");
    assert!(
        chk.ends_with("status\tOK"),
        "CHECK TABLE after {when}: {chk}"
    );
    assert_eq!(
        s.sql("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA='horcrux'"),
        "1",
        "tables in the database after {when}"
    );
    s.shutdown();
}

#[test]
fn mariadb_on_a_plain_directory() {
    let t = tempdir();
    create_load_alter_restart(&t.path().join("data"), &t.path().join("run"));
}

#[test]
fn mariadb_on_a_writable_mount_survives_alter_restart_and_remount() {
    let t = tempdir();
    let tp = t.path();
    let src = tp.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("README"), b"a volume for a database\n").unwrap();
    let repo = tp.join("repo");
    generate("db", &src, &repo);
    let (mnt, cache, overlay) = (tp.join("mnt"), tp.join("cache"), tp.join("overlay"));
    let run = tp.join("run");
    let m = Mount::new(&repo, &mnt, &cache, &overlay_args(&overlay, &[]));
    let datadir = m.path("data");
    let r = std::panic::catch_unwind(|| create_load_alter_restart(&datadir, &run));
    if let Err(e) = r {
        eprintln!("daemon log:\n{}", tail(&m.log_text(), 100));
        std::panic::resume_unwind(e);
    }
    m.unmount();
    let m = Mount::new(&repo, &mnt, &cache, &overlay_args(&overlay, &[]));
    let r = std::panic::catch_unwind(|| check(&m.path("data"), &run, "unmount and mount"));
    if let Err(e) = r {
        eprintln!("daemon log:\n{}", tail(&m.log_text(), 100));
        std::panic::resume_unwind(e);
    }
    assert_eq!(
        fs::read(m.path("README")).unwrap(),
        b"a volume for a database\n"
    );
    m.unmount();
}
