//! `horcrux status`, `horcrux diff`, `horcrux discard`: the local changes of a mounted volume,
//! asked of the daemon serving it over its control socket (`horcrux_proto::control`).

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::Args;
use horcrux_proto::control::{
    Change, ChangeKind, FileDiff, Request, Response, StatusReport, WirePath,
};

use crate::mounts::{self, Located, Target};

/// How long to wait for the daemon.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Seconds to wait for the mount daemon's answer
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_secs)]
    pub timeout: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!(
            "`{s}` is not a timeout: give a number of seconds greater than 0 (at most 86400)"
        )),
    }
}

const STATUS_HELP: &str = "\
Lists the local changes of a mounted volume since the commit it was mounted from, one per line:

  A path            added (with its size)
  M path            modified (bytes written; `metadata` when mode, owner, times, xattrs...
                    changed)
  D path            deleted
  R old -> new      renamed (`modified` when its content changed too)

Directories end in `/`; fifos, sockets, devices and symlinks say what they are. A summary
follows: how many of each, how many bytes were written, and how much disk the overlay uses.
The changes stay in the volume's overlay until they are thrown away with `horcrux discard`.

Examples:
  horcrux status /var/lib/mysql
  cd /var/lib/mysql && horcrux status
  horcrux status --json /var/lib/mysql | jq '.changes[].path'";

#[derive(Debug, Args)]
#[command(after_long_help = STATUS_HELP)]
pub struct StatusArgs {
    /// The mountpoint of the volume, or any path inside it [default: the current directory]
    pub path: Option<PathBuf>,
    /// Print the daemon's report as JSON (paths that are not UTF-8 as {"hex": "..."})
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

const DIFF_HELP: &str = "\
Without revisions, shows per changed path what changed in a mounted volume since the commit it
sits on (its local, uncommitted changes); with two revisions A and B, what changed from version
A to version B. Per path: the change (A/M/D/R as in `horcrux status`), the old and new size, the
byte ranges whose content changed, and the metadata that changed. A range
`@@ 0x1000..0x3000 (8 KiB)` is the bytes from offset 0x1000 up to, not including, 0x3000.

Which form: two revisions first.
  The first two arguments are revisions A B when both look like revisions (no `/`, not `.` or
  `..`) and, when they are the only two arguments, the first is not a file or directory in the
  current directory (then they are MOUNT PATH, as before; write REV~0 to force a revision).
  With --access the first two arguments are always revisions.

Local changes, [MOUNT] [PATH]:
  (none)        every change of the volume the current directory is in
  PATH          PATH and everything below it; the mountpoint means the whole volume
  MOUNT PATH    PATH relative to the root of the volume mounted at MOUNT (or an absolute path
                inside MOUNT); MOUNT may be any path inside the mount

Two versions, A B [MOUNT] [PATH]:
  A B                    the volume the current directory is in, all of it
  A B PATH               PATH (a mountpoint or a path inside a mount) and below
  A B MOUNT PATH         PATH relative to the root of the volume mounted at MOUNT
  --access URL [--name VOLUME] A B [PATH]
                         no mount: the repository directly, PATH relative to the volume root
  Revisions are as for `horcrux log`: HEAD (the commit the mount sits on; with --access the
  branch `main`), branches, tags, commit ids or prefixes, REV~N. Only committed versions are
  compared: local changes are not part of HEAD.
  The catalogs of both versions are downloaded into the cache (the mount's, or --cache-dir).
  Changed ranges are found from the catalogs, never by reading data: a range is unchanged
  where both versions use the same chunk at the same offset; `commit` rewrites a whole chunk
  window (1 MiB by default) of a large file around each write, and packs small files whole.
  Renames are found by inode number (commits keep them) or identical content. An added or
  deleted directory is one change for its whole subtree.

Examples:
  horcrux diff /var/lib/mysql
  horcrux diff /var/lib/mysql/ibdata1
  horcrux diff /var/lib/mysql db1/t1.ibd
  horcrux diff --json /var/lib/mysql
  horcrux diff HEAD~1 HEAD /var/lib/mysql
  horcrux diff v1 main /var/lib/mysql db1
  horcrux diff --access file:///opt/horcrux-amcc --name AMCC main~3 main";

#[derive(Debug, Args)]
#[command(
    override_usage = "horcrux diff [OPTIONS] [MOUNT] [PATH]\n       horcrux diff [OPTIONS] A B [MOUNT] [PATH]\n       horcrux diff [OPTIONS] --access URL [--name VOLUME] A B [PATH]",
    after_long_help = DIFF_HELP
)]
pub struct DiffArgs {
    #[arg(
        value_name = "ARGS",
        help = "[A B] [MOUNT] [PATH]: two revisions to compare (else the local changes), a \
                mount and a path (--help tells more) [default: the whole volume of the \
                current directory]",
        long_help = "[A B] [MOUNT] [PATH]: one of the forms listed below [default: the local \
                     changes of the whole volume of the current directory]"
    )]
    pub args: Vec<PathBuf>,
    /// Print the diff as JSON (all ranges)
    #[arg(long)]
    pub json: bool,
    /// Byte ranges shown per file (0: all)
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_ranges: usize,
    /// Compare two versions of this repository, without a mount (URL as for `mount`; commas
    /// separate mirrors)
    #[arg(long, value_name = "URL")]
    pub access: Option<String>,
    /// With --access: the volume, when the repository holds several
    #[arg(long, value_name = "VOLUME", requires = "access")]
    pub name: Option<String>,
    /// Where to keep the downloaded catalogs of two versions [default: the mount's cache, or
    /// the default cache directory with --access]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

