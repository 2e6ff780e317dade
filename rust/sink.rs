//! Where the body goes: network bytes are copied into page-aligned blocks, and
//! each block flows through SHA-256 (its own thread) and then XXH3 + a positional
//! write (the writer thread), overlapping hashing and writing with network reads.
//! Bodies that fit in one block skip the threads.

use std::thread;

use tokio::sync::{mpsc, oneshot};

use crate::buffer::{self, Block};
use crate::error::{Error, Result};
use crate::guard::Guard;
use crate::hash::{Sha256Hasher, Xxh3Hasher};
use crate::part::PartFile;

/// Blocks in flight per transfer: bounds memory to `MAX_BLOCKS * BLOCK_SIZE`.
const MAX_BLOCKS: usize = 8;

/// The written part file with the digests of everything written to it.
#[derive(Debug)]
pub struct SinkOutput {
    pub part: PartFile,
    pub len: u64,
    pub xxh3_128: String,
    pub sha256: Option<String>,
}

type Job = (Block, u64);
type WriterResult = Result<(PartFile, Xxh3Hasher, u64)>;

struct Stages {
    input: mpsc::Sender<Job>,
    free: mpsc::UnboundedReceiver<Block>,
    allocated: usize,
    /// Taken once the writer's result was read.
    writer: Option<oneshot::Receiver<WriterResult>>,
    sha: Option<oneshot::Receiver<String>>,
}

enum State {
    /// Nothing handed off yet: the part file and hashers are still here.
    Inline {
        part: PartFile,
        sha: Option<Sha256Hasher>,
    },
    Threaded(Stages),
}

pub struct Sink {
    state: State,
    current: Block,
    /// Offset of `current`'s first byte in the file.
    offset: u64,
}

impl Sink {
    pub fn new(part: PartFile, with_sha256: bool) -> Self {
        Self {
            state: State::Inline {
                part,
                sha: with_sha256.then(Sha256Hasher::default),
            },
            current: Block::take(),
            offset: 0,
        }
    }

    /// Bytes accepted so far.
    pub fn received(&self) -> u64 {
        self.offset + self.current.len() as u64
    }

    /// Appends `data`, handing full blocks to the hashing and writing threads.
    pub async fn push(&mut self, mut data: &[u8], guard: &Guard) -> Result<()> {
        while !data.is_empty() {
            let taken = self.current.fill_from(data);
            data = &data[taken..];
            if self.current.is_full() {
                self.hand_off(guard).await?;
            }
        }
        Ok(())
    }

    async fn hand_off(&mut self, guard: &Guard) -> Result<()> {
        if let State::Inline { .. } = self.state {
            self.start_threads();
        }
        let State::Threaded(stages) = &mut self.state else {
            unreachable!("threads were just started")
        };
        let next = if stages.allocated < MAX_BLOCKS {
            stages.allocated += 1;
            Some(Block::take())
        } else {
            guard.wait(stages.free.recv()).await?
        };
        let Some(next) = next else {
            return Err(self.stage_failure().await);
        };
        let full = std::mem::replace(&mut self.current, next);
        let len = full.len() as u64;
        let State::Threaded(stages) = &mut self.state else {
            unreachable!()
        };
        if guard
            .wait(stages.input.send((full, self.offset)))
            .await?
            .is_err()
        {
            return Err(self.stage_failure().await);
        }
        self.offset += len;
        Ok(())
    }

    fn start_threads(&mut self) {
        let placeholder = State::Threaded(Stages::placeholder());
        let State::Inline { part, sha } = std::mem::replace(&mut self.state, placeholder) else {
            return;
        };
        let (free_tx, free_rx) = mpsc::unbounded_channel();
        let (writer_tx, writer_rx) = mpsc::channel::<Job>(MAX_BLOCKS);
        let writer_done = spawn_stage("surefetch-writer", move || {
            write_blocks(part, writer_rx, free_tx)
        });
        let (input, sha_done) = match sha {
            Some(sha) => {
                let (sha_tx, sha_rx) = mpsc::channel::<Job>(MAX_BLOCKS);
                let sha_done = spawn_stage("surefetch-sha256", move || {
                    hash_blocks(sha, sha_rx, writer_tx)
                });
                (sha_tx, Some(sha_done))
            }
            None => (writer_tx, None),
        };
        self.state = State::Threaded(Stages {
            input,
            free: free_rx,
            allocated: 1,
            writer: Some(writer_done),
            sha: sha_done,
        });
    }

