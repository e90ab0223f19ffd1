//! The configuration file through the CLI: `cache.dir` and `cache.size` take effect and flags
//! override them; `$XDG_CONFIG_HOME/horcrux/config.toml` is read, `HORCRUX_CONFIG` and
//! `--config` choose another file; a source name works as an access URL (a real mount); errors
//! name the file, the key and the line. Build the binary first: `cargo build --workspace`.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;

/// `horcrux ARGS` with a clean configuration environment plus `env`.
fn run(args: &[&OsStr], env: &[(&str, &OsStr)], home: &Path) -> Output {
    let mut c = Command::new(horcrux_bin());
    c.args(args)
        .stdin(Stdio::null())
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("HORCRUX_CONFIG")
        .env_remove("HORCRUX_CACHE_DIR")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run horcrux")
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: Output) -> String {
    assert!(
        !o.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .trim()
}

#[test]
fn cache_settings_from_the_file_and_flags_over_them() {
    let tmp = tempdir();
    let home = tmp.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let from_file = tmp.path().join("cache-from-file");
    let cfg = tmp.path().join("c.toml");
    fs::write(
        &cfg,
        format!(
            "[cache]\ndir = \"{}\"\nsize = \"3G\"\n",
            from_file.display()
        ),
    )
    .unwrap();
    let c = cfg.as_os_str();
    let out = ok(run(
        &["--config".as_ref(), c, "cache".as_ref(), "stats".as_ref()],
        &[],
        &home,
    ));
    assert_eq!(field(&out, "cache"), from_file.display().to_string());
    assert!(field(&out, "bound").starts_with("3.0 GiB"), "{out}");
    assert!(from_file.is_dir());

    // Flags win over the file.
    let flagged = tmp.path().join("cache-from-flag");
    let out = ok(run(
        &[
            "--config".as_ref(),
            c,
            "cache".as_ref(),
            "stats".as_ref(),
            "--cache-dir".as_ref(),
            flagged.as_os_str(),
            "--cache-size".as_ref(),
            "1G".as_ref(),
        ],
        &[],
        &home,
    ));
    assert_eq!(field(&out, "cache"), flagged.display().to_string());
    assert!(field(&out, "bound").starts_with("1.0 GiB"), "{out}");
    // And so does the environment (HORCRUX_CACHE_DIR), chosen file by HORCRUX_CONFIG.
    let from_env = tmp.path().join("cache-from-env");
    let out = ok(run(
        &["cache".as_ref(), "stats".as_ref()],
        &[
            ("HORCRUX_CONFIG", c),
            ("HORCRUX_CACHE_DIR", from_env.as_os_str()),
        ],
        &home,
    ));
    assert_eq!(field(&out, "cache"), from_env.display().to_string());
    assert!(field(&out, "bound").starts_with("3.0 GiB"), "{out}");

    // `config show` says where each value came from.
    let out = ok(run(
        &["--config".as_ref(), c, "config".as_ref()],
        &[],
        &home,
    ));
    assert!(
        out.lines().any(|l| l.starts_with("cache.size")
            && l.contains("3.0 GiB")
            && l.ends_with(&format!("# {}", cfg.display()))),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("s3.region") && l.ends_with("# default")),
        "{out}"
    );
}

#[test]
fn user_file_is_read_and_a_source_name_is_an_access_url() {
    let tmp = tempdir();
    let home = tmp.path().join("home");
    let xdg = tmp.path().join("xdg");
    fs::create_dir_all(xdg.join("horcrux")).unwrap();
    fs::create_dir_all(&home).unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("hello"), b"hello from a named source\n").unwrap();
    let repo = tmp.path().join("repo");
    generate("V", &src, &repo);
    let cache = tmp.path().join("user-cache");
    fs::write(
        xdg.join("horcrux/config.toml"),
        format!(
            "[cache]\ndir = \"{}\"\n[sources]\nmine = \"file://{}\"\n",
            cache.display(),
            repo.display()
        ),
    )
    .unwrap();
    let env = [("XDG_CONFIG_HOME", xdg.as_os_str())];
    let out = ok(run(&["config".as_ref()], &env, &home));
    assert!(
        out.contains("sources.mine") && out.contains(&cache.display().to_string()),
        "{out}"
    );
    // `verify mine` and a mount of `mine`, with the cache where the file says.
    ok(run(&["verify".as_ref(), "mine".as_ref()], &env, &home));
    let mp = tmp.path().join("mnt");
    fs::create_dir_all(&mp).unwrap();
    let out = ok(run(
        &[
            "mount".as_ref(),
            "mine".as_ref(),
            mp.as_os_str(),
            "--read-only".as_ref(),
        ],
        &env,
        &home,
    ));
    let mounted = is_mounted(&mp.canonicalize().unwrap());
    let content = fs::read(mp.join("hello"));
    let _ = run(&["umount".as_ref(), mp.as_os_str()], &env, &home);
    assert!(mounted, "{out}");
    assert_eq!(content.unwrap(), b"hello from a named source\n");
    assert!(
        cache.join("index.sqlite").exists(),
        "the cache is not in {}",
        cache.display()
    );
}

#[test]
fn bad_files_are_clear_errors() {
    let tmp = tempdir();
    let home = tmp.path().to_path_buf();
    let cfg = tmp.path().join("bad.toml");
    fs::write(&cfg, "[cache]\ndir = \"/x\"\nsise = \"1G\"\n").unwrap();
    let e = err(run(
        &["--config".as_ref(), cfg.as_os_str(), "config".as_ref()],
        &[],
        &home,
    ));
    assert!(
        e.contains(&cfg.display().to_string()) && e.contains("sise") && e.contains("line 3"),
        "{e}"
    );
    fs::write(&cfg, "[cache\n").unwrap();
    let e = err(run(
        &[
            "--config".as_ref(),
            cfg.as_os_str(),
            "cache".as_ref(),
            "stats".as_ref(),
        ],
        &[],
        &home,
    ));
    assert!(e.contains("line 1, column"), "{e}");
    let missing = tmp.path().join("missing.toml");
    let e = err(run(
        &["config".as_ref()],
        &[("HORCRUX_CONFIG", missing.as_os_str())],
        &home,
    ));
    assert!(e.contains("missing.toml"), "{e}");
}
