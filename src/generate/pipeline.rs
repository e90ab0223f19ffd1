//! The content pipeline: worker threads read and hash chunks, uploader threads store them, and a
//! reorder buffer puts the results back in chunk-index order.
//!
//! ```text
//! planner ──ChunkTask (idx order, bounded queue)──▶ N workers: read + hash
//!                                                     │ ChunkRec ──▶ reorder by idx ──▶ spill file
//!                                                     └ buffer ───▶ U uploaders: exists? put
//! ```
//!
//! All stages are plain threads; uploaders drive the store through `runtime.block_on`, so any
//! runtime flavour works and no async task outlives the run.
//!
//! Memory is bounded by the buffer pool: every chunk's bytes live in one pooled buffer of at most
//! `chunk_size`, taken by a worker before it reads and given back once the upload is done (or
//! found unnecessary). The pool holds `workers + U` buffers, so at most that many chunks are in
//! memory at once. The per-chunk results (id and block hashes, ~32 bytes per MiB of data) are
//! streamed to a spill file in index order, so they do not accumulate in memory either.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use blake3::hazmat::HasherExt;
use bytes::Bytes;

use super::stream::TreeInput;
use super::walk::{self, Stat};
use super::{GenerateError, Progress};
use crate::format::{chunk_key, outboard_key};
use crate::hashtree::{self, BlockHash, PIECE_SIZE, root_of};
use crate::ids::ChunkId;
use crate::manifest::{ChunkInfo, NodeKind};
use crate::store::{Store, StoreError};

/// A regular file at least one block long, opened once by the planner and shared by the tasks of
/// its windows (so every window reads the same inode, even if the path is replaced meanwhile).
#[derive(Debug)]
pub(super) struct OpenFile {
    pub path: PathBuf,
    pub file: File,
    /// Size measured when planning; any other size while reading is an error.
    pub size: u64,
}

/// A run of bytes to append to a chunk.
#[derive(Debug)]
pub(super) enum Piece {
    /// A whole small file (packed), opened by the worker.
    Whole {
        dir: Arc<PathBuf>,
        name: OsString,
        size: u64,
    },
    /// A data region of a large file.
    Range {
        file: Arc<OpenFile>,
        off: u64,
        len: u64,
    },
    /// Bytes of a file of a [`TreeInput`] (not a local directory).
    Input {
        input: Arc<dyn TreeInput>,
        file: u64,
        off: u64,
        len: u64,
    },
}

/// One chunk to build: the concatenation of `pieces`, `len` bytes in all.
#[derive(Debug)]
pub(super) struct ChunkTask {
    pub idx: u64,
    pub len: u64,
    /// File bytes this chunk accounts for in the progress (holes of its window included).
    pub logical: u64,
    pub pieces: Vec<Piece>,
}

/// The first error of any stage; the others see the flag and stop early.
#[derive(Debug, Default)]
pub(super) struct Failure {
    failed: AtomicBool,
    first: Mutex<Option<GenerateError>>,
}

impl Failure {
    pub fn set(&self, e: GenerateError) {
        let mut first = self.first.lock().expect("failure lock");
        if first.is_none() {
            *first = Some(e);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    pub fn take(&self) -> Option<GenerateError> {
        self.first.lock().expect("failure lock").take()
    }
}

/// Fixed set of chunk buffers; `take` blocks while all are in use.
#[derive(Debug)]
pub(super) struct BufferPool {
    state: Mutex<PoolState>,
    cv: Condvar,
    max: usize,
    capacity: usize,
}

#[derive(Debug, Default)]
struct PoolState {
    free: Vec<Vec<u8>>,
    /// Buffers handed out and not yet returned (in a worker or an upload).
    out: usize,
}

impl BufferPool {
    fn take(&self) -> Vec<u8> {
        let mut st = self.state.lock().expect("pool lock");
        loop {
            if let Some(b) = st.free.pop() {
                st.out += 1;
                return b;
            }
            if st.out < self.max {
                st.out += 1;
                return Vec::with_capacity(self.capacity);
            }
            st = self.cv.wait(st).expect("pool lock");
        }
    }

    /// Give a buffer back (`None`: it was lost, e.g. still shared; a new one will be allocated).
    fn give(&self, buf: Option<Vec<u8>>) {
        let mut st = self.state.lock().expect("pool lock");
        st.out -= 1;
        if let Some(mut b) = buf {
            b.clear();
            st.free.push(b);
        }
        self.cv.notify_all();
    }
}

/// A buffer taken from the pool; returned on drop, so an error path cannot leak a slot.
pub(super) struct Lease<'a> {
    pool: &'a BufferPool,
    buf: Option<Vec<u8>>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.pool.give(self.buf.take());
    }
}