const DISCARD_HELP: &str = "\
Throws away local changes of a mounted volume: what is named goes back to what the commit the
volume was mounted from holds (added paths disappear, deleted ones come back, renames are
undone). This cannot be undone.

Without --force, nothing is thrown away: the changes that would be are listed, and the command
fails. With --force, they are thrown away.

Forms of [MOUNT] [PATH]:
  (none)        every change of the volume the current directory is in
  PATH          PATH and everything below it; the mountpoint means the whole volume
  MOUNT PATH    PATH relative to the root of the volume mounted at MOUNT (or an absolute path
                inside MOUNT)

Examples:
  horcrux discard /var/lib/mysql                      # what would go
  horcrux discard /var/lib/mysql --force              # everything
  horcrux discard /var/lib/mysql db1 --force          # db1/ and what is below it";

#[derive(Debug, Args)]
#[command(
    override_usage = "horcrux discard [OPTIONS] [MOUNT] [PATH]",
    after_long_help = DISCARD_HELP
)]
pub struct DiscardArgs {
    #[arg(
        value_name = "ARGS",
        help = "[MOUNT] [PATH]: nothing, a path, or a mount and a path in its volume (--help \
                tells more) [default: the whole volume of the current directory]",
        long_help = "[MOUNT] [PATH]: one of the forms listed below [default: the whole volume \
                     of the current directory]"
    )]
    pub args: Vec<PathBuf>,
    /// Really throw the changes away (without it, only list them)
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

// ---------------------------------------------------------------------------------------------
// Arguments

/// What a `[MOUNT] [PATH]` command acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Which mount.
    pub target: Target,
    /// Which part of its volume.
    pub within: Within,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Within {
    /// Everything in the volume.
    Volume,
    /// The path the target names (everything when that is the mountpoint).
    Target,
    /// A path relative to the volume root.
    Relative(PathBuf),
    /// An absolute path, which must be on the target's mount.
    Absolute(PathBuf),
}

/// Read `[MOUNT] [PATH]`. (Issue 5's `diff A B [MOUNT]`, comparing two versions, will be told
/// apart here: its first arguments are versions, not paths.)
pub fn interpret(args: &[PathBuf]) -> anyhow::Result<Scope> {
    Ok(match args {
        [] => Scope {
            target: Target::from_arg(None),
            within: Within::Volume,
        },
        [path] => Scope {
            target: Target::from_arg(Some(path)),
            within: Within::Target,
        },
        [mount, path] => Scope {
            target: Target::from_arg(Some(mount)),
            within: if path.is_absolute() {
                Within::Absolute(path.clone())
            } else {
                Within::Relative(path.clone())
            },
        },
        _ => bail!(
            "too many arguments ({}): give at most a mount and a path, [MOUNT] [PATH]",
            args.len()
        ),
    })
}

/// The mount and path inside the volume a scope names, finding mounts with `locate`.
pub fn resolve_with(
    scope: &Scope,
    locate: impl Fn(&Target) -> anyhow::Result<Located>,
) -> anyhow::Result<Located> {
    let mut loc = match (locate(&scope.target), &scope.within) {
        (Ok(l), _) => l,
        (Err(e), Within::Target) => {
            let Target::Path(p) = &scope.target;
            if p.is_relative() {
                return Err(anyhow!(
                    "{e:#} ({} was taken relative to the current directory; for a path relative \
                     to the volume root, name the mount first: [MOUNT] [PATH])",
                    p.display()
                ));
            }
            return Err(e);
        }
        (Err(e), _) => return Err(e),
    };
    match &scope.within {
        Within::Volume => loc.inner = WirePath::root(),
        Within::Target => {}
        Within::Relative(p) => loc.inner = mounts::volume_relative(p)?,
        Within::Absolute(p) => {
            let other = locate(&Target::Path(p.clone()))?;
            if other.mountpoint != loc.mountpoint {
                bail!(
                    "{} is not inside the mount {} (it is on {})",
                    p.display(),
                    loc.mountpoint.display(),
                    other.mountpoint.display()
                );
            }
            loc.inner = other.inner;
        }
    }
    Ok(loc)
}

/// What `horcrux diff` was asked: local changes, or two versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffForm {
    /// `[MOUNT] [PATH]`.
    Local,
    /// `A B` and what follows (`[MOUNT] [PATH]`, or `[PATH]` with --access).
    Versions {
        a: String,
        b: String,
        rest: Vec<PathBuf>,
    },
}

/// Does `arg` look like a revision: UTF-8, well-formed, no `/` (but `REMOTE/BRANCH`), not `.`
/// or `..`?
fn revision_like(arg: &Path) -> Option<&str> {
    let s = arg.to_str()?;
    // `backup/main` is a remote-tracking branch unless such a path exists here.
    if horcrux::history::is_remote_rev(s) && !arg.exists() {
        return Some(s);
    }
    (!s.contains('/') && s != "." && s != ".." && horcrux::history::parse_rev(s).is_ok())
        .then_some(s)
}

