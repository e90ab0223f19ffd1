//! `horcrux generate`: cut a directory tree into content-addressed chunks and a manifest, and
//! record them as the first commit of a volume.
//!
//! Threads (see [`pipeline`] for the data path):
//! - the calling thread is the **planner** ([`plan`]): it walks the tree in a fixed order, writes
//!   every metadata row of the catalog and sends chunk tasks, in index order, to a bounded queue;
//! - `workers` threads read and hash chunks (each holds at most one chunk buffer);
//! - a few uploader threads store hashed chunks through the caller's tokio runtime
//!   (`block_on`), with retries; a chunk the store already has is not uploaded again, so an
//!   interrupted run resumes cheaply.
//!
//! Chunk rows go into the catalog last, in index order, so the catalog's bytes (hence the
//! manifest id) do not depend on thread timing: the same input gives the same manifest id.

mod pipeline;
mod plan;
mod stream;
mod walk;

pub use stream::{InputEntry, InputNode, TreeInput};

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc::sync_channel;

use crate::commit::{Commit, CommitStats};
use crate::format::{
    self, FORMAT_VERSION, FormatError, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, manifest_key,
};
use crate::ids::{CommitId, ManifestId};
use crate::manifest::{CatalogHeader, ManifestError, ManifestWriter};
use crate::repo::{RepoError, Repository};
use crate::store::StoreError;

use pipeline::{Pipeline, PipelineConfig};
use plan::Planner;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Volume name (see [`format::check_volume_name`]).
    pub name: String,
    /// Directory to cut into chunks.
    pub input: PathBuf,
    /// Largest chunk: a power of two from 1 MiB to 1 GiB.
    pub chunk_size: u64,
    /// Verification block size ([`format::DEFAULT_BLOCK_SIZE`]); also the size below which files
    /// are packed together.
    pub block_size: u32,
    /// Message of the first commit.
    pub message: String,
    /// Author of the first commit.
    pub author: String,
    /// Threads reading and hashing chunks; 0 = the number of CPUs.
    pub workers: usize,
}

/// Progress of a run, driven from several threads.
pub trait Progress: Send + Sync {
    /// Called once before any content is read. Totals are 0 when [`Progress::wants_totals`] is
    /// false (no pre-pass over the tree is made then).
    fn start(&self, total_bytes: u64, total_files: u64);
    /// `bytes` more file bytes are done (holes count as done when skipped).
    fn advance(&self, bytes: u64);
    /// Everything is stored and committed.
    fn finish(&self);
    /// Whether [`Progress::start`] should get real totals, at the cost of a quick metadata
    /// pre-pass over the tree.
    fn wants_totals(&self) -> bool {
        true
    }
}

/// Progress that shows nothing (and skips the pre-pass).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _total_bytes: u64, _total_files: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
    fn wants_totals(&self) -> bool {
        false
    }
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateReport {
    pub commit: CommitId,
    pub manifest: ManifestId,
    /// Regular files (inodes; a hard-linked file counts once).
    pub files: u64,
    /// Directories, the root included.
    pub dirs: u64,
    /// Bytes of regular files (holes included).
    pub bytes: u64,
    /// Chunks of the manifest (rows of its chunk table).
    pub chunks: u64,
    /// Chunks uploaded (the others were in the store already).
    pub chunks_written: u64,
    pub bytes_written: u64,
}

/// Why a run failed. Messages name the path, key or volume involved.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(
        "invalid block size {0}: use a power of two from 1 KiB up to the chunk size (default 1 MiB)"
    )]
    BadBlockSize(u32),
    #[error("input directory {}: {source}", path.display())]
    Input {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("input {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} changed while generate was reading it ({what}); stop what writes to the tree and run generate again",
        path.display()
    )]
    Changed { path: PathBuf, what: String },
    #[error(
        "{store}: volume `{name}` already exists; generate refuses to overwrite an existing repository (choose another name or output)"
    )]
    VolumeExists { store: String, name: String },
    #[error("temporary file {}: {source}", path.display())]
    Temp {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// A [`TreeInput`] failed (its own error, e.g. a missing chunk file of an import).
    #[error(transparent)]
    Source(Box<dyn std::error::Error + Send + Sync>),
    /// Another stage failed first; only seen if that error was lost.
    #[error("generate stopped after an earlier error")]
    Aborted,
    #[error("internal error: {0}")]
    Internal(String),
}

