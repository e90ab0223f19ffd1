//! The configuration file: defaults for flags, read by the CLI only (the core takes plain
//! structs). Files, in order, each overriding the one before it key by key:
//! `/etc/horcrux/config.toml`, then `$XDG_CONFIG_HOME/horcrux/config.toml` (default
//! `~/.config/horcrux/config.toml`); or only the file `--config FILE` / `$HORCRUX_CONFIG`
//! names (which must exist). Flags and environment variables override every file.
//!
//! ```toml
//! log_level = "info"                    # RUST_LOG wins
//! tls_dir = "/etc/horcrux/tls"          # for peers (horcrux://)
//! [cache]
//! dir = "/srv/horcrux-cache"            # --cache-dir, HORCRUX_CACHE_DIR win
//! size = "20G"                          # --cache-size wins
//! [ssh]
//! identity = "~/.ssh/id_ed25519"        # --identity wins
//! known_hosts = "~/.ssh/known_hosts"    # --known-hosts wins
//! [s3]
//! endpoint = "http://10.0.0.9:3900"     # URL, --s3-endpoint, AWS_ENDPOINT_URL(_S3) win
//! region = "eu-west-1"                  # URL, --s3-region, AWS_REGION, AWS_DEFAULT_REGION win
//! profile = "backups"                   # URL, --s3-profile, AWS_PROFILE win
//! [sources]
//! amcc = "scp://dev@dbhost:/opt/horcrux-amcc"   # `amcc` works wherever an access URL does
//! ```
//!
//! Unknown keys and malformed files are errors naming the file, the key and the line.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The system-wide file.
pub const SYSTEM_FILE: &str = "/etc/horcrux/config.toml";

/// One file as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    log_level: Option<String>,
    tls_dir: Option<PathBuf>,
    #[serde(default)]
    cache: CacheSection,
    #[serde(default)]
    ssh: SshSection,
    #[serde(default)]
    s3: S3Section,
    #[serde(default)]
    sources: BTreeMap<String, String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheSection {
    dir: Option<PathBuf>,
    size: Option<SizeValue>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SshSection {
    identity: Option<PathBuf>,
    known_hosts: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct S3Section {
    endpoint: Option<String>,
    region: Option<String>,
    profile: Option<String>,
}

/// `size = "10G"` or `size = 10737418240`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Flag(&'static str),
    Env(&'static str),
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Flag(name) => write!(f, "flag {name}"),
            Origin::Env(name) => write!(f, "environment {name}"),
            Origin::Default => f.write_str("default"),
        }
    }
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    pub value: T,
    pub origin: Origin,
}

/// The merged content of the configuration files (flags and environment not applied yet).
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Files considered, and whether each was found.
    pub files: Vec<(PathBuf, bool)>,
    pub log_level: Option<Sourced<String>>,
    pub tls_dir: Option<Sourced<PathBuf>>,
    pub cache_dir: Option<Sourced<PathBuf>>,
    pub cache_size: Option<Sourced<u64>>,
    pub ssh_identity: Option<Sourced<PathBuf>>,
    pub ssh_known_hosts: Option<Sourced<PathBuf>>,
    pub s3_endpoint: Option<Sourced<String>>,
    pub s3_region: Option<Sourced<String>>,
    pub s3_profile: Option<Sourced<String>>,
    pub sources: BTreeMap<String, Sourced<String>>,
    /// Where the values of flags this process was given came from (flag, environment or a
    /// file), by key (`cache.size`, `s3.region`...): filled in by `main`.
    pub applied: BTreeMap<&'static str, Origin>,
}

/// The files to read: `explicit` (from `--config` or `$HORCRUX_CONFIG`) alone and required, or
/// the system file then the user's, both optional.
pub fn files_to_read(
    explicit: Option<&Path>,
    xdg_config_home: Option<OsString>,
    home: Option<OsString>,
) -> Vec<(PathBuf, bool)> {
    if let Some(p) = explicit {
        return vec![(p.to_path_buf(), true)];
    }
    let mut out = vec![(PathBuf::from(SYSTEM_FILE), false)];
    let user = xdg_config_home
        .filter(|x| !x.is_empty())
        .map(PathBuf::from)
        .or_else(|| home.map(|h| PathBuf::from(h).join(".config")));
    if let Some(dir) = user {
        out.push((dir.join("horcrux/config.toml"), false));
    }
    out
}

/// `~/x` → `$HOME/x`; other paths as they are.
fn expand_home(p: PathBuf, home: Option<&Path>) -> PathBuf {
    match (p.strip_prefix("~"), home) {
        (Ok(rest), Some(h)) => h.join(rest),
        _ => p,
    }
}

