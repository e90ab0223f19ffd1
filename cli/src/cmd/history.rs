//! `horcrux log`, `show`, `branch`, `tag`: the history of a volume, read from its repository.
//! The volume is a mount (asked over its control socket how it is mounted) or a repository
//! named with `--access`.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use horcrux::history::{self, HEAD, LogEntry, Refs, Resolved};
use horcrux::ids::CommitId;
use horcrux::repo::Repository;
use horcrux::util::human_size;

use crate::mounts::{self, Target};

/// The rules every history command shares, appended to each `--help`.
const COMMON_HELP: &str = "\
Which volume:
  By default, the volume mounted where the current directory is. A mountpoint or any path
  inside a mount can be given instead, as an argument or with -C PATH. Without any mount,
  --access URL [--name VOLUME] reads the repository directly (HEAD is then the branch `main`,
  or --ref REF).

Arguments: a path or a revision?
  An argument containing `/`, or `.` or `..`, is a path (of a mount); anything else is a
  revision or a name. Branch and tag names never contain `/`, so `horcrux log main` is the
  branch and `horcrux log ./main` the directory. -C PATH is always a path. The name of a
  Docker volume of `horcrux plugin` (no such path here) names that volume.

Revisions:
  HEAD           the commit the mount sits on (its branch may have moved on since)
  main, v1       a branch, then a tag, of the volume
  3f2a9c1        a commit id, or a unique prefix of at least 4 hex digits
  REV~N          N commits back along first parents (REV~ is REV~1; REV^ is REV~1 too);
                 suffixes add up: main~2~1 is main~3";

const LOG_HELP: &str = "\
Lists the versions of a volume, newest first, from REV (default HEAD) back along first
parents: the commit id, the branches and tags pointing at it (`HEAD -> main` when HEAD is the
mounted branch), the parent, author, date (RFC 3339, UTC), the number of files and bytes of
the version, and the message.

Examples:
  horcrux log                                   # inside a mount
  horcrux log /var/lib/mysql -n 5 --oneline
  horcrux log experiment -C /var/lib/mysql
  horcrux log main~3 --access file:///opt/horcrux-amcc --name AMCC
  horcrux log --json /var/lib/mysql | jq -r '.[].id'";

#[derive(Debug, Clone, Args)]
pub struct VolumeArgs {
    /// The mountpoint of the volume, or any path inside it [default: the current directory]
    #[arg(short = 'C', long = "mount", value_name = "PATH")]
    pub mount: Option<PathBuf>,
    /// Read this repository directly instead of a mount's (URL as for `mount`; commas separate
    /// mirrors)
    #[arg(long, value_name = "URL", conflicts_with = "mount")]
    pub access: Option<String>,
    /// With --access: the volume, when the repository holds several
    #[arg(long, value_name = "VOLUME", requires = "access")]
    pub name: Option<String>,
    /// With --access: what HEAD means [default: the branch `main`]
    #[arg(long = "ref", value_name = "REV", requires = "access")]
    pub reference: Option<String>,
}

#[derive(Debug, Args)]
#[command(after_long_help = format!("{LOG_HELP}\n\n{COMMON_HELP}"))]
pub struct LogArgs {
    /// [REV] [PATH]: the revision to start from [default: HEAD], and the mount
    #[arg(value_name = "REV|PATH")]
    pub args: Vec<OsString>,
    /// Show at most N commits
    #[arg(short = 'n', long = "max-count", value_name = "N")]
    pub max_count: Option<usize>,
    /// One line per commit: short id, decorations, first line of the message
    #[arg(long, conflicts_with = "json")]
    pub oneline: bool,
    /// A JSON array of commits (id, volume, manifest, parents, author, time, date, message,
    /// files, bytes, chunks, head, branches, tags)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub volume: VolumeArgs,
}

