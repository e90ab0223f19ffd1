//! The mount daemon's side of the control channel: core status/diff/discard answers turned
//! into wire types (`horcrux_proto::control`).

use std::sync::Arc;

use horcrux::cache::Cache;
use horcrux::prefetch::{PrefetchConfig, Prefetcher, Progress, Scope};
use horcrux::repo::Repository;
use horcrux::versions::{CommitRequest, checkout_volume, commit_volume, reset_hard};
use horcrux::volume::{self, Volume};
use horcrux_proto::control::{self, Handler, Request, Response, WirePath};
use parking_lot::Mutex;

/// Answers control requests for one mounted volume.
#[derive(Debug)]
pub struct ControlHandler {
    pub volume: Arc<Volume>,
    pub name: String,
    /// The commit the volume sits on (moves with each commit).
    pub commit: Mutex<String>,
    /// The mounted branch; `None` when a tag or commit is mounted (nothing to commit onto).
    pub branch: Mutex<Option<String>>,
    pub repo: Repository,
    pub cache: Arc<Cache>,
    pub runtime: tokio::runtime::Handle,
    /// How it was mounted (`commit` is filled in per request).
    pub info: control::MountInfo,
    /// Background hydration of this volume (`horcrux prefetch`).
    pub prefetcher: Arc<Prefetcher>,
    /// Filesystem operations counted by the FUSE adapter.
    pub ops: Arc<horcrux::metrics::OpMetrics>,
    pub started: std::time::Instant,
    /// The bound address of `--metrics`, once it listens.
    pub metrics_addr: Mutex<Option<String>>,
    /// The mount's start-up profile (recording and replay).
    pub startup: Arc<StartupState>,
}

impl ControlHandler {
    /// Every counter of this mount (`horcrux stats`, `--metrics`).
    pub fn stats(&self) -> control::StatsReport {
        let (reads, fetch, sources) = crate::metrics::fetcher_figures(self.volume.fetcher());
        control::StatsReport {
            volume: self.name.clone(),
            commit: self.commit.lock().clone(),
            mountpoint: self.info.mountpoint.clone(),
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            metrics_addr: self.metrics_addr.lock().clone(),
            cache: crate::metrics::cache_figures(&self.cache),
            reads,
            fetch,
            sources,
            overlay: self.volume.overlay().map(|o| {
                let (bytes, files) = o.usage();
                control::OverlayFigures { bytes, files }
            }),
            ops: self.ops.snapshot().iter().map(crate::metrics::op).collect(),
            prefetch: self
                .prefetcher
                .status()
                .map(|p| prefetch_report(p, self.prefetcher.owner())),
            passthrough: Some({
                use std::sync::atomic::Ordering::Relaxed;
                let p = self.volume.passthrough_stats();
                control::PassthroughFigures {
                    active: self.volume.passthrough_active(),
                    opens: p.opens.load(Relaxed),
                    registered: p.registered.load(Relaxed),
                    not_cached: p.not_cached.load(Relaxed),
                }
            }),
        }
    }
}

/// What a mount's start-up profile is doing, for `replay_status` (set by the mount's profile
/// task, read by the control socket).
#[derive(Debug, Default)]
pub struct StartupState {
    pub recording: Mutex<String>,
    pub replay: Mutex<String>,
    /// Short profile id, generations back, counters of the running (or finished) replay.
    pub progress: Mutex<Option<(String, u32, Arc<horcrux::profile::ReplayProgress>)>>,
}

impl StartupState {
    pub fn set_recording(&self, s: impl Into<String>) {
        *self.recording.lock() = s.into();
    }

    pub fn set_replay(&self, s: impl Into<String>) {
        *self.replay.lock() = s.into();
    }

    pub fn report(&self) -> control::ReplayReport {
        use std::sync::atomic::Ordering::Relaxed;
        let mut r = control::ReplayReport {
            recording: self.recording.lock().clone(),
            replay: self.replay.lock().clone(),
            profile: None,
            generations: 0,
            entries: 0,
            blocks: 0,
            present: 0,
            fetched: 0,
            fetched_bytes: 0,
            shared: 0,
            failed: 0,
        };
        if let Some((id, generations, p)) = &*self.progress.lock() {
            r.profile = Some(id.clone());
            r.generations = *generations;
            r.entries = p.entries.load(Relaxed);
            r.blocks = p.mapped.load(Relaxed);
            r.present = p.present.load(Relaxed);
            r.fetched = p.fetched.load(Relaxed);
            r.fetched_bytes = p.fetched_bytes.load(Relaxed);
            r.shared = p.shared.load(Relaxed);
            r.failed = p.failed.load(Relaxed);
            if p.done.load(Relaxed) && r.replay == "running" {
                r.replay = "done".into();
            }
        }
        r
    }
}

