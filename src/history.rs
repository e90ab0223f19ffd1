//! The history of a volume: revisions (`HEAD`, `main~2`, `v1`, `3f2a9c1^`), first-parent walks
//! for `log`, what points where (branches and tags, as decorations), and making branches and
//! tags by compare-and-swap from absent.
//!
//! Revision syntax: a base — `HEAD` (the commit a mount sits on, given by the caller), a branch,
//! a tag, a full commit id or a unique prefix of at least 4 hex digits, resolved in that order
//! by [`Repository::resolve`] — followed by any number of suffixes: `~N` goes N first parents
//! back (`~` alone is `~1`), `^` is `~1` (`^1` too; there are no merges, so no `^2`).
//! Suffixes add up: `main~2^` is `main~3`. Branch and tag names never contain `~`, `^` or `/`.

use serde::Serialize;

use crate::commit::Commit;
use crate::format;
use crate::ids::CommitId;
use crate::repo::{RepoError, Repository};
use crate::store::StoreError;

/// The name of the commit a mount sits on.
pub const HEAD: &str = "HEAD";

/// Errors of history operations. Messages are for the user and name the revision.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("`{rev}` is not a revision: {why}")]
    BadRev { rev: String, why: String },
    #[error(
        "`{rev}`: HEAD is the commit a mount sits on, and no mount was named; run the command \
         inside a mount (or with -C MOUNTPOINT), or name a branch, tag or commit id"
    )]
    NoHead { rev: String },
    #[error("`{rev}`: the history has only {have} commit{s} before `{base}`", s = if *have == 1 { "" } else { "s" })]
    TooFarBack {
        rev: String,
        base: String,
        have: u64,
    },
    #[error(
        "`{rev}`: the history stops at {at}: its parent {parent} is not in this repository \
         (a shallow copy)"
    )]
    Truncated {
        rev: String,
        at: String,
        parent: String,
    },
    #[error("`{rev}`: commit {id} belongs to volume `{other}`, not to `{volume}`")]
    OtherVolume {
        rev: String,
        id: String,
        other: String,
        volume: String,
    },
    #[error(
        "invalid {kind} name `{name}`: use letters, digits, `.`, `_` and `-` (1-128 characters, \
         not starting with `.`), and not `HEAD`"
    )]
    BadName { kind: &'static str, name: String },
    #[error("volume `{volume}`: a {kind} named `{name}` already exists (at {at}){hint}", hint = if *kind == "tag" { "; tags never move: choose another name" } else { "; choose another name" })]
    Exists {
        kind: &'static str,
        volume: String,
        name: String,
        at: String,
    },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// A parsed revision: a base name and how many first parents to go back from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rev {
    pub base: String,
    pub back: u64,
}

/// Whether `rev` is a well-formed revision of a remote-tracking branch (`REMOTE/BRANCH`,
/// `remotes/REMOTE/BRANCH`, with `~N`): the one kind of revision with a `/`, which command
/// lines otherwise take for a path.
pub fn is_remote_rev(rev: &str) -> bool {
    parse_rev(rev).is_ok_and(|r| crate::repo::split_remote_ref(&r.base).is_some())
}

/// Parse `base[~N|~|^|^1]...`.
pub fn parse_rev(rev: &str) -> Result<Rev, HistoryError> {
    let bad = |why: &str| HistoryError::BadRev {
        rev: rev.to_string(),
        why: why.to_string(),
    };
    let end = rev.find(['~', '^']).unwrap_or(rev.len());
    let (base, mut rest) = rev.split_at(end);
    if base.is_empty() {
        return Err(bad(
            "it needs a branch, tag, commit id or HEAD before `~` or `^`",
        ));
    }
    let mut back: u64 = 0;
    while let Some(op) = rest.chars().next() {
        // `op` may be any character after a number (`~1é`): skip it whole, never one byte.
        rest = &rest[op.len_utf8()..];
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(digits);
        rest = tail;
        let n: u64 = if num.is_empty() {
            1
        } else {
            num.parse().map_err(|_| bad("the number is too large"))?
        };
        match op {
            '~' => {}
            '^' if n <= 1 => {}
            '^' => {
                return Err(bad(
                    "`^N` picks the N-th parent of a merge, and horcrux commits have one \
                     parent; use `~N` to go N commits back",
                ));
            }
            _ => {
                return Err(bad(&format!(
                    "unexpected `{op}` (suffixes are `~N`, `~` and `^`)"
                )));
            }
        }
        back = back
            .checked_add(n)
            .ok_or_else(|| bad("the number is too large"))?;
    }
    Ok(Rev {
        base: base.to_string(),
        back,
    })
}

