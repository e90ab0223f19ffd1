//! The mount daemon's side of the control channel: core status/diff/discard answers turned
//! into wire types (`horcrux_proto::control`).

use std::sync::Arc;

use horcrux::manifest::NodeKind;
use horcrux::volume::{self, Volume};
use horcrux_proto::control::{self, Handler, Request, Response, WirePath};

/// Answers control requests for one mounted volume.
#[derive(Debug)]
pub struct ControlHandler {
    pub volume: Arc<Volume>,
    pub name: String,
    pub commit: String,
}

fn node_kind(k: NodeKind) -> String {
    match k {
        NodeKind::File => "file",
        NodeKind::Dir => "dir",
        NodeKind::Symlink => "symlink",
        NodeKind::Fifo => "fifo",
        NodeKind::Socket => "socket",
        NodeKind::CharDev => "chardev",
        NodeKind::BlockDev => "blockdev",
    }
    .to_string()
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
        node_kind: node_kind(c.node_kind),
        data: c.data,
        meta: c.meta,
        bytes: c.bytes,
    }
}

fn file_diff(d: volume::FileDiff) -> control::FileDiff {
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
fn scope(path: Option<WirePath>) -> Result<Option<Vec<u8>>, Response> {
    match path {
        Some(p) => {
            p.check().map_err(Response::error)?;
            Ok((!p.is_root()).then(|| p.into_bytes()))
        }
        None => Ok(None),
    }
}

impl Handler for ControlHandler {
    fn handle(&self, req: Request) -> Response {
        let r = match req {
            Request::Ping => {
                return Response::Pong {
                    volume: self.name.clone(),
                    commit: self.commit.clone(),
                    pid: std::process::id(),
                };
            }
            Request::Status => self.volume.status().map(|s| {
                Response::Status(control::StatusReport {
                    volume: self.name.clone(),
                    base_commit: self.commit.clone(),
                    changes: s.changes.into_iter().map(change).collect(),
                    bytes_changed: s.bytes_changed,
                    overlay_bytes: s.overlay_bytes,
                })
            }),
            Request::Diff { path } => match scope(path) {
                Ok(p) => self
                    .volume
                    .diff(p.as_deref())
                    .map(|d| Response::Diff(d.into_iter().map(file_diff).collect())),
                Err(resp) => return resp,
            },
            Request::Discard { path } => match scope(path) {
                Ok(p) => self
                    .volume
                    .discard(p.as_deref())
                    .map(|entries| Response::Discarded { entries }),
                Err(resp) => return resp,
            },
        };
        r.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "control request failed");
            Response::error(e.to_string())
        })
    }
}