impl ControlHandler {
    /// The commit `rev` names (`HEAD` is where the volume is; `~N` suffixes go back).
    fn resolve(&self, rev: &str) -> Result<horcrux::ids::CommitId, String> {
        let head = self.commit.lock().parse().ok();
        self.runtime
            .block_on(horcrux::history::resolve_rev(
                &self.repo, &self.name, rev, head,
            ))
            .map(|r| r.id)
            .map_err(|e| e.to_string())
    }

    /// `checkout REV` (or `reset --hard REV` when `reset`).
    fn checkout(&self, rev: &str, discard: bool, reset: bool) -> Response {
        let target = match self.resolve(rev) {
            Ok(t) => t,
            Err(e) => return Response::error(e),
        };
        let r = if reset {
            let Some(branch) = self.branch.lock().clone() else {
                return Response::error(
                    "the mount shows a tag or commit id, not a branch: there is no branch to reset",
                );
            };
            reset_hard(
                &self.volume,
                &self.repo,
                &self.cache,
                &self.runtime,
                &branch,
                target,
            )
        } else {
            checkout_volume(
                &self.volume,
                &self.repo,
                &self.cache,
                &self.runtime,
                target,
                discard,
            )
        };
        match r {
            Ok(r) => {
                *self.commit.lock() = r.commit.to_hex();
                if !reset {
                    // A branch name makes later commits go there; anything else detaches.
                    let is_branch = matches!(
                        self.runtime.block_on(self.repo.branch(&self.name, rev)),
                        Ok(Some(_))
                    );
                    *self.branch.lock() = is_branch.then(|| rev.to_string());
                }
                Response::CheckedOut {
                    commit: r.commit.to_hex(),
                    branch: self.branch.lock().clone(),
                    discarded: r.discarded as u64,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "checkout failed");
                Response::error(e.to_string())
            }
        }
    }

    fn commit(&self, message: String, author: String) -> Response {
        let Some(branch) = self.branch.lock().clone() else {
            return Response::error(format!(
                "the mount shows commit {} (a tag or commit id, not a branch): there is no branch                  to commit onto; mount a branch to commit",
                self.commit.lock()
            ));
        };
        let req = CommitRequest {
            branch: branch.clone(),
            message,
            author,
        };
        match commit_volume(&self.volume, &self.repo, &self.cache, &self.runtime, &req) {
            Ok(r) => {
                *self.commit.lock() = r.commit.to_hex();
                Response::Committed(control::CommitReport {
                    volume: self.name.clone(),
                    branch,
                    commit: r.commit.to_hex(),
                    parent: r.parent.to_hex(),
                    files: r.stats.files,
                    bytes: r.stats.bytes,
                    new_chunks: r.stats.new_chunks,
                    new_bytes: r.stats.new_bytes,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "commit failed");
                Response::error(e.to_string())
            }
        }
    }
}

fn change(c: volume::Change) -> control::Change {
    control::Change {
        path: c.path.into(),
        kind: match c.kind {
            volume::ChangeKind::Added => control::ChangeKind::Added,
            volume::ChangeKind::Modified => control::ChangeKind::Modified,
            volume::ChangeKind::Deleted => control::ChangeKind::Deleted,
            volume::ChangeKind::Renamed { from } => {
                control::ChangeKind::Renamed { from: from.into() }
            }
        },
        node_kind: c.node_kind.name().to_string(),
        data: c.data,
        meta: c.meta,
        bytes: c.bytes,
    }
}

/// A core diff in its wire form (also what `diff A B` prints).
pub fn file_diff(d: volume::FileDiff) -> control::FileDiff {
    control::FileDiff {
        change: change(d.change),
        old_size: d.old_size,
        new_size: d.new_size,
        ranges: d.ranges.into_iter().map(|r| [r.start, r.end]).collect(),
        meta: d
            .meta
            .into_iter()
            .map(|m| control::MetaChange {
                field: m.field,
                old: m.old,
                new: m.new,
            })
            .collect(),
    }
}

/// A path from the wire, checked (no `..`, no leading `/`); `None` for the whole volume.
fn scope(path: Option<WirePath>) -> Result<Option<Vec<u8>>, String> {
    match path {
        Some(p) => {
            p.check()?;
            Ok((!p.is_root()).then(|| p.into_bytes()))
        }
        None => Ok(None),
    }
}

/// A job's progress in its wire form.
pub fn prefetch_report(p: Progress, owner: &str) -> control::PrefetchReport {
    control::PrefetchReport {
        state: p.state.name().to_string(),
        error: match &p.state {
            horcrux::prefetch::JobState::Failed(e) => Some(e.clone()),
            _ => None,
        },
        scope: p.scope.describe(),
        total_bytes: p.total_bytes,
        present_bytes: p.present_bytes,
        total_blocks: p.total_blocks,
        present_blocks: p.present_blocks,
        fetched_bytes: p.fetched_bytes,
        failed_blocks: p.failed_blocks,
        elapsed_ms: p.elapsed.as_millis() as u64,
        bandwidth: p.config.bandwidth,
        concurrency: p.config.concurrency as u32,
        commit: p.commit,
        owner: owner.to_string(),
    }
}

impl ControlHandler {
    fn prefetch(
        &self,
        all: bool,
        paths: Vec<WirePath>,
        bandwidth: Option<u64>,
        concurrency: Option<u32>,
    ) -> Response {
        let scope = if all {
            Scope::All
        } else {
            let mut v = Vec::new();
            for p in paths {
                if let Err(e) = p.check() {
                    return Response::error(e);
                }
                v.push(p.into_bytes());
            }
            if v.is_empty() {
                return Response::error("prefetch what? ask for everything or give paths");
            }
            Scope::Paths(v)
        };
        let config = PrefetchConfig {
            bandwidth: bandwidth.filter(|b| *b > 0),
            concurrency: concurrency
                .map(|c| c.clamp(1, 256) as usize)
                .unwrap_or(PrefetchConfig::default().concurrency),
        };
        let commit = self.commit.lock().clone();
        match self.prefetcher.start(scope, config, &commit) {
            Ok(p) => Response::Prefetch(prefetch_report(p, self.prefetcher.owner())),
            Err(e) => {
                tracing::warn!(error = %e, "prefetch not started");
                Response::error(e.to_string())
            }
        }
    }