/// Tell `A B [MOUNT] [PATH]` from `[MOUNT] [PATH]` (see DIFF_HELP: two revisions first).
pub fn diff_form(args: &[PathBuf], access: bool) -> anyhow::Result<DiffForm> {
    let revs = match args {
        [a, b, ..] => revision_like(a).zip(revision_like(b)),
        _ => None,
    };
    let Some((a, b)) = revs else {
        if access {
            bail!(
                "--access compares two versions: give two revisions, A B [PATH] (e.g. \
                 `horcrux diff --access URL main~1 main`)"
            );
        }
        return Ok(DiffForm::Local);
    };
    // `horcrux diff mnt db`: a mount and a path, as it always was.
    if !access && args.len() == 2 && args[0].symlink_metadata().is_ok() {
        return Ok(DiffForm::Local);
    }
    let rest = args[2..].to_vec();
    if access && rest.len() > 1 {
        bail!(
            "too many arguments ({}): with --access, give A B [PATH], PATH relative to the \
             volume root",
            args.len()
        );
    }
    if rest.len() > 2 {
        bail!(
            "too many arguments ({}): give two revisions, then at most a mount and a path, \
             A B [MOUNT] [PATH]",
            args.len()
        );
    }
    Ok(DiffForm::Versions {
        a: a.to_string(),
        b: b.to_string(),
        rest,
    })
}

fn resolve(args: &[PathBuf]) -> anyhow::Result<Located> {
    resolve_with(&interpret(args)?, mounts::locate)
}

// ---------------------------------------------------------------------------------------------
// Commands

pub fn run_status(a: StatusArgs) -> anyhow::Result<()> {
    let loc = mounts::locate(&Target::from_arg(a.path.as_deref()))?;
    status(
        &loc,
        a.json,
        a.daemon.timeout,
        &mut std::io::stdout().lock(),
    )
}

pub fn run_diff(a: DiffArgs) -> anyhow::Result<()> {
    if let DiffForm::Versions { a: ra, b: rb, rest } = diff_form(&a.args, a.access.is_some())? {
        return versions::run(&a, &ra, &rb, &rest);
    }
    let loc = resolve(&a.args)?;
    diff(
        &loc,
        a.json,
        a.max_ranges,
        a.daemon.timeout,
        &mut std::io::stdout().lock(),
    )
}

pub fn run_discard(a: DiscardArgs) -> anyhow::Result<()> {
    let loc = resolve(&a.args)?;
    discard(
        &loc,
        a.force,
        a.daemon.timeout,
        &mut std::io::stdout().lock(),
    )
}

fn unexpected(loc: &Located, r: &Response) -> anyhow::Error {
    anyhow!(
        "the daemon of {} answered with something else than asked: {r:?}",
        loc.mountpoint.display()
    )
}

fn ask_status(loc: &Located, timeout: Duration) -> anyhow::Result<StatusReport> {
    match mounts::request(loc, &Request::Status, timeout)? {
        Response::Status(r) => Ok(r),
        other => Err(unexpected(loc, &other)),
    }
}

fn ask_diff(loc: &Located, timeout: Duration) -> anyhow::Result<Vec<FileDiff>> {
    let req = Request::Diff {
        path: loc.inner_or_none(),
    };
    match mounts::request(loc, &req, timeout)? {
        Response::Diff(d) => Ok(d),
        other => Err(unexpected(loc, &other)),
    }
}

fn status(loc: &Located, json: bool, timeout: Duration, out: &mut dyn Write) -> anyhow::Result<()> {
    let report = ask_status(loc, timeout)?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        out.write_all(format_status(&report).as_bytes())?;
    }
    Ok(())
}

fn diff(
    loc: &Located,
    json: bool,
    max_ranges: usize,
    timeout: Duration,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut diffs = ask_diff(loc, timeout)?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &diffs)?;
        writeln!(out)?;
    } else {
        sort_diffs(&mut diffs);
        if diffs.is_empty() {
            writeln!(out, "no changes in {}", loc.display())?;
        } else {
            out.write_all(format_diff(&diffs, max_ranges).as_bytes())?;
        }
    }
    Ok(())
}

fn discard(
    loc: &Located,
    force: bool,
    timeout: Duration,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let place = loc.display();
    if force {
        let req = Request::Discard {
            path: loc.inner_or_none(),
        };
        return match mounts::request(loc, &req, timeout)? {
            Response::Discarded { entries: 0 } => {
                writeln!(out, "nothing to discard in {place}")?;
                Ok(())
            }
            Response::Discarded { entries } => {
                writeln!(
                    out,
                    "discarded {entries} changed {} in {place}",
                    plural(entries, "entry", "entries")
                )?;
                Ok(())
            }
            other => Err(unexpected(loc, &other)),
        };
    }
    let mut changes = if loc.inner.is_root() {
        ask_status(loc, timeout)?.changes
    } else {
        ask_diff(loc, timeout)?
            .into_iter()
            .map(|d| d.change)
            .collect()
    };
    if changes.is_empty() {
        writeln!(out, "nothing to discard in {place}")?;
        return Ok(());
    }
    sort_changes(&mut changes);
    writeln!(
        out,
        "would discard {} {} in {place}:",
        changes.len(),
        plural(changes.len() as u64, "change", "changes")
    )?;
    for c in &changes {
        writeln!(out, "  {}", change_line(c))?;
    }
    out.flush()?;
    bail!("nothing discarded; add --force to throw these changes away")
}

// ---------------------------------------------------------------------------------------------
// Formatting