const SHOW_HELP: &str = "\
Shows one version of a volume in detail: its id, the branches and tags at it, the volume,
the manifest (tree catalog) id, parents, author, date (RFC 3339, UTC), the number of files,
bytes and chunks, and the whole message.

Examples:
  horcrux show                                  # HEAD of the mount here
  horcrux show HEAD~1 /var/lib/mysql
  horcrux show v1 --json -C /var/lib/mysql
  horcrux show 3f2a9c1 --access file:///opt/horcrux-amcc";

#[derive(Debug, Args)]
#[command(after_long_help = format!("{SHOW_HELP}\n\n{COMMON_HELP}"))]
pub struct ShowArgs {
    /// [REV] [PATH]: the revision [default: HEAD], and the mount
    #[arg(value_name = "REV|PATH")]
    pub args: Vec<OsString>,
    /// The commit as a JSON object (the fields of `log --json`)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub volume: VolumeArgs,
}

const BRANCH_HELP: &str = "\
Without NAME, lists the branches of the volume with the commit each points at; the mounted
branch is marked with `*` (a mount of a tag or commit id shows `* (HEAD detached at ...)`).

With NAME, creates branch NAME at REV (default HEAD). Creation is a compare-and-swap from
\"absent\": an existing branch is never moved (that is `commit`'s, `push`'s and `reset`'s job).
Mount the new branch with `horcrux mount URL MOUNTPOINT --ref NAME`; a writable mount of it
commits onto it.

-d NAME deletes branch NAME (by compare-and-delete: a branch someone moved meanwhile is kept,
with an error); the mounted branch is refused. Its commits stay in the repository until
`horcrux gc` finds that no other branch or tag reaches them.

Examples:
  horcrux branch                                # inside a mount
  horcrux branch experiment                     # at HEAD
  horcrux branch before-import HEAD~2 /var/lib/mysql
  horcrux branch --access file:///opt/horcrux-amcc --name AMCC";

#[derive(Debug, Args)]
#[command(after_long_help = format!("{BRANCH_HELP}\n\n{COMMON_HELP}"))]
pub struct BranchArgs {
    /// [NAME [REV]] [PATH]: the branch to create, where [default: HEAD], and the mount
    #[arg(value_name = "NAME|REV|PATH")]
    pub args: Vec<OsString>,
    /// Delete branch NAME (its data goes at the next `horcrux gc`s)
    #[arg(short = 'd', long)]
    pub delete: bool,
    /// List as JSON: [{"name", "commit", "head"}]
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub volume: VolumeArgs,
}

const TAG_HELP: &str = "\
Without NAME, lists the tags of the volume with the commit each points at.

With NAME, creates tag NAME at REV (default HEAD): an immutable name for that version
(refs/tags/NAME), made by compare-and-swap from \"absent\", so an existing tag is never moved.
Mount it with `horcrux mount URL MOUNTPOINT --ref NAME` (a writable mount of a tag has no
branch to commit onto).

-d NAME deletes tag NAME; its commits stay in the repository until `horcrux gc` finds that
no branch or other tag reaches them.

Examples:
  horcrux tag                                   # inside a mount
  horcrux tag v1                                # at HEAD
  horcrux tag march-import HEAD~1 /var/lib/mysql
  horcrux tag --access file:///opt/horcrux-amcc --name AMCC";

#[derive(Debug, Args)]
#[command(after_long_help = format!("{TAG_HELP}\n\n{COMMON_HELP}"))]
pub struct TagArgs {
    /// [NAME [REV]] [PATH]: the tag to create, where [default: HEAD], and the mount
    #[arg(value_name = "NAME|REV|PATH")]
    pub args: Vec<OsString>,
    /// Delete tag NAME (its data goes at the next `horcrux gc`s)
    #[arg(short = 'd', long)]
    pub delete: bool,
    /// List as JSON: [{"name", "commit", "head"}]
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub volume: VolumeArgs,
}