/// What the manifest needs of a chunk, kept until it can be written in index order.
#[derive(Debug)]
struct ChunkRec {
    id: ChunkId,
    len: u64,
    blocks: Vec<BlockHash>,
}

/// Reorders chunk results by index and appends them to a spill file.
struct Collector {
    next: u64,
    pending: BTreeMap<u64, ChunkRec>,
    spill: BufWriter<File>,
    path: PathBuf,
}

impl Collector {
    fn insert(&mut self, idx: u64, rec: ChunkRec) -> io::Result<()> {
        self.pending.insert(idx, rec);
        while let Some(rec) = self.pending.remove(&self.next) {
            self.spill.write_all(&rec.len.to_le_bytes())?;
            self.spill.write_all(&rec.id.0)?;
            self.spill
                .write_all(&(rec.blocks.len() as u32).to_le_bytes())?;
            for b in &rec.blocks {
                self.spill.write_all(b)?;
            }
            self.next += 1;
        }
        Ok(())
    }
}

/// Reads the spilled chunk records back, in index order.
pub(super) struct SpillReader {
    r: BufReader<File>,
    idx: u64,
    count: u64,
}

impl SpillReader {
    /// Number of chunks in the file.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn next_chunk(&mut self) -> io::Result<Option<ChunkInfo>> {
        if self.idx == self.count {
            return Ok(None);
        }
        let mut u64b = [0u8; 8];
        self.r.read_exact(&mut u64b)?;
        let len = u64::from_le_bytes(u64b);
        let mut id = [0u8; 32];
        self.r.read_exact(&mut id)?;
        let mut u32b = [0u8; 4];
        self.r.read_exact(&mut u32b)?;
        let n = u32::from_le_bytes(u32b) as usize;
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            let mut b = [0u8; 32];
            self.r.read_exact(&mut b)?;
            blocks.push(b);
        }
        let info = ChunkInfo {
            idx: self.idx,
            id: ChunkId(id),
            len,
            blocks,
        };
        self.idx += 1;
        Ok(Some(info))
    }
}

/// Upload counters.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Written {
    pub chunks: u64,
    pub bytes: u64,
}

/// Parameters of the pipeline.
#[derive(Debug, Clone, Copy)]
pub(super) struct PipelineConfig {
    pub chunk_size: u64,
    pub block_size: u32,
    pub workers: usize,
    /// Uploader threads, hence uploads in flight.
    pub uploaders: usize,
}

/// A hashed chunk on its way to the store, with the buffer slot it occupies.
pub(super) struct UploadJob<'a> {
    id: ChunkId,
    lease: Lease<'a>,
    /// The chunk's piece outboard (FORMAT.md §3a), put after the chunk.
    outboard: Option<Bytes>,
}

/// Everything after planning: reading, hashing, reordering, uploading.
pub(super) struct Pipeline<'a> {
    cfg: PipelineConfig,
    progress: &'a dyn Progress,
    runtime: &'a tokio::runtime::Handle,
    store: Arc<dyn Store>,
    pool: BufferPool,
    failure: Failure,
    collector: Mutex<Collector>,
    spill_path: PathBuf,
    chunks_written: AtomicU64,
    bytes_written: AtomicU64,
}

