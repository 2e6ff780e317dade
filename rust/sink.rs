//! Where the body goes. Connections copy network bytes into page-aligned blocks
//! tagged with their file offset; three threads take it from there:
//!
//! - the writer writes each block at its offset, records the range as written,
//!   and every so often checkpoints (fdatasync, then the sidecar names the ranges);
//! - the SHA-256 stage hashes the file *in order*: a block at the hashed frontier
//!   is hashed at once, blocks ahead of it wait in memory up to a budget, and
//!   anything else (blocks past the budget, data kept from an earlier attempt)
//!   is read back from the part file when the frontier reaches it;
//! - the XXH3 stage follows the same in-order stream and returns the blocks.
//!
//! So one connection streams straight through, parallel connections need no
//! second read while they stay near the frontier, and a resumed file's kept
//! prefix is re-hashed from disk while the rest downloads.
//!
//! When a stage fails (a full disk, an I/O error, a panic), its error is kept in
//! a slot shared by the whole sink *before* its queue closes; whoever then finds
//! a queue closed (a connection, the writer, `finish`, `abort`) reports that
//! error, never a vague "a stage stopped".

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::buffer::{self, Block, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::guard::Guard;
use crate::hash::{Sha256Hasher, Xxh3Hasher};
use crate::panics;
use crate::part::{PartFile, Sidecar};
use crate::ranges::RangeSet;

/// Blocks queued between stages.
const QUEUE: usize = 4;
/// Checkpoint after this many newly written bytes...
const CHECKPOINT_BYTES: u64 = 32 << 20;
/// ...or this much time, whichever comes first (a SIGKILL loses at most about this).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
/// A slow connection hands over a partly filled block after this long, so that
/// checkpoints keep up with it too.
const HAND_OFF_AFTER: Duration = Duration::from_millis(50);

/// The written part file and the digests of its bytes `[0, len)`, in order.
#[derive(Debug)]
pub struct SinkOutput {
    pub part: PartFile,
    pub len: u64,
    pub xxh3_128: String,
    pub sha256: Option<String>,
}

/// Where and how often the writer records its progress for a later resume.
pub struct Checkpoint {
    pub sidecar: Sidecar,
    pub path: PathBuf,
}

type Job = (Block, u64);

/// The first error of any stage, recorded before that stage's queue closes.
#[derive(Default)]
struct FirstError(Mutex<Option<Error>>);

impl FirstError {
    fn record(&self, error: &Error) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(error.clone());
        }
    }

    fn get(&self) -> Option<Error> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The error of the stage that stopped (`stage` names it if none was recorded).
    fn stopped(&self, stage: &str) -> Error {
        self.get().unwrap_or_else(|| stage_stopped(stage))
    }
}

/// The running stages of one transfer.
pub struct Sink {
    input: mpsc::Sender<Job>,
    written: Arc<Mutex<RangeSet>>,
    stop: Arc<AtomicBool>,
    failed: Arc<FirstError>,
    writer: oneshot::Receiver<Result<PartFile>>,
    hasher: oneshot::Receiver<Result<(u64, Option<String>)>>,
    xxh: oneshot::Receiver<Result<String>>,
}