/// Whether a command-line argument is a path (it has a `/`, or is `.` or `..`) rather than a
/// revision or name.
fn is_path(arg: &OsStr) -> bool {
    let b = arg.as_bytes();
    // `backup/main` is a remote-tracking branch unless such a path exists here.
    if arg.to_str().is_some_and(horcrux::history::is_remote_rev) && !Path::new(arg).exists() {
        return false;
    }
    b.contains(&b'/') || b == b"." || b == b".."
}

/// Split positional arguments into words (revisions, names; at most `max_words`) and at most
/// one path, which may also come from -C.
fn split_args(
    args: &[OsString],
    max_words: usize,
    what: &str,
    v: &VolumeArgs,
) -> anyhow::Result<(Vec<String>, Option<PathBuf>)> {
    let mut words = Vec::new();
    let mut path = v.mount.clone();
    for a in args {
        // A Docker volume of the plugin's registry names the volume like a mountpoint would.
        let volume = path.is_none()
            && v.access.is_none()
            && crate::mounts::docker_volume_name(std::path::Path::new(a))
                .is_some_and(crate::cmd::plugin::is_docker_volume);
        if is_path(a) || volume {
            if let Some(p) = &path {
                bail!(
                    "two paths given ({} and {}): name one mount",
                    p.display(),
                    PathBuf::from(a).display()
                );
            }
            if v.access.is_some() {
                bail!(
                    "{} is a path (it has a `/`), but --access reads a repository, not a mount: \
                     give one or the other",
                    PathBuf::from(a).display()
                );
            }
            path = Some(PathBuf::from(a));
        } else {
            let w = a.to_str().ok_or_else(|| {
                anyhow!(
                    "{:?} is not a revision or name (not UTF-8); a path needs a `/`, e.g. ./{:?}",
                    a,
                    a
                )
            })?;
            words.push(w.to_string());
        }
    }
    if words.len() > max_words {
        bail!(
            "too many arguments ({}): expected {what}; a path needs a `/` (e.g. ./{}) or -C",
            words.join(" "),
            words[max_words]
        );
    }
    Ok((words, path))
}

/// A volume's repository and what HEAD is.
struct Ctx {
    rt: tokio::runtime::Runtime,
    repo: Repository,
    volume: String,
    /// The mount's commit (or --access's --ref / main).
    head: Option<CommitId>,
    /// The mounted branch, if a branch is mounted.
    head_branch: Option<String>,
    /// Where it is mounted, for messages.
    mountpoint: Option<String>,
}

impl Ctx {
    /// `words` are the revisions and names given, for a hint when one of them was meant as
    /// the mount.
    fn open(v: &VolumeArgs, path: Option<PathBuf>, words: &[String]) -> anyhow::Result<Ctx> {
        crate::init_logging(None)?;
        let rt = tokio::runtime::Runtime::new()?;
        if let Some(access) = &v.access {
            let (repo, volume, head, head_branch) = rt.block_on(async {
                let repo = crate::open_repo(access).await?;
                let volume = repo.pick_volume(v.name.as_deref()).await?;
                let (head, branch) = match &v.reference {
                    Some(r) => {
                        let id = history::resolve_rev(&repo, &volume, r, None).await?.id;
                        let is_branch = repo.branch(&volume, r).await?.is_some();
                        (Some(id), is_branch.then(|| r.clone()))
                    }
                    None => {
                        let main = repo.branch(&volume, "main").await?;
                        (main, main.map(|_| "main".to_string()))
                    }
                };
                anyhow::Ok((repo, volume, head, branch))
            })?;
            return Ok(Ctx {
                rt,
                repo,
                volume,
                head,
                head_branch,
                mountpoint: None,
            });
        }
        let explicit = path.is_some();
        let loc = mounts::locate(&Target::from_arg(path.as_deref())).map_err(|e| {
            let meant = words
                .iter()
                .find(|w| !explicit && std::path::Path::new(w.as_str()).exists());
            match meant {
                Some(w) => anyhow!(
                    "{e:#}; `{w}` was read as a revision, not as a path: a path needs a `/` \
                     (./{w}) or -C {w}"
                ),
                None => anyhow!(
                    "{e:#}; or read a repository without a mount: --access URL [--name VOLUME]"
                ),
            }
        })?;
        let info = mounts::describe(&loc, Duration::from_secs(30))?;
        let head: CommitId = info.commit.parse().with_context(|| {
            format!(
                "the daemon of {} reports commit `{}`",
                loc.mountpoint.display(),
                info.commit
            )
        })?;
        let repo = rt
            .block_on(crate::open_repo(&info.access))
            .with_context(|| format!("opening the repository of {}", loc.mountpoint.display()))?;
        Ok(Ctx {
            rt,
            repo,
            volume: info.volume,
            head: Some(head),
            head_branch: info.branch,
            mountpoint: Some(info.mountpoint),
        })
    }