/// A private scratch directory for the catalog and the chunk spill file, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self, GenerateError> {
        use std::os::unix::fs::DirBuilderExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "horcrux-generate-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| GenerateError::Temp {
                path: path.clone(),
                source,
            })?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check_sizes(chunk_size: u64, block_size: u32) -> Result<(), GenerateError> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(FormatError::BadChunkSize(chunk_size.to_string()).into());
    }
    if !block_size.is_power_of_two() || block_size < 1024 || block_size as u64 > chunk_size {
        return Err(GenerateError::BadBlockSize(block_size));
    }
    Ok(())
}

/// Chunk uploads in flight: up to 4, but no more than ~256 MiB of chunk data waiting on them.
fn uploads_in_flight(chunk_size: u64) -> usize {
    ((256u64 << 20) / chunk_size).clamp(1, 4) as usize
}

/// Generate volume `opts.name` from `opts.input` into `repo`, as its first commit on branch
/// `main`.
///
/// Blocking; call it from a thread that is not a tokio runtime worker. Store operations run on
/// `runtime`.
pub fn generate(
    opts: &GenerateOptions,
    repo: &Repository,
    runtime: &tokio::runtime::Handle,
    progress: &dyn Progress,
) -> Result<GenerateReport, GenerateError> {
    format::check_volume_name(&opts.name)?;
    check_sizes(opts.chunk_size, opts.block_size)?;
    check_input(&opts.input)?;
    run(opts, Source::Dir(&opts.input), repo, runtime, progress)
}

/// Like [`generate`], from a [`TreeInput`] instead of a directory (`opts.input` is ignored):
/// the same layout, pipeline and first commit. Nothing is materialized on local disk besides
/// the catalog.
pub fn generate_from(
    opts: &GenerateOptions,
    input: std::sync::Arc<dyn TreeInput>,
    repo: &Repository,
    runtime: &tokio::runtime::Handle,
    progress: &dyn Progress,
) -> Result<GenerateReport, GenerateError> {
    format::check_volume_name(&opts.name)?;
    check_sizes(opts.chunk_size, opts.block_size)?;
    run(opts, Source::Stream(input), repo, runtime, progress)
}

/// What the planner walks.
enum Source<'a> {
    Dir(&'a Path),
    Stream(std::sync::Arc<dyn TreeInput>),
}