/// A commit and its id.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub id: CommitId,
    pub commit: Commit,
}

/// Resolve revision `rev` of `volume`. `head` is what `HEAD` means (the mount's commit), if
/// anything.
pub async fn resolve_rev(
    repo: &Repository,
    volume: &str,
    rev: &str,
    head: Option<CommitId>,
) -> Result<Resolved, HistoryError> {
    let r = parse_rev(rev)?;
    let mut id = if r.base == HEAD {
        head.ok_or_else(|| HistoryError::NoHead {
            rev: rev.to_string(),
        })?
    } else {
        repo.resolve(volume, &r.base).await?
    };
    let mut commit = repo.commit(id).await?;
    if commit.volume != volume {
        return Err(HistoryError::OtherVolume {
            rev: rev.to_string(),
            id: id.short(),
            other: commit.volume,
            volume: volume.to_string(),
        });
    }
    for have in 0..r.back {
        let Some(parent) = first_parent(&commit) else {
            return Err(HistoryError::TooFarBack {
                rev: rev.to_string(),
                base: r.base,
                have,
            });
        };
        commit = match load(repo, parent).await? {
            Some(c) => c,
            None => {
                return Err(HistoryError::Truncated {
                    rev: rev.to_string(),
                    at: id.short(),
                    parent: parent.short(),
                });
            }
        };
        id = parent;
    }
    Ok(Resolved { id, commit })
}

fn first_parent(c: &Commit) -> Option<CommitId> {
    c.parents.first().and_then(|p| p.parse().ok())
}