impl<'a> Pipeline<'a> {
    pub fn new(
        cfg: PipelineConfig,
        store: Arc<dyn Store>,
        runtime: &'a tokio::runtime::Handle,
        progress: &'a dyn Progress,
        spill_path: &Path,
    ) -> Result<Self, GenerateError> {
        let spill = File::create_new(spill_path).map_err(|source| GenerateError::Temp {
            path: spill_path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            cfg,
            progress,
            runtime,
            store,
            pool: BufferPool {
                state: Mutex::new(PoolState::default()),
                cv: Condvar::new(),
                max: cfg.workers + cfg.uploaders,
                capacity: cfg.chunk_size as usize,
            },
            failure: Failure::default(),
            collector: Mutex::new(Collector {
                next: 0,
                pending: BTreeMap::new(),
                spill: BufWriter::with_capacity(1 << 20, spill),
                path: spill_path.to_path_buf(),
            }),
            spill_path: spill_path.to_path_buf(),
            chunks_written: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        })
    }

    pub fn failure(&self) -> &Failure {
        &self.failure
    }

    /// A worker thread: take tasks until the planner hangs up. After a failure it keeps draining
    /// the queue (without reading) so the planner never blocks on a full queue.
    pub fn worker<'p>(
        &'p self,
        tasks: &Mutex<Receiver<ChunkTask>>,
        uploads: SyncSender<UploadJob<'p>>,
    ) {
        loop {
            let task = match tasks.lock().expect("task queue lock").recv() {
                Ok(t) => t,
                Err(_) => return,
            };
            if self.failure.is_set() {
                continue;
            }
            if let Err(e) = self.process(task, &uploads) {
                self.failure.set(e);
            }
        }
    }

    fn process<'p>(
        &'p self,
        task: ChunkTask,
        uploads: &SyncSender<UploadJob<'p>>,
    ) -> Result<(), GenerateError> {
        let mut lease = Lease {
            pool: &self.pool,
            buf: Some(self.pool.take()),
        };
        let buf = lease.buf.as_mut().expect("leased buffer");
        read_task(&task, buf)?;
        debug_assert_eq!(buf.len() as u64, task.len);
        let (id, blocks, outboard) = hash_with_outboard(buf, self.cfg.block_size);
        self.progress.advance(task.logical);
        let rec = ChunkRec {
            id,
            len: task.len,
            blocks,
        };
        self.collector
            .lock()
            .expect("collector lock")
            .insert(task.idx, rec)
            .map_err(|source| GenerateError::Temp {
                path: self.spill_path.clone(),
                source,
            })?;
        // Uploaders only go away after a failure; the error is already recorded then.
        let _ = uploads.send(UploadJob {
            id,
            lease,
            outboard,
        });
        Ok(())
    }

    /// An uploader thread: store each chunk unless the store has it already.
    pub fn uploader(&self, jobs: &Mutex<Receiver<UploadJob<'_>>>) {
        loop {
            let mut job = match jobs.lock().expect("upload queue lock").recv() {
                Ok(j) => j,
                Err(_) => return,
            };
            if self.failure.is_set() {
                continue; // dropping the job frees its buffer
            }
            let data = Bytes::from(job.lease.buf.take().expect("leased buffer"));
            let len = data.len() as u64;
            match put_missing(self.runtime, &*self.store, &chunk_key(&job.id), data) {
                Ok((written, data)) => {
                    if written {
                        self.chunks_written.fetch_add(1, Ordering::Relaxed);
                        self.bytes_written.fetch_add(len, Ordering::Relaxed);
                    }
                    // Reuses the allocation when the store kept no reference to the bytes.
                    job.lease.buf = Some(Vec::from(data));
                }
                Err(e) => {
                    self.failure.set(GenerateError::Store(e));
                    continue;
                }
            }
            // After the chunk: an outboard never names a chunk the store does not have.
            if let Some(ob) = job.outboard.take() {
                if let Err(e) = put_missing(self.runtime, &*self.store, &outboard_key(&job.id), ob)
                {
                    self.failure.set(GenerateError::Store(e));
                }
            }
        }
    }

    /// After all threads are joined: the first error, or the spill file of chunk records.
    pub fn finish(self) -> Result<(SpillReader, Written), GenerateError> {
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        let c = self.collector.into_inner().expect("collector lock");
        let temp = |source| GenerateError::Temp {
            path: c.path.clone(),
            source,
        };
        if !c.pending.is_empty() {
            return Err(GenerateError::Internal(format!(
                "chunk {} was never hashed",
                c.next
            )));
        }
        let file = c.spill.into_inner().map_err(|e| temp(e.into_error()))?;
        drop(file);
        let file = File::open(&c.path).map_err(temp)?;
        Ok((
            SpillReader {
                r: BufReader::with_capacity(1 << 20, file),
                idx: 0,
                count: c.next,
            },
            Written {
                chunks: self.chunks_written.load(Ordering::Relaxed),
                bytes: self.bytes_written.load(Ordering::Relaxed),
            },
        ))
    }
}