fn run(
    opts: &GenerateOptions,
    source: Source<'_>,
    repo: &Repository,
    runtime: &tokio::runtime::Handle,
    progress: &dyn Progress,
) -> Result<GenerateReport, GenerateError> {
    let store = repo.store().clone();
    if runtime.block_on(repo.volumes())?.contains(&opts.name) {
        return Err(GenerateError::VolumeExists {
            store: store.describe(),
            name: opts.name.clone(),
        });
    }
    let workers = match opts.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };

    let scratch = ScratchDir::new()?;
    let catalog = scratch.0.join("catalog.sqlite");
    let mut writer = ManifestWriter::create(
        &catalog,
        &CatalogHeader {
            volume: opts.name.clone(),
            chunk_size: opts.chunk_size,
            block_size: opts.block_size,
        },
    )?;
    let (total_bytes, total_files) = match &source {
        Source::Dir(dir) if progress.wants_totals() => plan::scan_totals(dir),
        Source::Dir(_) => (0, 0),
        Source::Stream(input) => input.totals(),
    };
    progress.start(total_bytes, total_files);

    let uploaders = uploads_in_flight(opts.chunk_size);
    let pipeline = Pipeline::new(
        PipelineConfig {
            chunk_size: opts.chunk_size,
            block_size: opts.block_size,
            workers,
            uploaders,
        },
        store.clone(),
        runtime,
        progress,
        &scratch.0.join("chunks.spill"),
    )?;
    // Threads exit when their queue's senders are gone: workers when the planner returns,
    // uploaders when the last worker has.
    let (tasks_tx, tasks_rx) = sync_channel(workers);
    let (uploads_tx, uploads_rx) = sync_channel(uploaders);
    let (tasks_rx, uploads_rx) = (Mutex::new(tasks_rx), Mutex::new(uploads_rx));
    let planned = std::thread::scope(|s| {
        let (pipeline, tasks_rx, uploads_rx) = (&pipeline, &tasks_rx, &uploads_rx);
        for i in 0..uploaders {
            std::thread::Builder::new()
                .name(format!("generate-up-{i}"))
                .spawn_scoped(s, move || pipeline.uploader(uploads_rx))
                .expect("spawn generate uploader");
        }
        for i in 0..workers {
            let uploads_tx = uploads_tx.clone();
            std::thread::Builder::new()
                .name(format!("generate-{i}"))
                .spawn_scoped(s, move || pipeline.worker(tasks_rx, uploads_tx))
                .expect("spawn generate worker");
        }
        drop(uploads_tx);
        let r = match source {
            Source::Dir(dir) => Planner::new(
                &mut writer,
                opts.chunk_size,
                opts.block_size,
                tasks_tx,
                pipeline.failure(),
                progress,
            )
            .run(dir),
            Source::Stream(input) => stream::StreamPlanner::new(
                &mut writer,
                input,
                opts.chunk_size,
                opts.block_size,
                tasks_tx,
                pipeline.failure(),
                progress,
            )
            .run(),
        };
        if let Err(e) = &r {
            if !matches!(e, GenerateError::Aborted) {
                // Stop the workers early; the planner's own error is the one to report.
                pipeline.failure().set(GenerateError::Aborted);
            }
        }
        r
    });
    // Every thread has ended here, even after an error: nothing runs once we return.
    drop((tasks_rx, uploads_rx));
    let finished = pipeline.finish();
    let stats = match planned {
        Ok(stats) => stats,
        Err(GenerateError::Aborted) => {
            return Err(finished.err().unwrap_or(GenerateError::Aborted));
        }
        Err(e) => return Err(e),
    };
    let (mut spill, written) = finished?;
    if spill.count() != stats.chunks {
        return Err(GenerateError::Internal(format!(
            "{} chunks planned, {} hashed",
            stats.chunks,
            spill.count()
        )));
    }
    let spill_err = |source| GenerateError::Temp {
        path: scratch.0.join("chunks.spill"),
        source,
    };
    while let Some(chunk) = spill.next_chunk().map_err(spill_err)? {
        writer.add_chunk(&chunk)?;
    }
    drop(spill);
    let manifest = writer.finish()?;

    // Streamed from the temp file: a 1M-file catalog is ~120 MB, not to be held in memory.
    let key = manifest_key(&manifest);
    let exists = runtime.block_on(store.exists(std::slice::from_ref(&key)))?;
    if !exists[0] {
        let mut attempt = 0;
        loop {
            match runtime.block_on(store.put_file(&key, &catalog)) {
                Ok(()) => break,
                Err(e) if attempt < 2 => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "uploading the manifest failed; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(500 << attempt));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let commit = Commit {
        version: FORMAT_VERSION,
        volume: opts.name.clone(),
        manifest: manifest.to_hex(),
        parents: Vec::new(),
        author: opts.author.clone(),
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
        message: opts.message.clone(),
        stats: CommitStats {
            files: stats.files,
            bytes: stats.bytes,
            chunks: stats.chunks,
        },
    };
    let commit_id = runtime.block_on(repo.put_commit(&commit))?;
    match runtime.block_on(repo.set_branch(&opts.name, "main", None, commit_id)) {
        Ok(()) => {}
        // Someone created the volume while we worked: theirs stays.
        Err(RepoError::Store(StoreError::CasConflict { .. })) => {
            return Err(GenerateError::VolumeExists {
                store: store.describe(),
                name: opts.name.clone(),
            });
        }
        Err(e) => return Err(e.into()),
    }
    progress.finish();
    tracing::debug!(
        volume = %opts.name,
        manifest = %manifest,
        commit = %commit_id,
        files = stats.files,
        dirs = stats.dirs,
        others = stats.others,
        bytes = stats.bytes,
        chunks = stats.chunks,
        chunks_written = written.chunks,
        "generated"
    );
    Ok(GenerateReport {
        commit: commit_id,
        manifest,
        files: stats.files,
        dirs: stats.dirs,
        bytes: stats.bytes,
        chunks: stats.chunks,
        chunks_written: written.chunks,
        bytes_written: written.bytes,
    })
}

/// The input must be a directory we can open (a symlink to one is accepted).
fn check_input(input: &Path) -> Result<(), GenerateError> {
    let err = |source| GenerateError::Input {
        path: input.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(input).map_err(err)?;
    if !meta.is_dir() {
        return Err(GenerateError::NotADirectory {
            path: input.to_path_buf(),
        });
    }
    std::fs::read_dir(input).map_err(err)?;
    Ok(())
}