    /// The error that stopped a stage (the writer's, as only it can fail).
    async fn stage_failure(&mut self) -> Error {
        let State::Threaded(stages) = &mut self.state else {
            return stage_stopped("writer");
        };
        match stages.writer.take() {
            Some(writer) => match writer.await {
                Ok(Err(e)) => e,
                _ => stage_stopped("writer"),
            },
            None => stage_stopped("writer"),
        }
    }

    /// Writes what is left, waits for the stages and returns the digests.
    pub async fn finish(self) -> Result<SinkOutput> {
        let Sink {
            state,
            current,
            offset,
        } = self;
        match state {
            State::Inline { mut part, sha } => {
                let data = current.as_slice();
                let mut xxh = Xxh3Hasher::default();
                xxh.update(data);
                let sha256 = sha.map(|mut sha| {
                    sha.update(data);
                    sha.finish_hex()
                });
                part.write_at(data, 0)?;
                let len = data.len() as u64;
                buffer::recycle(current);
                Ok(SinkOutput {
                    part,
                    len,
                    xxh3_128: xxh.finish_hex(),
                    sha256,
                })
            }
            State::Threaded(stages) => {
                let Stages {
                    input,
                    mut free,
                    writer,
                    sha,
                    ..
                } = stages;
                if !current.is_empty() {
                    let _ = input.send((current, offset)).await;
                } else {
                    buffer::recycle(current);
                }
                drop(input);
                let writer = writer.ok_or_else(|| stage_stopped("writer"))?;
                let (part, xxh, len) = writer.await.map_err(|_| stage_stopped("writer"))??;
                while let Ok(block) = free.try_recv() {
                    buffer::recycle(block);
                }
                let sha256 = match sha {
                    Some(rx) => Some(rx.await.map_err(|_| stage_stopped("hashing"))?),
                    None => None,
                };
                Ok(SinkOutput {
                    part,
                    len,
                    xxh3_128: xxh.finish_hex(),
                    sha256,
                })
            }
        }
    }

    /// Stops the stages after writing everything received so far (it is good
    /// data for a resume), and returns how many bytes from the start of the file
    /// were written.
    pub async fn abort(self) -> u64 {
        let Sink {
            state,
            current,
            offset,
        } = self;
        match state {
            State::Inline { mut part, .. } => {
                let written = part.write_at(current.as_slice(), 0).is_ok();
                let len = if written { current.len() as u64 } else { 0 };
                buffer::recycle(current);
                len
            }
            State::Threaded(stages) => {
                if !current.is_empty() {
                    let _ = stages.input.send((current, offset)).await;
                }
                drop(stages.input);
                match stages.writer {
                    Some(writer) => match writer.await {
                        Ok(Ok((_, _, len))) => len,
                        _ => 0,
                    },
                    None => 0,
                }
            }
        }
    }
}

impl Stages {
    fn placeholder() -> Self {
        let (input, _) = mpsc::channel(1);
        let (_, free) = mpsc::unbounded_channel();
        Self {
            input,
            free,
            allocated: 0,
            writer: None,
            sha: None,
        }
    }
}

/// A pipeline thread ended without its result: a bug, reported as such.
fn stage_stopped(stage: &str) -> Error {
    Error::network(
        format!("internal error: the {stage} thread stopped unexpectedly; please report this"),
        false,
    )
}

/// Runs one pipeline stage on its own thread; its result arrives on the receiver.
fn spawn_stage<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> oneshot::Receiver<T> {
    let (done_tx, done_rx) = oneshot::channel();
    thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = done_tx.send(work());
        })
        .expect("spawn a pipeline thread");
    done_rx
}

fn hash_blocks(
    mut sha: Sha256Hasher,
    mut input: mpsc::Receiver<Job>,
    output: mpsc::Sender<Job>,
) -> String {
    while let Some((block, offset)) = input.blocking_recv() {
        sha.update(block.as_slice());
        if output.blocking_send((block, offset)).is_err() {
            break;
        }
    }
    sha.finish_hex()
}

fn write_blocks(
    mut part: PartFile,
    mut input: mpsc::Receiver<Job>,
    free: mpsc::UnboundedSender<Block>,
) -> WriterResult {
    let mut xxh = Xxh3Hasher::default();
    let mut len = 0u64;
    while let Some((mut block, offset)) = input.blocking_recv() {
        xxh.update(block.as_slice());
        part.write_at(block.as_slice(), offset)?;
        len = len.max(offset + block.len() as u64);
        block.clear();
        if let Err(returned) = free.send(block) {
            buffer::recycle(returned.0);
        }
    }
    Ok((part, xxh, len))
}