/// Read the bytes of a chunk into `buf` (empty on entry).
pub(super) fn read_task(task: &ChunkTask, buf: &mut Vec<u8>) -> Result<(), GenerateError> {
    let is_whole = |p: &Piece| matches!(p, Piece::Whole { .. });
    if task.pieces.len() >= PARALLEL_MIN_FILES && task.pieces.iter().all(is_whole) {
        return read_pack(task, buf);
    }
    buf.reserve(task.len as usize);
    let mut last: Option<&Arc<OpenFile>> = None;
    for piece in &task.pieces {
        match piece {
            Piece::Whole { dir, name, size } => {
                let start = buf.len();
                buf.resize(start + *size as usize, 0);
                read_whole(&dir.join(name), *size, &mut buf[start..])?;
            }
            Piece::Range { file, off, len } => {
                let n = walk::pread_append(&file.file, buf, *off, *len as usize)
                    .map_err(|source| unreadable(&file.path, source))?;
                if n as u64 != *len {
                    return Err(changed(&file.path, "it shrank"));
                }
                if last.is_some_and(|l| !Arc::ptr_eq(l, file)) {
                    check_size(last.expect("checked"))?;
                }
                last = Some(file);
            }
            Piece::Input {
                input,
                file,
                off,
                len,
            } => {
                let before = buf.len();
                input.read(*file, *off, *len, buf)?;
                if (buf.len() - before) as u64 != *len {
                    return Err(GenerateError::Internal(format!(
                        "the input gave {} bytes instead of {len}",
                        buf.len() - before
                    )));
                }
            }
        }
    }
    if let Some(f) = last {
        check_size(f)?;
    }
    Ok(())
}

/// Packs of at least this many small files are read by several threads at once.
const PARALLEL_MIN_FILES: usize = 32;

/// Read a pack of small files into `buf` (empty on entry). Each file costs an open and, cold, a
/// disk request or two and almost no CPU, so they are read [`walk::IO_THREADS`] at a time, each
/// straight into its own place in the buffer. The first failing file in pack order is reported,
/// as a sequential read would.
fn read_pack(task: &ChunkTask, buf: &mut Vec<u8>) -> Result<(), GenerateError> {
    buf.clear();
    buf.resize(task.len as usize, 0);
    let mut rest: &mut [u8] = buf;
    let mut jobs = Vec::with_capacity(task.pieces.len());
    for piece in &task.pieces {
        let Piece::Whole { dir, name, size } = piece else {
            return Err(GenerateError::Internal(
                "a pack holds whole files only".into(),
            ));
        };
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(*size as usize);
        rest = tail;
        // Each slot is locked once, by the one thread that reads its file.
        jobs.push((dir, name, *size, Mutex::new(mine)));
    }
    walk::par_map(&jobs, |(dir, name, size, slot)| {
        let mut out = slot.lock().expect("pack slot");
        read_whole(&dir.join(name), *size, &mut out)
    })
    .into_iter()
    .collect()
}

/// After reading a large file's window: its size must not have changed since planning.
fn check_size(f: &OpenFile) -> Result<(), GenerateError> {
    let st = walk::fstat(&f.file).map_err(|source| unreadable(&f.path, source))?;
    if st.size != f.size {
        return Err(changed(
            &f.path,
            &format!("its size went from {} to {} bytes", f.size, st.size),
        ));
    }
    Ok(())
}