fn plural(n: u64, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

/// The first 12 digits of a commit id, as elsewhere.
fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

fn human(n: u64) -> String {
    horcrux::util::human_size(n)
}

/// A length, exact: `8 KiB` when it is a whole number of a unit, else `8193 bytes`.
fn exact_size(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (size, unit) in UNITS {
        // Units are powers of two.
        if n >= size && n & (size - 1) == 0 {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} {}", plural(n, "byte", "bytes"))
}

/// The path as shown: escaped where needed (see `WirePath`'s Display), `/` after directories,
/// `.` for the root.
fn shown(path: &WirePath, node_kind: &str) -> String {
    let mut s = if path.is_root() {
        ".".to_string()
    } else {
        path.to_string()
    };
    if node_kind == "dir" {
        s.push('/');
    }
    s
}

/// The sort key of a change: the path it has now (for a deletion: had).
fn sort_changes(changes: &mut [Change]) {
    changes.sort_by(|a, b| a.path.cmp(&b.path));
}

fn sort_diffs(diffs: &mut [FileDiff]) {
    diffs.sort_by(|a, b| a.change.path.cmp(&b.change.path));
}

/// `A path (4.0 KiB)`, `M path (metadata)`, `D path`, `R old -> new (modified, 12 B)`: the
/// bytes written when the content changed, `metadata` when metadata of an existing path did.
pub fn change_line(c: &Change) -> String {
    let path = shown(&c.path, &c.node_kind);
    let mut notes: Vec<String> = Vec::new();
    if !matches!(c.node_kind.as_str(), "file" | "dir") {
        notes.push(c.node_kind.clone());
    }
    let head = match &c.kind {
        ChangeKind::Added => format!("A {path}"),
        ChangeKind::Modified => format!("M {path}"),
        ChangeKind::Deleted => format!("D {path}"),
        ChangeKind::Renamed { from } => {
            if c.data {
                notes.push("modified".into());
            }
            format!("R {} -> {path}", shown(from, &c.node_kind))
        }
    };
    if c.data && !matches!(c.kind, ChangeKind::Deleted) {
        notes.push(human(c.bytes));
    }
    if c.meta && matches!(c.kind, ChangeKind::Modified | ChangeKind::Renamed { .. }) {
        notes.push("metadata".into());
    }
    if notes.is_empty() {
        head
    } else {
        format!("{head} ({})", notes.join(", "))
    }
}

/// `3 added, 1 modified; 4.2 MiB changed, overlay uses 5.0 MiB`.
fn summary(changes: &[Change], bytes_changed: u64, overlay_bytes: u64) -> String {
    let count = |f: fn(&ChangeKind) -> bool| changes.iter().filter(|c| f(&c.kind)).count();
    let counts = [
        (count(|k| matches!(k, ChangeKind::Added)), "added"),
        (count(|k| matches!(k, ChangeKind::Modified)), "modified"),
        (count(|k| matches!(k, ChangeKind::Deleted)), "deleted"),
        (
            count(|k| matches!(k, ChangeKind::Renamed { .. })),
            "renamed",
        ),
    ];
    let counts: Vec<String> = counts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    format!(
        "{}; {} changed, overlay uses {}",
        counts.join(", "),
        human(bytes_changed),
        human(overlay_bytes)
    )
}

pub fn format_status(r: &StatusReport) -> String {
    let mut s = format!("volume {} at {}\n", r.volume, short(&r.base_commit));
    if r.changes.is_empty() {
        s.push_str("nothing changed\n");
        return s;
    }
    let mut changes = r.changes.clone();
    sort_changes(&mut changes);
    for c in &changes {
        s.push_str(&change_line(c));
        s.push('\n');
    }
    s.push_str(&summary(&changes, r.bytes_changed, r.overlay_bytes));
    s.push('\n');
    s
}

/// One block per path: the change line, then indented size, ranges and metadata lines.
pub fn format_diff(diffs: &[FileDiff], max_ranges: usize) -> String {
    let mut s = String::new();
    let (mut total_bytes, mut total_ranges) = (0u64, 0usize);
    for d in diffs {
        let c = &d.change;
        let _ = writeln!(s, "{}", change_line(c));
        match (d.old_size, d.new_size) {
            (Some(o), Some(n)) if o == n => {
                if c.data {
                    let _ = writeln!(s, "    size {n} (unchanged)");
                }
            }
            (Some(o), Some(n)) => {
                let delta = n as i128 - o as i128;
                let _ = writeln!(s, "    size {o} -> {n} ({delta:+})");
            }
            (None, Some(n)) => {
                let _ = writeln!(s, "    size {n}");
            }
            (Some(o), None) => {
                let _ = writeln!(s, "    size {o} (deleted)");
            }
            (None, None) => {}
        }
        let shown_ranges = if max_ranges == 0 {
            d.ranges.len()
        } else {
            d.ranges.len().min(max_ranges)
        };
        for [start, end] in &d.ranges[..shown_ranges] {
            let _ = writeln!(
                s,
                "    @@ {start:#x}..{end:#x} ({})",
                exact_size(end.saturating_sub(*start))
            );
        }
        let len = |r: &[[u64; 2]]| r.iter().map(|[a, b]| b.saturating_sub(*a)).sum::<u64>();
        if shown_ranges < d.ranges.len() {
            let rest = &d.ranges[shown_ranges..];
            let _ = writeln!(
                s,
                "    ... {} more {} ({}); --max-ranges 0 shows all",
                rest.len(),
                plural(rest.len() as u64, "range", "ranges"),
                exact_size(len(rest))
            );
        }
        total_bytes += len(&d.ranges);
        total_ranges += d.ranges.len();
        for m in &d.meta {
            let v = |x: &str| {
                if x.is_empty() {
                    "(none)".to_string()
                } else {
                    x.to_string()
                }
            };
            let _ = writeln!(s, "    {} {} -> {}", m.field, v(&m.old), v(&m.new));
        }
    }
    let _ = writeln!(
        s,
        "{} {}; {} changed in {} byte {}",
        diffs.len(),
        plural(diffs.len() as u64, "path", "paths"),
        exact_size(total_bytes),
        total_ranges,
        plural(total_ranges as u64, "range", "ranges")
    );
    s
}

// ---------------------------------------------------------------------------------------------
// Two versions

/// `horcrux diff A B ...`: two committed versions compared from their catalogs.
mod versions {
    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::Arc;

    use anyhow::{Context, bail};
    use horcrux::cache::{Cache, CacheConfig};
    use horcrux::compare;
    use horcrux::history::{self, HistoryError, Resolved};
    use horcrux::ids::CommitId;
    use horcrux::manifest::Manifest;
    use horcrux::repo::Repository;
    use horcrux_proto::control::{FileDiff, WirePath};

    use super::{DiffArgs, format_diff, interpret, resolve_with, short, sort_diffs};
    use crate::mounts;

    /// Where the two versions come from.
    struct Source {
        repo: Repository,
        volume: String,
        head: Option<CommitId>,
        cache_dir: PathBuf,
        /// The path inside the volume, `None` for all of it.
        prefix: Option<WirePath>,
        /// For messages: the mount (and path) or the repository.
        place: String,
    }

    pub fn run(a: &DiffArgs, rev_a: &str, rev_b: &str, rest: &[PathBuf]) -> anyhow::Result<()> {
        crate::init_logging(None)?;
        let rt = tokio::runtime::Runtime::new()?;
        let src = rt.block_on(source(a, rest))?;
        let cache = Cache::open(CacheConfig {
            dir: src.cache_dir.clone(),
            max_size: None,
        })
        .with_context(|| format!("opening the cache at {}", src.cache_dir.display()))?;
        let (ra, ma) = rt.block_on(version(&src, rev_a, &cache))?;
        let (rb, mb) = rt.block_on(version(&src, rev_b, &cache))?;
        let diffs = compare::diff_versions(&ma, &mb, src.prefix.as_ref().map(WirePath::as_bytes))
            .context("comparing the two versions")?;
        let mut diffs: Vec<FileDiff> = diffs
            .into_iter()
            .map(crate::cmd::control_handler::file_diff)
            .collect();
        let mut out = std::io::stdout().lock();
        if a.json {
            serde_json::to_writer_pretty(&mut out, &diffs)?;
            writeln!(out)?;
            return Ok(());
        }
        sort_diffs(&mut diffs);
        let ids = format!(
            "{} ({rev_a}) .. {} ({rev_b})",
            short(&ra.id.to_hex()),
            short(&rb.id.to_hex())
        );
        if diffs.is_empty() {
            writeln!(out, "no changes in {} between {ids}", src.place)?;
        } else {
            writeln!(out, "diff {ids} in {}", src.place)?;
            out.write_all(format_diff(&diffs, a.max_ranges).as_bytes())?;
        }
        Ok(())
    }

    async fn source(a: &DiffArgs, rest: &[PathBuf]) -> anyhow::Result<Source> {
        if let Some(access) = &a.access {
            let repo = crate::open_repo(access).await?;
            let volume = repo.pick_volume(a.name.as_deref()).await?;
            let head = repo.branch(&volume, "main").await?;
            let prefix = match rest {
                [p] => Some(mounts::volume_relative(p)?).filter(|p| !p.is_root()),
                _ => None,
            };
            let place = match &prefix {
                Some(p) => format!("{volume}:{p}"),
                None => volume.clone(),
            };
            return Ok(Source {
                repo,
                volume,
                head,
                cache_dir: crate::paths::cache_dir(a.cache_dir.as_ref()),
                prefix,
                place,
            });
        }
        let loc = resolve_with(&interpret(rest)?, mounts::locate)?;
        let info = mounts::describe(&loc, a.daemon.timeout)?;
        let head: CommitId = info.commit.parse().with_context(|| {
            format!(
                "the daemon of {} reports commit `{}`",
                loc.mountpoint.display(),
                info.commit
            )
        })?;
        let repo = crate::open_repo(&info.access)
            .await
            .with_context(|| format!("opening the repository of {}", loc.mountpoint.display()))?;
        Ok(Source {
            repo,
            volume: info.volume,
            head: Some(head),
            cache_dir: a
                .cache_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(&info.cache_dir)),
            prefix: loc.inner_or_none(),
            place: loc.display(),
        })
    }

    /// Revision `rev` and its catalog.
    async fn version(
        src: &Source,
        rev: &str,
        cache: &Cache,
    ) -> anyhow::Result<(Resolved, Arc<Manifest>)> {
        let r = match history::resolve_rev(&src.repo, &src.volume, rev, src.head).await {
            Err(HistoryError::NoHead { .. }) => bail!(
                "`{rev}`: with --access, HEAD is the branch `main`, and volume `{}` has none: \
                 name a branch, tag or commit id",
                src.volume
            ),
            r => r?,
        };
        let id = r
            .commit
            .manifest_id()
            .with_context(|| format!("commit {} names no valid catalog", r.id.short()))?;
        let m = src
            .repo
            .manifest(id, cache)
            .await
            .with_context(|| format!("fetching the catalog of `{rev}` ({})", r.id.short()))?;
        Ok((r, m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use horcrux_fuse::mountinfo;
    use horcrux_proto::control::{self, Handler, MetaChange};
    use std::path::{Component, Path};
    use std::sync::{Arc, Mutex};

    fn ch(path: &str, kind: ChangeKind, node: &str, data: bool, meta: bool, bytes: u64) -> Change {
        Change {
            path: path.into(),
            kind,
            node_kind: node.into(),
            data,
            meta,
            bytes,
        }
    }

    fn report() -> StatusReport {
        StatusReport {
            volume: "AMCC".into(),
            base_commit: "3f2a1b9c0d1e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a".into(),
            changes: vec![
                ch("new.txt", ChangeKind::Added, "file", true, true, 120),
                ch("ibdata1", ChangeKind::Modified, "file", true, false, 8192),
                ch("conf", ChangeKind::Modified, "file", false, true, 0),
                ch("old.log", ChangeKind::Deleted, "file", false, false, 0),
                ch("newdir", ChangeKind::Added, "dir", false, true, 0),
                ch("mysql.sock", ChangeKind::Added, "socket", false, true, 0),
                ch(
                    "db/t2.ibd",
                    ChangeKind::Renamed {
                        from: "db/t1.ibd".into(),
                    },
                    "file",
                    true,
                    false,
                    4096,
                ),
                ch(
                    "b\u{e9}",
                    ChangeKind::Renamed {
                        from: WirePath::new(b"a\xff".to_vec()),
                    },
                    "file",
                    false,
                    false,
                    0,
                ),
            ],
            bytes_changed: 12408,
            overlay_bytes: 5 << 20,
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            format_status(&report()),
            "\
volume AMCC at 3f2a1b9c0d1e
R a\\xff -> b\u{e9}
M conf (metadata)
R db/t1.ibd -> db/t2.ibd (modified, 4.0 KiB)
M ibdata1 (8.0 KiB)
A mysql.sock (socket)
A new.txt (120 B)
A newdir/
D old.log
3 added, 2 modified, 1 deleted, 2 renamed; 12.1 KiB changed, overlay uses 5.0 MiB
"
        );
        let clean = StatusReport {
            changes: vec![],
            bytes_changed: 0,
            overlay_bytes: 0,
            ..report()
        };
        assert_eq!(
            format_status(&clean),
            "volume AMCC at 3f2a1b9c0d1e\nnothing changed\n"
        );
        assert_eq!(short("abc"), "abc");
    }

    #[test]
    fn diff_blocks() {
        let diffs = vec![
            FileDiff {
                change: ch("ibdata1", ChangeKind::Modified, "file", true, true, 12288),
                old_size: Some(1 << 20),
                new_size: Some((1 << 20) + 4096),
                ranges: vec![[0x1000, 0x3000], [0x100000, 0x101000], [0x200000, 0x200001]],
                meta: vec![
                    MetaChange {
                        field: "mode".into(),
                        old: "0644".into(),
                        new: "0600".into(),
                    },
                    MetaChange {
                        field: "xattr:user.tag".into(),
                        old: String::new(),
                        new: "\"x\"".into(),
                    },
                ],
            },
            FileDiff {
                change: ch("new.txt", ChangeKind::Added, "file", true, false, 120),
                old_size: None,
                new_size: Some(120),
                ranges: vec![[0, 120]],
                meta: vec![],
            },
            FileDiff {
                change: ch("gone", ChangeKind::Deleted, "file", false, false, 0),
                old_size: Some(4096),
                new_size: None,
                ranges: vec![],
                meta: vec![],
            },
        ];
        assert_eq!(
            format_diff(&diffs, 2),
            "\
M ibdata1 (12.0 KiB, metadata)
    size 1048576 -> 1052672 (+4096)
    @@ 0x1000..0x3000 (8 KiB)
    @@ 0x100000..0x101000 (4 KiB)
    ... 1 more range (1 byte); --max-ranges 0 shows all
    mode 0644 -> 0600
    xattr:user.tag (none) -> \"x\"
A new.txt (120 B)
    size 120
    @@ 0x0..0x78 (120 bytes)
D gone
    size 4096 (deleted)
3 paths; 12409 bytes changed in 4 byte ranges
"
        );
        assert!(format_diff(&diffs, 0).contains("@@ 0x200000..0x200001 (1 byte)"));
        assert_eq!(exact_size(0), "0 bytes");
        assert_eq!(exact_size(3 << 30), "3 GiB");
        assert_eq!(exact_size((1 << 20) + 1024), "1025 KiB");
    }

    #[test]
    fn metadata_only_and_both() {
        let c = ch("f", ChangeKind::Modified, "file", true, true, 10);
        assert_eq!(change_line(&c), "M f (10 B, metadata)");
        let c = ch("l", ChangeKind::Modified, "symlink", false, true, 0);
        assert_eq!(change_line(&c), "M l (symlink, metadata)");
        let c = ch("", ChangeKind::Modified, "dir", false, true, 0);
        assert_eq!(change_line(&c), "M ./ (metadata)");
    }

    #[test]
    fn arguments_are_read_as_mount_and_path() {
        let p = PathBuf::from;
        assert_eq!(
            interpret(&[]).unwrap(),
            Scope {
                target: Target::Path(p(".")),
                within: Within::Volume
            }
        );
        assert_eq!(
            interpret(&[p("x/y")]).unwrap(),
            Scope {
                target: Target::Path(p("x/y")),
                within: Within::Target
            }
        );
        assert_eq!(
            interpret(&[p("/mnt/a"), p("db/t")]).unwrap(),
            Scope {
                target: Target::Path(p("/mnt/a")),
                within: Within::Relative(p("db/t"))
            }
        );
        assert_eq!(
            interpret(&[p("/mnt/a"), p("/mnt/a/db")]).unwrap().within,
            Within::Absolute(p("/mnt/a/db"))
        );
        let e = interpret(&[p("a"), p("b"), p("c")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("too many arguments (3)"), "{e}");
    }

    #[test]
    fn two_revisions_come_first() {
        let v = |a: &[&str]| a.iter().map(PathBuf::from).collect::<Vec<_>>();
        let versions = |a: &str, b: &str, rest: &[&str]| DiffForm::Versions {
            a: a.into(),
            b: b.into(),
            rest: v(rest),
        };
        assert_eq!(diff_form(&v(&[]), false).unwrap(), DiffForm::Local);
        assert_eq!(diff_form(&v(&["HEAD~1"]), false).unwrap(), DiffForm::Local);
        assert_eq!(
            diff_form(&v(&["HEAD~1", "HEAD"]), false).unwrap(),
            versions("HEAD~1", "HEAD", &[])
        );
        assert_eq!(
            diff_form(&v(&["v1", "main", "/mnt/a"]), false).unwrap(),
            versions("v1", "main", &["/mnt/a"])
        );
        assert_eq!(
            diff_form(&v(&["v1", "main", "/mnt/a", "db"]), false).unwrap(),
            versions("v1", "main", &["/mnt/a", "db"])
        );
        // A mount and a path, as before: a path has a `/`, or the first names something here.
        assert_eq!(
            diff_form(&v(&["/mnt/a", "db"]), false).unwrap(),
            DiffForm::Local
        );
        assert_eq!(
            diff_form(&v(&["./m", "db"]), false).unwrap(),
            DiffForm::Local
        );
        assert_eq!(
            diff_form(&v(&["src", "db"]), false).unwrap(),
            DiffForm::Local
        );
        assert_eq!(
            diff_form(&v(&["src~0", "db"]), false).unwrap(),
            versions("src~0", "db", &[])
        );
        assert!(diff_form(&v(&["a", "b", "c", "d", "e"]), false).is_err());
        // --access: always two revisions, then at most a path.
        assert_eq!(
            diff_form(&v(&["src", "main", "db/t"]), true).unwrap(),
            versions("src", "main", &["db/t"])
        );
        let e = diff_form(&v(&["main"]), true).unwrap_err().to_string();
        assert!(e.contains("give two revisions"), "{e}");
        assert!(diff_form(&v(&["a", "b", "c", "d"]), true).is_err());
    }

    #[test]
    fn scopes_resolve_against_a_mount_table() {
        let table = mountinfo::parse(
            "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
             80 22 0:55 / /mnt/amcc rw - fuse horcrux:AMCC rw\n\
             81 22 0:56 / /mnt/other rw - fuse horcrux:O rw\n",
        );
        // Relative paths are taken from a pretend current directory inside the mount.
        let locate = |t: &Target| {
            let Target::Path(p) = t;
            let mut abs = PathBuf::from("/");
            for c in Path::new("/mnt/amcc/db").join(p).components() {
                match c {
                    Component::ParentDir => {
                        abs.pop();
                    }
                    Component::Normal(n) => abs.push(n),
                    _ => {}
                }
            }
            mounts::locate_in(&abs, &table)
        };
        let r = |args: &[&str]| {
            let args: Vec<PathBuf> = args.iter().map(PathBuf::from).collect();
            resolve_with(&interpret(&args)?, locate)
        };
        // No argument: the whole volume, although the current directory is db/.
        let l = r(&[]).unwrap();
        assert_eq!((l.volume.as_str(), l.inner_or_none()), ("AMCC", None));
        assert_eq!(r(&["t1.ibd"]).unwrap().inner, WirePath::from("db/t1.ibd"));
        assert_eq!(r(&["/mnt/amcc"]).unwrap().inner_or_none(), None);
        assert_eq!(
            r(&["/mnt/amcc/x", "db/t1"]).unwrap().inner,
            WirePath::from("db/t1")
        );
        assert_eq!(
            r(&["/mnt/amcc", "/mnt/amcc/db/t1"]).unwrap().inner,
            WirePath::from("db/t1")
        );
        let e = r(&["/mnt/amcc", "/mnt/other/x"]).unwrap_err().to_string();
        assert!(e.contains("not inside the mount /mnt/amcc"), "{e}");
        let e = r(&["/mnt/amcc", "../x"]).unwrap_err().to_string();
        assert!(e.contains("leads out of the volume"), "{e}");
        let e = format!("{:#}", r(&["/home/x"]).unwrap_err());
        assert!(e.contains("/home/x is not inside a horcrux mount"), "{e}");
        let e = format!("{:#}", r(&["../../home"]).unwrap_err());
        assert!(e.contains("name the mount first"), "{e}");
    }

    /// Records requests; answers from fixed data.
    struct Fake {
        seen: Mutex<Vec<Request>>,
        changes: Vec<Change>,
    }

    impl Handler for Fake {
        fn handle(&self, req: Request) -> Response {
            self.seen.lock().unwrap().push(req.clone());
            match req {
                Request::Status => Response::Status(StatusReport {
                    changes: self.changes.clone(),
                    ..report()
                }),
                Request::Diff { path } => Response::Diff(
                    self.changes
                        .iter()
                        .filter(|c| path.as_ref().is_none_or(|p| c.path.starts_with(p)))
                        .map(|c| FileDiff {
                            change: c.clone(),
                            old_size: None,
                            new_size: Some(c.bytes),
                            ranges: vec![[0, c.bytes]],
                            meta: vec![],
                        })
                        .collect(),
                ),
                Request::Discard { path: Some(p) } if p.as_bytes() == b"locked" => {
                    Response::error("locked is open for writing")
                }
                Request::Discard { .. } => Response::Discarded { entries: 4 },
                _ => Response::error("unused"),
            }
        }
    }

    fn fake(changes: Vec<Change>) -> (tempfile::TempDir, control::Server, Arc<Fake>, Located) {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(Fake {
            seen: Mutex::new(vec![]),
            changes,
        });
        let socket = dir.path().join("d.sock");
        let server = control::serve(&socket, f.clone()).unwrap();
        let loc = Located {
            mountpoint: PathBuf::from("/mnt/amcc"),
            volume: "AMCC".into(),
            inner: WirePath::root(),
            socket,
        };
        (dir, server, f, loc)
    }

    const T: Duration = Duration::from_secs(10);

    fn text(out: Vec<u8>) -> String {
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn commands_against_a_fake_daemon() {
        let (_d, _s, f, loc) = fake(vec![
            ch("db/a", ChangeKind::Added, "file", true, false, 10),
            ch("db/b", ChangeKind::Deleted, "file", false, false, 0),
            ch("x", ChangeKind::Modified, "file", true, false, 4096),
        ]);
        let mut out = Vec::new();
        status(&loc, false, T, &mut out).unwrap();
        let s = text(out);
        assert!(
            s.starts_with("volume AMCC at 3f2a1b9c0d1e\nA db/a (10 B)\n"),
            "{s}"
        );

        let mut out = Vec::new();
        status(&loc, true, T, &mut out).unwrap();
        let back: StatusReport = serde_json::from_slice(&out).unwrap();
        assert_eq!(back.changes.len(), 3);

        let db = Located {
            inner: "db".into(),
            ..loc.clone()
        };
        let mut out = Vec::new();
        diff(&db, false, 64, T, &mut out).unwrap();
        let s = text(out);
        assert!(
            s.contains("A db/a (10 B)\n    size 10\n    @@ 0x0..0xa (10 bytes)\n"),
            "{s}"
        );
        assert!(!s.contains("M x"), "{s}");
        let mut out = Vec::new();
        diff(&db, true, 64, T, &mut out).unwrap();
        let back: Vec<FileDiff> = serde_json::from_slice(&out).unwrap();
        assert_eq!(back.len(), 2);

        // Discard without --force: lists, throws nothing away, fails.
        let mut out = Vec::new();
        let e = discard(&db, false, T, &mut out).unwrap_err().to_string();
        assert_eq!(
            e,
            "nothing discarded; add --force to throw these changes away"
        );
        assert_eq!(
            text(out),
            "would discard 2 changes in /mnt/amcc/db:\n  A db/a (10 B)\n  D db/b\n"
        );
        let mut out = Vec::new();
        discard(&db, true, T, &mut out).unwrap();
        assert_eq!(text(out), "discarded 4 changed entries in /mnt/amcc/db\n");

        let locked = Located {
            inner: "locked".into(),
            ..loc.clone()
        };
        let e = discard(&locked, true, T, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert_eq!(e, "the daemon of /mnt/amcc: locked is open for writing");

        let seen = f.seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                Request::Status,
                Request::Status,
                Request::Diff {
                    path: Some("db".into())
                },
                Request::Diff {
                    path: Some("db".into())
                },
                Request::Diff {
                    path: Some("db".into())
                },
                Request::Discard {
                    path: Some("db".into())
                },
                Request::Discard {
                    path: Some("locked".into())
                },
            ]
        );
    }

    #[test]
    fn clean_volumes() {
        let (_d, _s, f, loc) = fake(vec![]);
        let mut out = Vec::new();
        status(&loc, false, T, &mut out).unwrap();
        assert!(text(out).ends_with("nothing changed\n"));
        let mut out = Vec::new();
        diff(&loc, false, 64, T, &mut out).unwrap();
        assert_eq!(text(out), "no changes in /mnt/amcc\n");
        let mut out = Vec::new();
        discard(&loc, false, T, &mut out).unwrap();
        assert_eq!(text(out), "nothing to discard in /mnt/amcc\n");
        // The whole volume: status is asked, not a diff.
        assert_eq!(f.seen.lock().unwrap().last(), Some(&Request::Status));
    }

    #[test]
    fn help_and_usage() {
        use clap::CommandFactory;
        // As in main.rs: a variant's doc comment replaces the struct's about texts.
        #[derive(clap::Parser)]
        enum T {
            /// s
            Status(StatusArgs),
            /// d
            Diff(DiffArgs),
            /// x
            Discard(DiscardArgs),
        }
        let mut cmd = T::command();
        let diff = cmd.find_subcommand_mut("diff").unwrap();
        let help = diff.render_long_help().to_string();
        assert!(help.contains("[MOUNT] [PATH]"), "{help}");
        assert!(help.contains("@@ 0x1000..0x3000"), "{help}");
        assert!(
            help.contains("MOUNT PATH    PATH relative to the root"),
            "{help}"
        );
        let status = cmd.find_subcommand_mut("status").unwrap();
        let help = status.render_long_help().to_string();
        assert!(help.contains("R old -> new      renamed"), "{help}");
        use clap::Parser;
        let T::Discard(d) = T::try_parse_from(["t", "discard", "/m", "p", "--force"]).unwrap()
        else {
            panic!()
        };
        assert!(d.force);
        assert_eq!(d.args, vec![PathBuf::from("/m"), PathBuf::from("p")]);
        assert!(T::try_parse_from(["t", "status", "--timeout", "0"]).is_err());
    }
}