    fn prefetch_status(&self, cancel: bool) -> Response {
        let p = if cancel {
            match self.prefetcher.cancel() {
                Ok(p) => p,
                Err(e) => return Response::error(e.to_string()),
            }
        } else {
            self.prefetcher.status()
        };
        match p {
            Some(p) => Response::Prefetch(prefetch_report(p, self.prefetcher.owner())),
            None => Response::NoPrefetch,
        }
    }
}

impl Handler for ControlHandler {
    fn handle(&self, req: Request) -> Response {
        let r = match req {
            Request::Ping => {
                return Response::Pong {
                    volume: self.name.clone(),
                    commit: self.commit.lock().clone(),
                    pid: std::process::id(),
                };
            }
            Request::Status => self.volume.status().map(|s| {
                Response::Status(control::StatusReport {
                    volume: self.name.clone(),
                    base_commit: self.commit.lock().clone(),
                    changes: s.changes.into_iter().map(change).collect(),
                    bytes_changed: s.bytes_changed,
                    overlay_bytes: s.overlay_bytes,
                })
            }),
            Request::Commit { message, author } => return self.commit(message, author),
            Request::Describe => {
                return Response::Described(control::MountInfo {
                    commit: self.commit.lock().clone(),
                    branch: self.branch.lock().clone(),
                    ..self.info.clone()
                });
            }
            Request::Checkout { rev, discard } => return self.checkout(&rev, discard, false),
            Request::ResetHard { rev } => return self.checkout(&rev, true, true),
            Request::Prefetch {
                all,
                paths,
                bandwidth,
                concurrency,
            } => return self.prefetch(all, paths, bandwidth, concurrency),
            Request::PrefetchStatus => return self.prefetch_status(false),
            Request::PrefetchCancel => return self.prefetch_status(true),
            Request::Stats => return Response::Stats(Box::new(self.stats())),
            Request::ReplayStatus => return Response::Replay(self.startup.report()),
            Request::Diff { path } => match scope(path) {
                Ok(p) => self
                    .volume
                    .diff(p.as_deref())
                    .map(|d| Response::Diff(d.into_iter().map(file_diff).collect())),
                Err(e) => return Response::error(e),
            },
            Request::Discard { path } => match scope(path) {
                Ok(p) => self
                    .volume
                    .discard(p.as_deref())
                    .map(|entries| Response::Discarded { entries }),
                Err(e) => return Response::error(e),
            },
        };
        r.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "control request failed");
            Response::error(e.to_string())
        })
    }
}