impl Sink {
    /// Starts the stages for `part`, whose ranges in `kept` already hold data
    /// (re-hashed from disk as the frontier reaches them). `memory_blocks` bounds
    /// the blocks held ahead of the frontier.
    pub fn start(
        part: PartFile,
        kept: RangeSet,
        with_sha256: bool,
        memory_blocks: usize,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Self> {
        let path = part.path().to_path_buf();
        let reader = File::open(&path).map_err(|e| Error::storage("opening", &path, e))?;
        let written = Arc::new(Mutex::new(kept.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(FirstError::default());
        let (input, writer_rx) = mpsc::channel::<Job>(QUEUE);
        let (hasher_tx, hasher_rx) = mpsc::channel::<Job>(QUEUE);
        let (xxh_tx, xxh_rx) = mpsc::channel::<Block>(QUEUE);
        // If a later stage cannot start, `input` is dropped with this function's
        // frame, and the stages already running end on their closed queues.
        let writer = {
            let written = Arc::clone(&written);
            let stop = Arc::clone(&stop);
            let seen = Arc::clone(&failed);
            spawn_stage("writer", writer_rx, &failed, move |input| {
                let mut writer = Writer {
                    part,
                    output: hasher_tx,
                    checkpoint,
                };
                writer.run(input, &written, &stop, &seen)?;
                Ok(writer.part)
            })?
        };
        let hasher = {
            let stop = Arc::clone(&stop);
            let order = InOrder {
                reader,
                path,
                frontier: 0,
                pending: BTreeMap::new(),
                on_disk: kept,
                memory_blocks,
                sha: with_sha256.then(Sha256Hasher::default),
                output: xxh_tx,
                stop,
            };
            spawn_stage("sha256", hasher_rx, &failed, move |input| order.run(input))?
        };
        let xxh = spawn_stage("xxh3", xxh_rx, &failed, |input| Ok(hash_xxh3(input)))?;
        Ok(Self {
            input,
            written,
            stop,
            failed,
            writer,
            hasher,
            xxh,
        })
    }

    /// A writer for one connection's bytes, starting at file offset `offset`.
    pub fn stream(&self, offset: u64) -> RangeStream {
        RangeStream {
            input: self.input.clone(),
            failed: Arc::clone(&self.failed),
            current: None,
            offset,
            opened: Instant::now(),
        }
    }

    /// Waits for every stage once all streams are closed; the digests cover the
    /// contiguous data from offset 0.
    pub async fn finish(self) -> Result<SinkOutput> {
        let Sink {
            input,
            failed,
            writer,
            hasher,
            xxh,
            ..
        } = self;
        drop(input);
        let part = writer.await.map_err(|_| failed.stopped("writer"))??;
        let (len, sha256) = hasher.await.map_err(|_| failed.stopped("sha256"))??;
        let xxh3_128 = xxh.await.map_err(|_| failed.stopped("xxh3"))??;
        // A stage can fail after handing on what it had (the SHA-256 stage after
        // the writer finished, say): the first failure still wins.
        if let Some(error) = failed.get() {
            return Err(error);
        }
        Ok(SinkOutput {
            part,
            len,
            xxh3_128,
            sha256,
        })
    }

    /// Stops hashing, writes what the streams handed over, and returns the part
    /// file (if the writer survived) with the ranges that are on disk, and the
    /// error to report: a stage's own failure wins over `error`, what the
    /// connections saw (a closed queue, or a network error racing a full disk).
    pub async fn abort(self, error: Error) -> (Option<PartFile>, RangeSet, Error) {
        self.stop.store(true, Ordering::Relaxed);
        let Sink {
            input,
            written,
            failed,
            writer,
            hasher,
            ..
        } = self;
        drop(input);
        let part = writer.await.ok().and_then(Result::ok);
        let _ = hasher.await;
        let written = written.lock().map(|w| w.clone()).unwrap_or_default();
        (part, written, failed.get().unwrap_or(error))
    }
}

/// One connection's bytes, cut into blocks that end on `BLOCK_SIZE` boundaries
/// of the file (so writes stay aligned for `O_DIRECT`).
pub struct RangeStream {
    input: mpsc::Sender<Job>,
    failed: Arc<FirstError>,
    current: Option<Block>,
    /// File offset of the current block's first byte.
    offset: u64,
    /// When the current block got its first byte.
    opened: Instant,
}

impl RangeStream {
    /// File offset of the next byte.
    pub fn position(&self) -> u64 {
        self.offset + self.current.as_ref().map_or(0, |b| b.len() as u64)
    }

    pub async fn push(&mut self, mut data: &[u8], guard: &Guard) -> Result<()> {
        while !data.is_empty() {
            let room = BLOCK_SIZE - (self.position() % BLOCK_SIZE as u64) as usize;
            if self.current.is_none() {
                self.current = Some(Block::take());
                self.opened = Instant::now();
            }
            let block = self.current.as_mut().expect("just set");
            let taken = block.fill_from(&data[..data.len().min(room)]);
            data = &data[taken..];
            let full = self.position() % BLOCK_SIZE as u64 == 0;
            if full || self.opened.elapsed() >= HAND_OFF_AFTER {
                self.hand_off(guard).await?;
            }
        }
        Ok(())
    }

    /// Hands over a partly filled block (at the end of a range, or before giving
    /// up). Not cancellable: after a cancel, this is what keeps the bytes that
    /// arrived for the resume; the writer is always draining its queue.
    pub async fn flush(&mut self) -> Result<()> {
        let Some(block) = self.current.take().filter(|b| !b.is_empty()) else {
            return Ok(());
        };
        let offset = self.offset;
        self.offset += block.len() as u64;
        self.input
            .send((block, offset))
            .await
            .map_err(|_| self.failed.stopped("writer"))
    }

    async fn hand_off(&mut self, guard: &Guard) -> Result<()> {
        let Some(block) = self.current.take() else {
            return Ok(());
        };
        let len = block.len() as u64;
        let offset = self.offset;
        self.offset += len;
        if guard.wait(self.input.send((block, offset))).await?.is_err() {
            return Err(self.failed.stopped("writer"));
        }
        Ok(())
    }
}

impl Drop for RangeStream {
    fn drop(&mut self) {
        if let Some(block) = self.current.take() {
            buffer::recycle(block);
        }
    }
}

/// A pipeline thread ended without recording an error: a bug.
fn stage_stopped(stage: &str) -> Error {
    Error::internal(&format!("the {stage} thread stopped unexpectedly"))
}

/// Runs one pipeline stage on its own thread, reading `input`; its result
/// arrives on the receiver. A failure (an error or a panic) is recorded in
/// `failed` *before* `input` is dropped, so that whoever finds the queue closed
/// finds the reason too. Fails, instead of panicking, when the thread cannot
/// be started (EAGAIN: too many threads, or no memory for its stack).
fn spawn_stage<I: Send + 'static, T: Send + 'static>(
    stage: &'static str,
    mut input: I,
    failed: &Arc<FirstError>,
    work: impl FnOnce(&mut I) -> Result<T> + Send + 'static,
) -> Result<oneshot::Receiver<Result<T>>> {
    let (done_tx, done_rx) = oneshot::channel();
    let failed = Arc::clone(failed);
    thread::Builder::new()
        .name(format!("surefetch-{stage}"))
        .spawn(move || {
            let result = panics::catch(&format!("the {stage} thread"), || work(&mut input));
            if let Err(error) = &result {
                failed.record(error);
            }
            drop(input);
            let _ = done_tx.send(result);
        })
        .map_err(|source| Error::System {
            what: "start a pipeline thread",
            source,
        })?;
    Ok(done_rx)
}

/// The writer stage: writes blocks at their offsets, records them as written,
/// hands them on to hashing, and checkpoints.
struct Writer {
    part: PartFile,
    output: mpsc::Sender<Job>,
    checkpoint: Option<Checkpoint>,
}

impl Writer {
    fn run(
        &mut self,
        input: &mut mpsc::Receiver<Job>,
        written: &Mutex<RangeSet>,
        stop: &AtomicBool,
        failed: &FirstError,
    ) -> Result<()> {
        let mut since_checkpoint = 0u64;
        let mut last_checkpoint = Instant::now();
        while let Some((block, offset)) = input.blocking_recv() {
            let len = block.len() as u64;
            if let Err(e) = self.part.write_at(block.as_slice(), offset) {
                buffer::recycle(block);
                return Err(e);
            }
            if let Ok(mut written) = written.lock() {
                written.insert(offset..offset + len);
            }
            if let Err(returned) = self.output.blocking_send((block, offset)) {
                buffer::recycle(returned.0 .0);
                // Hashing stopped: the transfer cannot finish, so stop taking its
                // bytes (unless it is being aborted and only kept for a resume).
                if !stop.load(Ordering::Relaxed) {
                    return Err(failed.stopped("sha256"));
                }
            }
            since_checkpoint += len;
            if since_checkpoint >= CHECKPOINT_BYTES || last_checkpoint.elapsed() >= CHECKPOINT_EVERY
            {
                if let Some(checkpoint) = self.checkpoint.as_mut() {
                    let ranges = written.lock().map(|w| w.clone()).unwrap_or_default();
                    record(&self.part, checkpoint, &ranges)?;
                }
                since_checkpoint = 0;
                last_checkpoint = Instant::now();
            }
        }
        Ok(())
    }
}

/// Makes the data durable, then lets the sidecar claim it: a sidecar never names
/// bytes that a power cut could lose. (The sidecar itself need not be synced: a
/// lost or torn one only means starting over.)
pub fn record(part: &PartFile, checkpoint: &mut Checkpoint, ranges: &RangeSet) -> Result<()> {
    part.sync_data()?;
    checkpoint.sidecar.ranges_done = ranges.to_pairs();
    checkpoint
        .sidecar
        .store(&checkpoint.path, false)
        .map_err(|e| Error::storage("writing", &checkpoint.path, e))
}

/// The SHA-256 stage: puts blocks back in file order (see the module doc).
struct InOrder {
    reader: File,
    path: PathBuf,
    frontier: u64,
    /// Blocks ahead of the frontier, by offset.
    pending: BTreeMap<u64, Block>,
    /// Written data that is not in `pending`: read back when the frontier gets there.
    on_disk: RangeSet,
    memory_blocks: usize,
    sha: Option<Sha256Hasher>,
    output: mpsc::Sender<Block>,
    stop: Arc<AtomicBool>,
}

impl InOrder {
    fn run(mut self, input: &mut mpsc::Receiver<Job>) -> Result<(u64, Option<String>)> {
        loop {
            self.advance()?;
            let Some((block, offset)) = input.blocking_recv() else {
                break;
            };
            if self.stop.load(Ordering::Relaxed) {
                buffer::recycle(block);
            } else if offset == self.frontier || self.pending.len() < self.memory_blocks {
                self.pending.insert(offset, block);
            } else {
                self.on_disk.insert(offset..offset + block.len() as u64);
                buffer::recycle(block);
            }
        }
        self.advance()?;
        for (_, block) in std::mem::take(&mut self.pending) {
            buffer::recycle(block);
        }
        Ok((self.frontier, self.sha.map(Sha256Hasher::finish_hex)))
    }

    /// Hashes everything that is contiguous with the frontier.
    fn advance(&mut self) -> Result<()> {
        while !self.stop.load(Ordering::Relaxed) {
            let block = match self.pending.remove(&self.frontier) {
                Some(block) => block,
                None => match self.read_back()? {
                    Some(block) => block,
                    None => return Ok(()),
                },
            };
            self.frontier += block.len() as u64;
            if let Some(sha) = self.sha.as_mut() {
                sha.update(block.as_slice());
            }
            if let Err(returned) = self.output.blocking_send(block) {
                buffer::recycle(returned.0);
            }
        }
        Ok(())
    }

    /// The next block at the frontier from the part file, if it is on disk there.
    fn read_back(&mut self) -> Result<Option<Block>> {
        let Some(end) = self.on_disk.covered_until(self.frontier) else {
            return Ok(None);
        };
        let next_pending = self.pending.keys().next().copied().unwrap_or(u64::MAX);
        let end = end.min(next_pending);
        let room = BLOCK_SIZE as u64 - self.frontier % BLOCK_SIZE as u64;
        let want = (end - self.frontier).min(room) as usize;
        let mut block = Block::take();
        let mut reader = OffsetReader {
            file: &self.reader,
            offset: self.frontier,
        };
        while block.len() < want {
            match block.read_from(&mut reader, want - block.len()) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    buffer::recycle(block);
                    return Err(Error::storage("reading back", self.path(), e));
                }
            }
        }
        if block.len() < want {
            buffer::recycle(block);
            return Err(Error::storage(
                "reading back",
                self.path(),
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        Ok(Some(block))
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a file from a moving offset with `pread` (the descriptor has no position).
struct OffsetReader<'a> {
    file: &'a File,
    offset: u64,
}

impl std::io::Read for OffsetReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

fn hash_xxh3(input: &mut mpsc::Receiver<Block>) -> String {
    let mut xxh = Xxh3Hasher::default();
    while let Some(block) = input.blocking_recv() {
        xxh.update(block.as_slice());
        buffer::recycle(block);
    }
    xxh.finish_hex()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cancel::CancelToken;

    fn sidecar() -> Sidecar {
        Sidecar {
            version: Sidecar::VERSION,
            url: "http://h/x".into(),
            etag: Some("\"e\"".into()),
            last_modified: None,
            size: None,
            ranges_done: Vec::new(),
        }
    }

    /// Pushes blocks (pausing past the checkpoint interval) until the sink refuses one.
    async fn push_until_refused(stream: &mut RangeStream) -> Error {
        let guard = Guard::new(CancelToken::new(), None, None);
        let data = vec![7u8; BLOCK_SIZE];
        for _ in 0..200 {
            if let Err(e) = stream.push(&data, &guard).await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the sink never refused a block");
    }

    #[tokio::test]
    async fn a_failed_checkpoint_is_the_error_every_stream_and_abort_see() {
        let dir = tempfile::tempdir().unwrap();
        let part = PartFile::create(&dir.path().join("x.part"), None, false).unwrap();
        let checkpoint = Checkpoint {
            sidecar: sidecar(),
            path: dir.path().join("gone").join("x.part.json"),
        };
        let sink = Sink::start(part, RangeSet::new(), true, 4, Some(checkpoint)).unwrap();
        let mut first = sink.stream(0);
        let err = push_until_refused(&mut first).await;
        let Error::Storage { path, source, .. } = &err else {
            panic!("not the writer's error: {err}");
        };
        assert!(path.ends_with("gone/x.part.json"), "{err}");
        assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{err}");
        // A stream that comes later finds the same error, not "a stage stopped".
        let mut later = sink.stream(64 << 20);
        let again = push_until_refused(&mut later).await;
        assert!(matches!(again, Error::Storage { .. }), "{again}");
        drop((first, later));
        let (part, _, reported) = sink.abort(Error::network("cut", true)).await;
        assert!(part.is_none());
        assert!(matches!(reported, Error::Storage { .. }), "{reported}");
    }

    #[tokio::test]
    async fn a_failed_read_back_stops_the_writer_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let part = PartFile::create(&dir.path().join("x.part"), None, false).unwrap();
        // The kept range claims bytes the (empty) part file does not hold.
        let mut kept = RangeSet::new();
        kept.insert(0..BLOCK_SIZE as u64);
        let sink = Sink::start(part, kept, true, 4, None).unwrap();
        // Before the writer extends the file: a hole would read back as zeros.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut stream = sink.stream(BLOCK_SIZE as u64);
        let err = push_until_refused(&mut stream).await;
        assert!(err.to_string().starts_with("reading back"), "{err}");
        drop(stream);
        let finished = sink.finish().await.unwrap_err();
        assert!(
            finished.to_string().starts_with("reading back"),
            "{finished}"
        );
    }
}