/// A commit, or `None` if the repository does not have it (a shallow copy).
async fn load(repo: &Repository, id: CommitId) -> Result<Option<Commit>, HistoryError> {
    match repo.commit(id).await {
        Ok(c) => Ok(Some(c)),
        Err(RepoError::Store(e)) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// What a first-parent walk found.
#[derive(Debug, Clone)]
pub struct Walk {
    /// Newest first.
    pub commits: Vec<Resolved>,
    /// The walk stopped because this parent (of the last commit listed) is missing from the
    /// repository (a shallow copy); `None` when it reached the first commit or the limit.
    pub missing_parent: Option<CommitId>,
}

/// The commits from `start` along first parents, newest first, at most `limit` of them.
pub async fn walk(
    repo: &Repository,
    start: Resolved,
    limit: Option<usize>,
) -> Result<Walk, HistoryError> {
    let mut commits = Vec::new();
    let mut missing_parent = None;
    let mut next = Some(start);
    while let Some(r) = next.take() {
        if limit.is_some_and(|l| commits.len() >= l) {
            break;
        }
        if let Some(p) = first_parent(&r.commit) {
            if limit.is_none_or(|l| commits.len() + 1 < l) {
                match load(repo, p).await? {
                    Some(commit) => next = Some(Resolved { id: p, commit }),
                    None => missing_parent = Some(p),
                }
            }
        }
        commits.push(r);
    }
    Ok(Walk {
        commits,
        missing_parent,
    })
}

/// The branches and tags of a volume, to say which point at a commit.
#[derive(Debug, Clone, Default)]
pub struct Refs {
    pub branches: Vec<(String, CommitId)>,
    pub tags: Vec<(String, CommitId)>,
    /// Remote-tracking branches, as `REMOTE/BRANCH`.
    pub remotes: Vec<(String, CommitId)>,
}

impl Refs {
    pub async fn load(repo: &Repository, volume: &str) -> Result<Self, HistoryError> {
        Ok(Self {
            branches: repo.branches(volume).await?,
            tags: repo.tags(volume).await?,
            remotes: repo
                .remote_branches(volume)
                .await?
                .into_iter()
                .map(|(r, b, id)| (format!("{r}/{b}"), id))
                .collect(),
        })
    }

    /// Names of the branches at `id`.
    pub fn branches_at(&self, id: &CommitId) -> Vec<String> {
        at(&self.branches, id)
    }

    /// Names of the tags at `id`.
    pub fn tags_at(&self, id: &CommitId) -> Vec<String> {
        at(&self.tags, id)
    }
}

fn at(refs: &[(String, CommitId)], id: &CommitId) -> Vec<String> {
    refs.iter()
        .filter(|(_, c)| c == id)
        .map(|(n, _)| n.clone())
        .collect()
}

/// One commit as `log --json` and `show --json` print it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LogEntry {
    /// Hex id.
    pub id: String,
    pub volume: String,
    /// Hex id of the tree catalog.
    pub manifest: String,
    /// Hex ids; empty for the first commit.
    pub parents: Vec<String>,
    pub author: String,
    /// Seconds since the Unix epoch.
    pub time: i64,
    /// `time` in RFC 3339, UTC.
    pub date: String,
    pub message: String,
    pub files: u64,
    pub bytes: u64,
    pub chunks: u64,
    /// The commit is HEAD (the mount's commit).
    pub head: bool,
    /// Branches and tags pointing at it.
    pub branches: Vec<String>,
    /// Remote-tracking branches here, as `REMOTE/BRANCH`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remotes: Vec<String>,
    pub tags: Vec<String>,
}

impl LogEntry {
    pub fn new(r: &Resolved, refs: &Refs, head: Option<CommitId>) -> Self {
        let c = &r.commit;
        Self {
            id: r.id.to_hex(),
            volume: c.volume.clone(),
            manifest: c.manifest.clone(),
            parents: c.parents.clone(),
            author: c.author.clone(),
            time: c.time,
            date: crate::util::rfc3339(c.time),
            message: c.message.clone(),
            files: c.stats.files,
            bytes: c.stats.bytes,
            chunks: c.stats.chunks,
            head: head == Some(r.id),
            branches: refs.branches_at(&r.id),
            remotes: at(&refs.remotes, &r.id),
            tags: refs.tags_at(&r.id),
        }
    }

    /// Git-style decorations: `HEAD -> main, exp, tag: v1` (`head_branch` is the mounted
    /// branch, shown as where HEAD points when it is here).
    pub fn decorations(&self, head_branch: Option<&str>) -> String {
        let mut out = Vec::new();
        let mut branches: Vec<&str> = self.branches.iter().map(String::as_str).collect();
        if self.head {
            match head_branch.and_then(|b| branches.iter().position(|x| *x == b)) {
                Some(i) => out.push(format!("HEAD -> {}", branches.remove(i))),
                None => out.push(HEAD.to_string()),
            }
        }
        out.extend(branches.iter().map(|b| b.to_string()));
        out.extend(self.remotes.iter().cloned());
        out.extend(self.tags.iter().map(|t| format!("tag: {t}")));
        out.join(", ")
    }
}

/// Check a new branch or tag name.
fn check_new_name(kind: &'static str, name: &str) -> Result<(), HistoryError> {
    if name == HEAD || format::check_ref_name(name).is_err() {
        return Err(HistoryError::BadName {
            kind,
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Create branch `name` of `volume` at `id`, by compare-and-swap from absent.
pub async fn create_branch(
    repo: &Repository,
    volume: &str,
    name: &str,
    id: CommitId,
) -> Result<(), HistoryError> {
    check_new_name("branch", name)?;
    match repo.set_branch(volume, name, None, id).await {
        Ok(()) => Ok(()),
        Err(RepoError::Store(StoreError::CasConflict { .. })) => Err(HistoryError::Exists {
            kind: "branch",
            volume: volume.to_string(),
            name: name.to_string(),
            at: repo
                .branch(volume, name)
                .await?
                .map_or("?".into(), |c| c.short()),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Create tag `name` of `volume` at `id`, by compare-and-swap from absent.
pub async fn create_tag(
    repo: &Repository,
    volume: &str,
    name: &str,
    id: CommitId,
) -> Result<(), HistoryError> {
    check_new_name("tag", name)?;
    match repo.create_tag(volume, name, id).await {
        Ok(()) => Ok(()),
        Err(RepoError::Store(StoreError::CasConflict { .. })) => Err(HistoryError::Exists {
            kind: "tag",
            volume: volume.to_string(),
            name: name.to_string(),
            at: repo
                .tag(volume, name)
                .await?
                .map_or("?".into(), |c| c.short()),
        }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::commit::CommitStats;
    use crate::format::FORMAT_VERSION;
    use crate::ids::ManifestId;
    use crate::store::{FileStore, Store};

    #[test]
    fn revisions_parse() {
        let r = |s: &str| parse_rev(s).map(|r| (r.base, r.back));
        assert_eq!(r("main").unwrap(), ("main".into(), 0));
        assert_eq!(r("HEAD~").unwrap(), ("HEAD".into(), 1));
        assert_eq!(r("HEAD~3").unwrap(), ("HEAD".into(), 3));
        assert_eq!(r("3f2a9c1~2").unwrap(), ("3f2a9c1".into(), 2));
        assert_eq!(r("v1^").unwrap(), ("v1".into(), 1));
        assert_eq!(r("v1^1").unwrap(), ("v1".into(), 1));
        assert_eq!(r("main~2^~").unwrap(), ("main".into(), 4));
        assert_eq!(r("main~0").unwrap(), ("main".into(), 0));
        assert_eq!(r("x~~").unwrap(), ("x".into(), 2));
        for bad in ["", "~1", "^", "main^2", "main~99999999999999999999999"] {
            assert!(parse_rev(bad).is_err(), "{bad}");
        }
        let e = parse_rev("main^2").unwrap_err().to_string();
        assert!(e.contains("use `~N`"), "{e}");
        // Regression (found while writing the fuzz target `repo_text`): a multi-byte character after a number was
        // skipped by one byte, slicing inside it (a panic).
        let e = parse_rev("main~1\u{e9}").unwrap_err().to_string();
        assert!(e.contains("unexpected `\u{e9}`"), "{e}");
    }

    #[test]
    fn dates() {
        assert_eq!(crate::util::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(crate::util::rfc3339(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(crate::util::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(crate::util::rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    fn commit(volume: &str, parent: Option<CommitId>, n: i64) -> Commit {
        Commit {
            version: FORMAT_VERSION,
            volume: volume.into(),
            manifest: ManifestId::of(&n.to_le_bytes()).to_hex(),
            parents: parent.into_iter().map(|p| p.to_hex()).collect(),
            author: format!("a{n}"),
            time: 1_767_225_600 + n,
            message: format!("commit {n}"),
            stats: CommitStats::default(),
        }
    }

    async fn repo_with_chain(dir: &std::path::Path, n: i64) -> (Repository, Vec<CommitId>) {
        let store: Arc<dyn Store> = Arc::new(FileStore::new(dir.to_path_buf()));
        let repo = Repository::open_or_init(store).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..n {
            let c = commit("vol", ids.last().copied(), i);
            ids.push(repo.put_commit(&c).await.unwrap());
        }
        let tip = *ids.last().unwrap();
        repo.set_branch("vol", "main", None, tip).await.unwrap();
        (repo, ids)
    }

    #[tokio::test]
    async fn resolve_walk_and_refs() {
        let d = tempfile::tempdir().unwrap();
        let (repo, ids) = repo_with_chain(d.path(), 4).await;
        let res = |rev: &'static str, head: Option<CommitId>| {
            let repo = repo.clone();
            async move { resolve_rev(&repo, "vol", rev, head).await }
        };
        assert_eq!(res("main", None).await.unwrap().id, ids[3]);
        assert_eq!(res("main~3", None).await.unwrap().id, ids[0]);
        assert_eq!(res("HEAD^", Some(ids[2])).await.unwrap().id, ids[1]);
        let e = res("main~5", None).await.unwrap_err().to_string();
        assert_eq!(e, "`main~5`: the history has only 3 commits before `main`");
        let e = res("HEAD", None).await.unwrap_err().to_string();
        assert!(e.contains("no mount was named"), "{e}");
        assert!(matches!(
            res("nope", None).await,
            Err(HistoryError::Repo(RepoError::NoSuchRef { .. }))
        ));
        let short = ids[1].to_hex()[..8].to_string();
        let r = resolve_rev(&repo, "vol", &format!("{short}~1"), None)
            .await
            .unwrap();
        assert_eq!(r.id, ids[0]);

        create_branch(&repo, "vol", "exp", ids[1]).await.unwrap();
        let e = create_branch(&repo, "vol", "exp", ids[2])
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("a branch named `exp` already exists"), "{e}");
        assert!(create_branch(&repo, "vol", "HEAD", ids[2]).await.is_err());
        assert!(create_branch(&repo, "vol", "a/b", ids[2]).await.is_err());
        create_tag(&repo, "vol", "v1", ids[1]).await.unwrap();
        let e = create_tag(&repo, "vol", "v1", ids[1])
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("tags never move"), "{e}");

        let refs = Refs::load(&repo, "vol").await.unwrap();
        assert_eq!(
            refs.branches,
            vec![("exp".to_string(), ids[1]), ("main".to_string(), ids[3])]
        );
        assert_eq!(refs.tags_at(&ids[1]), vec!["v1".to_string()]);

        let start = res("main", None).await.unwrap();
        let w = walk(&repo, start.clone(), None).await.unwrap();
        let got: Vec<CommitId> = w.commits.iter().map(|r| r.id).collect();
        assert_eq!(got, ids.iter().rev().copied().collect::<Vec<_>>());
        assert_eq!(w.missing_parent, None);
        let w = walk(&repo, start.clone(), Some(2)).await.unwrap();
        assert_eq!(w.commits.len(), 2);
        assert_eq!(w.missing_parent, None);
        assert_eq!(walk(&repo, start, Some(0)).await.unwrap().commits.len(), 0);

        let e = LogEntry::new(&res("exp", None).await.unwrap(), &refs, Some(ids[1]));
        assert_eq!(e.decorations(Some("exp")), "HEAD -> exp, tag: v1");
        assert_eq!(e.decorations(Some("main")), "HEAD, exp, tag: v1");
        assert_eq!(e.date, "2026-01-01T00:00:01Z");

        // A shallow copy: the oldest commit is gone.
        std::fs::remove_file(d.path().join(format!("commits/{}", ids[0].to_hex()))).unwrap();
        let w = walk(&repo, res("main", None).await.unwrap(), None)
            .await
            .unwrap();
        assert_eq!(w.commits.len(), 3);
        assert_eq!(w.missing_parent, Some(ids[0]));
        let e = res("main~3", None).await.unwrap_err().to_string();
        assert!(e.contains("not in this repository"), "{e}");
    }

    #[tokio::test]
    async fn commits_of_another_volume_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let (repo, _) = repo_with_chain(d.path(), 1).await;
        let other = repo.put_commit(&commit("other", None, 9)).await.unwrap();
        let e = resolve_rev(&repo, "vol", &other.to_hex(), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("belongs to volume `other`"), "{e}");
    }
}