    fn resolve(&self, rev: &str) -> anyhow::Result<Resolved> {
        let r = self.rt.block_on(history::resolve_rev(
            &self.repo,
            &self.volume,
            rev,
            self.head,
        ));
        match r {
            Err(history::HistoryError::NoHead { .. }) if self.mountpoint.is_none() => bail!(
                "`{rev}`: HEAD is the branch `main` (or --ref REV) with --access, and volume \
                 `{}` has no branch `main`: name a revision, or give --ref",
                self.volume
            ),
            r => Ok(r?),
        }
    }

    fn refs(&self) -> anyhow::Result<Refs> {
        Ok(self.rt.block_on(Refs::load(&self.repo, &self.volume))?)
    }
}

/// The repository at `access` (comma-separated mirrors, read in order of preference).
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn short(hex: &str) -> &str {
    &hex[..12.min(hex.len())]
}

/// `log`'s and `show`'s header: `commit <id> (<decorations>)`.
fn header(e: &LogEntry, head_branch: Option<&str>) -> String {
    let d = e.decorations(head_branch);
    if d.is_empty() {
        format!("commit {}", e.id)
    } else {
        format!("commit {} ({d})", e.id)
    }
}

fn indented(msg: &str) -> String {
    msg.lines()
        .map(|l| format!("    {l}").trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn run_log(a: LogArgs) -> anyhow::Result<()> {
    let (words, path) = split_args(&a.args, 1, "[REV] [PATH]", &a.volume)?;
    let ctx = Ctx::open(&a.volume, path, &words)?;
    let rev = words.first().map_or(HEAD, String::as_str);
    let start = ctx.resolve(rev)?;
    let walk = ctx
        .rt
        .block_on(history::walk(&ctx.repo, start, a.max_count))?;
    let refs = ctx.refs()?;
    let entries: Vec<LogEntry> = walk
        .commits
        .iter()
        .map(|r| LogEntry::new(r, &refs, ctx.head))
        .collect();
    let hb = ctx.head_branch.as_deref();
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &entries)?;
        writeln!(out)?;
        return Ok(());
    }
    for (i, e) in entries.iter().enumerate() {
        if a.oneline {
            let d = e.decorations(hb);
            let d = if d.is_empty() {
                String::new()
            } else {
                format!("({d}) ")
            };
            writeln!(out, "{} {d}{}", short(&e.id), first_line(&e.message))?;
            continue;
        }
        if i > 0 {
            writeln!(out)?;
        }
        writeln!(out, "{}", header(e, hb))?;
        for p in &e.parents {
            writeln!(out, "Parent: {}", short(p))?;
        }
        writeln!(out, "Author: {}", e.author)?;
        writeln!(out, "Date:   {}", e.date)?;
        writeln!(out, "Files:  {}, {}", e.files, human_size(e.bytes))?;
        writeln!(out, "\n{}", indented(&e.message))?;
    }
    if let Some(p) = walk.missing_parent {
        writeln!(
            out,
            "{}(the history goes on with {}, which this repository does not have: a shallow copy)",
            if a.oneline { "" } else { "\n" },
            p.short()
        )?;
    }
    Ok(())
}