impl Config {
    /// Read the files (see [`files_to_read`]); later files override earlier ones key by key.
    pub fn load(files: &[(PathBuf, bool)], home: Option<&Path>) -> anyhow::Result<Config> {
        let mut c = Config::default();
        for (path, required) in files {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                    c.files.push((path.clone(), false));
                    continue;
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("configuration file {}", path.display()));
                }
            };
            c.files.push((path.clone(), true));
            c.merge(path, &text, home)?;
        }
        Ok(c)
    }

    /// Parse `text` (the content of `path`) and let its keys override.
    pub fn merge(&mut self, path: &Path, text: &str, home: Option<&Path>) -> anyhow::Result<()> {
        // toml's message names the line, the column and, for an unknown key, the key and the
        // keys that are allowed there.
        let f: FileConfig = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("configuration file {}: {e}", path.display()))?;
        let src = |value| Sourced {
            value,
            origin: Origin::File(path.to_path_buf()),
        };
        fn set<T>(slot: &mut Option<Sourced<T>>, v: Option<T>, path: &Path) {
            if let Some(value) = v {
                *slot = Some(Sourced {
                    value,
                    origin: Origin::File(path.to_path_buf()),
                });
            }
        }
        let path_of = |p: Option<PathBuf>| p.map(|p| expand_home(p, home));
        set(&mut self.log_level, f.log_level, path);
        if let Some(level) = &self.log_level {
            tracing_subscriber::EnvFilter::try_new(&level.value).map_err(|e| {
                anyhow::anyhow!(
                    "configuration file {}: log_level `{}` is not a log filter: {e}",
                    path.display(),
                    level.value
                )
            })?;
        }
        set(&mut self.tls_dir, path_of(f.tls_dir), path);
        set(&mut self.cache_dir, path_of(f.cache.dir), path);
        let size = match f.cache.size {
            None => None,
            Some(SizeValue::Bytes(n)) => Some(n),
            Some(SizeValue::Text(s)) => Some(horcrux::format::parse_size(&s).with_context(|| {
                format!(
                    "configuration file {}: cache.size `{s}` is not a size (a number with an optional K, M, G or T suffix)",
                    path.display()
                )
            })?),
        };
        set(&mut self.cache_size, size, path);
        set(&mut self.ssh_identity, path_of(f.ssh.identity), path);
        set(&mut self.ssh_known_hosts, path_of(f.ssh.known_hosts), path);
        set(&mut self.s3_endpoint, f.s3.endpoint, path);
        set(&mut self.s3_region, f.s3.region, path);
        set(&mut self.s3_profile, f.s3.profile, path);
        for (name, url) in f.sources {
            if name.is_empty() || name.contains([':', '/', ',']) {
                bail!(
                    "configuration file {}: source name `{name}` must not be empty or contain `:`, `/` or `,`",
                    path.display()
                );
            }
            horcrux::store::parse_access(&url).with_context(|| {
                format!(
                    "configuration file {}: sources.{name} = `{url}`",
                    path.display()
                )
            })?;
            self.sources.insert(name, src(url));
        }
        Ok(())
    }

    /// `access` with a source name (a word without `:`, `/` or `,`) replaced by its URL.
    pub fn resolve_access(&self, access: &str) -> String {
        match self.sources.get(access) {
            Some(s) => s.value.clone(),
            None => access.to_string(),
        }
    }
}

static CONFIG: std::sync::OnceLock<Config> = std::sync::OnceLock::new();

/// Record the configuration of this process (once, in `main`).
pub fn set(c: Config) {
    let _ = CONFIG.set(c);
}

/// The configuration of this process (empty before [`set`], e.g. in unit tests).
pub fn get() -> &'static Config {
    static EMPTY: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    CONFIG
        .get()
        .unwrap_or_else(|| EMPTY.get_or_init(Config::default))
}

/// `tls_dir` of the configuration file, for the peer (`horcrux://`) commands: their
/// `--tls-dir` flag, when given, wins over it.
#[allow(dead_code)] // read by the peer commands once they take `--tls-dir`
pub fn tls_dir() -> Option<PathBuf> {
    get().tls_dir.as_ref().map(|s| s.value.clone())
}