/// Read a whole small file of `size` bytes (as planned) into `out` (`size` bytes long).
fn read_whole(path: &Path, size: u64, out: &mut [u8]) -> Result<(), GenerateError> {
    let file = walk::open_file(path).map_err(|source| match source.raw_os_error() {
        Some(libc::ENOENT) => changed(path, "it was removed"),
        Some(libc::ELOOP) => changed(path, "it was replaced by a symlink"),
        _ => unreadable(path, source),
    })?;
    let st: Stat = walk::fstat(&file).map_err(|source| unreadable(path, source))?;
    if st.kind != NodeKind::File {
        return Err(changed(path, "it is no longer a regular file"));
    }
    if st.size != size {
        return Err(changed(
            path,
            &format!("its size went from {size} to {} bytes", st.size),
        ));
    }
    let n = walk::pread_into(&file, out, 0).map_err(|source| unreadable(path, source))?;
    if n as u64 != size {
        return Err(changed(path, "it shrank"));
    }
    if walk::has_byte_at(&file, size).map_err(|source| unreadable(path, source))? {
        return Err(changed(path, "it grew"));
    }
    Ok(())
}

fn unreadable(path: &Path, source: io::Error) -> GenerateError {
    GenerateError::Unreadable {
        path: path.to_path_buf(),
        source,
    }
}

fn changed(path: &Path, what: &str) -> GenerateError {
    GenerateError::Changed {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

/// Chunk id, block hashes and, for chunks of more than one piece, the piece outboard, in one
/// pass over the data (two with blocks smaller than a piece).
pub(super) fn hash_with_outboard(
    data: &[u8],
    block_size: u32,
) -> (ChunkId, Vec<BlockHash>, Option<Bytes>) {
    if data.len() as u64 > PIECE_SIZE as u64 && block_size >= PIECE_SIZE {
        let (id, blocks, pieces) = hashtree::hash_pieces(data, block_size);
        let ob = Bytes::from(hashtree::encode_piece_outboard(&pieces));
        return (id, blocks, Some(ob));
    }
    if hashtree::has_piece_outboard(data.len() as u64) {
        // Blocks smaller than a piece: pieces and blocks are hashed apart (rare).
        let (id, blocks, ob) = hashtree::hash_chunk_with_outboard(data, block_size);
        return (id, blocks, ob.map(Bytes::from));
    }
    let (id, blocks) = hash_blocks(data, block_size);
    (id, blocks, None)
}

/// Chunk id and block hashes in one pass over the data: each block's chaining value is computed
/// once and the id is merged from them (same result as `hashtree::hash_chunk`, half the work).
pub(super) fn hash_blocks(data: &[u8], block_size: u32) -> (ChunkId, Vec<BlockHash>) {
    let len = data.len() as u64;
    if len <= block_size as u64 {
        // One block: its hash is the chunk id itself.
        let h = *blake3::hash(data).as_bytes();
        return (ChunkId(h), vec![h]);
    }
    let blocks: Vec<BlockHash> = data
        .chunks(block_size as usize)
        .enumerate()
        .map(|(i, b)| {
            let mut h = blake3::Hasher::new();
            h.set_input_offset(i as u64 * block_size as u64);
            h.update(b);
            h.finalize_non_root()
        })
        .collect();
    let id = root_of(&blocks, len, block_size).expect("one hash per block");
    (id, blocks)
}

/// Store `data` under `key` unless it is there already; 3 attempts with backoff. Blocking: each
/// attempt runs through `runtime.block_on`. Returns whether it was written, and the bytes back
/// (so the buffer can be reused).
pub(super) fn put_missing(
    runtime: &tokio::runtime::Handle,
    store: &dyn Store,
    key: &str,
    data: Bytes,
) -> Result<(bool, Bytes), StoreError> {
    const ATTEMPTS: u32 = 3;
    let keys = [key.to_string()];
    let mut attempt = 1;
    loop {
        let r = runtime.block_on(async {
            if store.exists(&keys).await?.first().copied().unwrap_or(false) {
                return Ok(false);
            }
            store.put(key, data.clone()).await.map(|()| true)
        });
        match r {
            Ok(written) => return Ok((written, data)),
            Err(e) if attempt < ATTEMPTS => {
                let wait = Duration::from_millis(200 * 4u64.pow(attempt - 1));
                tracing::warn!(key, attempt, error = %e, "upload failed; retrying in {wait:?}");
                std::thread::sleep(wait);
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