pub fn run_show(a: ShowArgs) -> anyhow::Result<()> {
    let (words, path) = split_args(&a.args, 1, "[REV] [PATH]", &a.volume)?;
    let ctx = Ctx::open(&a.volume, path, &words)?;
    let rev = words.first().map_or(HEAD, String::as_str);
    let r = ctx.resolve(rev)?;
    let refs = ctx.refs()?;
    let e = LogEntry::new(&r, &refs, ctx.head);
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &e)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "{}", header(&e, ctx.head_branch.as_deref()))?;
    writeln!(out, "Volume:   {}", e.volume)?;
    writeln!(out, "Manifest: {}", e.manifest)?;
    if e.parents.is_empty() {
        writeln!(out, "Parents:  none (the first commit)")?;
    }
    for p in &e.parents {
        writeln!(out, "Parent:   {p}")?;
    }
    writeln!(out, "Author:   {}", e.author)?;
    writeln!(out, "Date:     {}", e.date)?;
    writeln!(out, "Files:    {}", e.files)?;
    writeln!(out, "Bytes:    {} ({})", human_size(e.bytes), e.bytes)?;
    writeln!(out, "Chunks:   {}", e.chunks)?;
    writeln!(out, "\n{}", indented(&e.message))?;
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Branch,
    Tag,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Branch => "branch",
            Kind::Tag => "tag",
        }
    }
}

pub fn run_branch(a: BranchArgs) -> anyhow::Result<()> {
    refs_command(Kind::Branch, &a.args, a.delete, a.json, &a.volume)
}

pub fn run_tag(a: TagArgs) -> anyhow::Result<()> {
    refs_command(Kind::Tag, &a.args, a.delete, a.json, &a.volume)
}

fn refs_command(
    kind: Kind,
    args: &[OsString],
    delete: bool,
    json: bool,
    v: &VolumeArgs,
) -> anyhow::Result<()> {
    let (words, path) = split_args(args, 2, "[NAME [REV]] [PATH]", v)?;
    if delete && words.len() != 1 {
        bail!("-d takes exactly one {} name", kind.word());
    }
    if json && !words.is_empty() {
        bail!("--json is for listing; it takes no name");
    }
    let ctx = Ctx::open(v, path, &words)?;
    let Some(name) = words.first() else {
        return list_refs(&ctx, kind, json);
    };
    if delete {
        return delete_ref(&ctx, kind, name);
    }
    let rev = words.get(1).map_or(HEAD, String::as_str);
    let r = ctx.resolve(rev)?;
    ctx.rt.block_on(async {
        match kind {
            Kind::Branch => history::create_branch(&ctx.repo, &ctx.volume, name, r.id).await,
            Kind::Tag => history::create_tag(&ctx.repo, &ctx.volume, name, r.id).await,
        }
    })?;
    println!(
        "{} {name} of volume {} created at {} ({rev}: {})",
        kind.word(),
        ctx.volume,
        r.id.short(),
        first_line(&r.commit.message)
    );
    Ok(())
}