/// Fill an unset flag from the configuration; returns where the effective value came from.
pub fn fill<T: Clone>(
    slot: &mut Option<T>,
    from_file: Option<&Sourced<T>>,
    flag: &'static str,
    env: Option<&'static str>,
    env_set: bool,
) -> Option<Origin> {
    if slot.is_some() {
        return Some(match env {
            Some(name) if env_set => Origin::Env(name),
            _ => Origin::Flag(flag),
        });
    }
    let f = from_file?;
    *slot = Some(f.value.clone());
    Some(f.origin.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_texts(texts: &[(&str, &str)]) -> anyhow::Result<Config> {
        let mut c = Config::default();
        for (path, text) in texts {
            c.merge(Path::new(path), text, Some(Path::new("/home/u")))?;
        }
        Ok(c)
    }

    #[test]
    fn user_file_overrides_system_file_key_by_key() {
        let c = load_texts(&[
            (
                "/etc/horcrux/config.toml",
                "log_level = \"warn\"\n[cache]\ndir = \"/srv/cache\"\nsize = \"10G\"\n[s3]\nregion = \"eu-west-1\"\n",
            ),
            (
                "/home/u/.config/horcrux/config.toml",
                "[cache]\nsize = 1048576\n[ssh]\nidentity = \"~/.ssh/id_ed25519\"\n[sources]\namcc = \"scp://dev@dbhost:/opt/horcrux-amcc\"\n",
            ),
        ])
        .unwrap();
        let sys = Origin::File("/etc/horcrux/config.toml".into());
        let user = Origin::File("/home/u/.config/horcrux/config.toml".into());
        assert_eq!(c.cache_dir.as_ref().unwrap().value, Path::new("/srv/cache"));
        assert_eq!(c.cache_dir.as_ref().unwrap().origin, sys);
        assert_eq!(c.cache_size.as_ref().unwrap().value, 1 << 20);
        assert_eq!(c.cache_size.as_ref().unwrap().origin, user);
        assert_eq!(c.log_level.as_ref().unwrap().value, "warn");
        assert_eq!(c.s3_region.as_ref().unwrap().origin, sys);
        assert_eq!(
            c.ssh_identity.as_ref().unwrap().value,
            Path::new("/home/u/.ssh/id_ed25519")
        );
        assert_eq!(
            c.resolve_access("amcc"),
            "scp://dev@dbhost:/opt/horcrux-amcc"
        );
        assert_eq!(c.resolve_access("/opt/x"), "/opt/x");
    }

    #[test]
    fn flags_and_environment_override_the_file() {
        let c = load_texts(&[("/c.toml", "[cache]\ndir = \"/from/file\"\n")]).unwrap();
        let mut flag = Some(PathBuf::from("/from/flag"));
        let o = fill(
            &mut flag,
            c.cache_dir.as_ref(),
            "--cache-dir",
            Some("HORCRUX_CACHE_DIR"),
            false,
        );
        assert_eq!(flag.unwrap(), Path::new("/from/flag"));
        assert_eq!(o, Some(Origin::Flag("--cache-dir")));
        let mut env = Some(PathBuf::from("/from/env"));
        let o = fill(
            &mut env,
            c.cache_dir.as_ref(),
            "--cache-dir",
            Some("HORCRUX_CACHE_DIR"),
            true,
        );
        assert_eq!(o, Some(Origin::Env("HORCRUX_CACHE_DIR")));
        let mut unset = None;
        let o = fill(&mut unset, c.cache_dir.as_ref(), "--cache-dir", None, false);
        assert_eq!(unset.unwrap(), Path::new("/from/file"));
        assert_eq!(o, Some(Origin::File("/c.toml".into())));
        let mut nothing: Option<PathBuf> = None;
        assert_eq!(fill(&mut nothing, None, "--x", None, false), None);
    }

    #[test]
    fn unknown_keys_name_the_key_the_file_and_the_line() {
        let e = load_texts(&[(
            "/etc/horcrux/config.toml",
            "[cache]\ndir = \"/x\"\nsise = \"1G\"\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(e.contains("/etc/horcrux/config.toml"), "{e}");
        assert!(e.contains("sise"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        let e = load_texts(&[("/c.toml", "colour = 1\n")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour") && e.contains("/c.toml"), "{e}");
    }

    #[test]
    fn malformed_files_give_line_and_column() {
        let e = load_texts(&[("/c.toml", "[cache]\ndir = /x\n")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("/c.toml") && e.contains("line 2, column"), "{e}");
        let e = load_texts(&[("/c.toml", "[cache]\nsize = \"lots\"\n")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache.size `lots`"), "{e}");
        let e = load_texts(&[("/c.toml", "log_level = \"[[\"\n")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("log_level"), "{e}");
        let e = load_texts(&[("/c.toml", "[sources]\n\"a/b\" = \"/x\"\n")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("source name `a/b`"), "{e}");
    }

    #[test]
    fn which_files_are_read() {
        let f = files_to_read(None, None, Some("/home/u".into()));
        assert_eq!(
            f,
            vec![
                (PathBuf::from(SYSTEM_FILE), false),
                (PathBuf::from("/home/u/.config/horcrux/config.toml"), false)
            ]
        );
        let f = files_to_read(None, Some("/xdg".into()), Some("/home/u".into()));
        assert_eq!(f[1].0, Path::new("/xdg/horcrux/config.toml"));
        let f = files_to_read(Some(Path::new("/my.toml")), Some("/xdg".into()), None);
        assert_eq!(f, vec![(PathBuf::from("/my.toml"), true)]);
        // A chosen file must exist; the default ones may not.
        let e = Config::load(&f, None).unwrap_err();
        assert!(format!("{e:#}").contains("/my.toml"), "{e:#}");
        let c = Config::load(&[(PathBuf::from("/nonexistent/c.toml"), false)], None).unwrap();
        assert_eq!(c.files, vec![(PathBuf::from("/nonexistent/c.toml"), false)]);
    }
}