fn list_refs(ctx: &Ctx, kind: Kind, json: bool) -> anyhow::Result<()> {
    let refs = ctx.refs()?;
    let list = match kind {
        Kind::Branch => &refs.branches,
        Kind::Tag => &refs.tags,
    };
    let is_head = |name: &str| kind == Kind::Branch && ctx.head_branch.as_deref() == Some(name);
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<serde_json::Value> = list
            .iter()
            .map(|(n, c)| serde_json::json!({"name": n, "commit": c.to_hex(), "head": is_head(n)}))
            .collect();
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    let width = list.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    if kind == Kind::Branch
        && ctx.head_branch.is_none()
        && ctx.mountpoint.is_some()
        && let Some(h) = ctx.head
    {
        writeln!(out, "* (HEAD detached at {})", h.short())?;
    }
    for (n, c) in list {
        let message = ctx
            .rt
            .block_on(ctx.repo.commit(*c))
            .map(|c| first_line(&c.message).to_string())
            .unwrap_or_else(|e| format!("({e})"));
        let mark = match kind {
            Kind::Branch if is_head(n) => "* ",
            Kind::Branch => "  ",
            Kind::Tag => "",
        };
        writeln!(out, "{mark}{n:width$}  {}  {message}", c.short())?;
    }
    if kind == Kind::Branch {
        // Remote-tracking branches (`fetch`, `pull`), as git's `branch -a` shows them.
        for (n, c) in &refs.remotes {
            writeln!(out, "  remotes/{n}  {}", c.short())?;
        }
    }
    Ok(())
}

fn delete_ref(ctx: &Ctx, kind: Kind, name: &str) -> anyhow::Result<()> {
    let at = ctx.rt.block_on(async {
        match kind {
            Kind::Branch => ctx.repo.branch(&ctx.volume, name).await,
            Kind::Tag => ctx.repo.tag(&ctx.volume, name).await,
        }
    })?;
    if at.is_none() {
        bail!(
            "volume `{}` has no {} named `{name}`",
            ctx.volume,
            kind.word()
        );
    }
    if kind == Kind::Branch
        && ctx.head_branch.as_deref() == Some(name)
        && let Some(mp) = &ctx.mountpoint
    {
        bail!("cannot delete branch `{name}`: it is the branch mounted at {mp}");
    }
    let at = at.expect("checked above");
    ctx.rt
        .block_on(async {
            match kind {
                Kind::Branch => ctx.repo.delete_branch(&ctx.volume, name, at).await,
                Kind::Tag => ctx.repo.delete_tag(&ctx.volume, name, at).await,
            }
        })
        .with_context(|| {
            format!(
                "deleting {} `{name}` of volume {} (it was at {})",
                kind.word(),
                ctx.volume,
                at.short()
            )
        })?;
    println!(
        "deleted {} {name} of volume {} (was at {}); `horcrux gc` removes what only it reached",
        kind.word(),
        ctx.volume,
        at.short()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn va() -> VolumeArgs {
        VolumeArgs {
            mount: None,
            access: None,
            name: None,
            reference: None,
        }
    }

    #[test]
    fn paths_and_revisions_are_told_apart() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let (w, p) = split_args(&os(&["main~2", "/mnt/a"]), 1, "", &va()).unwrap();
        assert_eq!((w, p), (vec!["main~2".to_string()], Some("/mnt/a".into())));
        let (w, p) = split_args(&os(&["./main", "HEAD"]), 1, "", &va()).unwrap();
        assert_eq!((w, p), (vec!["HEAD".to_string()], Some("./main".into())));
        let (w, p) = split_args(&os(&["."]), 1, "", &va()).unwrap();
        assert_eq!((w, p), (vec![], Some(".".into())));
        let e = split_args(&os(&["a", "b"]), 1, "[REV] [PATH]", &va())
            .unwrap_err()
            .to_string();
        assert!(e.contains("a path needs a `/` (e.g. ./b)"), "{e}");
        let mut v = va();
        v.mount = Some("/mnt/x".into());
        assert!(split_args(&os(&["/mnt/y"]), 1, "", &v).is_err());
        let (w, p) = split_args(&os(&["exp", "HEAD~1"]), 2, "", &v).unwrap();
        assert_eq!(w, vec!["exp".to_string(), "HEAD~1".to_string()]);
        assert_eq!(p, Some("/mnt/x".into()));
        let mut v = va();
        v.access = Some("file:///r".into());
        assert!(split_args(&os(&["/mnt/y"]), 1, "", &v).is_err());
    }
}
