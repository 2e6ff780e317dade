//! Fetching: the connections over a transfer's units, streaming into the sink,
//! then verify and persist.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::future::try_join_all;
use reqwest::header;
use reqwest::StatusCode;

use super::{Body, Job};
use crate::atomic;
use crate::buffer::{self, Block, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::guard::Guard;
use crate::hash::{Sha256Hasher, Xxh3Hasher};
use crate::http;
use crate::part::{file_mode, PartFile, Sidecar};
use crate::ranges::RangeSet;
use crate::schedule::{self, split, unit_size, Transfer};
use crate::sink::{self, Checkpoint, RangeStream, Sink, SinkOutput};
use crate::speed::SpeedMeter;

impl Job<'_> {
    /// Runs the connections over the missing ranges, then verifies and persists.
    pub(super) async fn fetch_and_persist(
        &self,
        transfer: &Transfer,
        part: PartFile,
        kept: RangeSet,
        first: Option<(Body, Range<u64>)>,
    ) -> Result<(u64, Option<String>, String)> {
        let size = transfer.size;
        if let Some(value) = first
            .as_ref()
            .and_then(|(body, _)| body.response.headers().get(header::CONTENT_DISPOSITION))
            .filter(|_| self.options.content_disposition)
        {
            self.paths.name_after_server(value.as_bytes());
        }
        let sidecar = Sidecar {
            version: Sidecar::VERSION,
            url: self.shown_url.clone(),
            etag: transfer.validator.etag.clone(),
            last_modified: transfer.validator.last_modified.clone(),
            size,
            ranges_done: kept.to_pairs(),
        };
        if let (Some(size), Some((_, unit))) = (size, first.as_ref()) {
            if size <= SMALL_MAX && kept.is_empty() && *unit == (0..size) {
                let (body, unit) = first.expect("checked above");
                return self.fetch_small(part, body, unit).await;
            }
        }
        if first.is_some() {
            sidecar
                .store(&self.paths.sidecar, false)
                .map_err(|e| Error::storage("writing", &self.paths.sidecar, e))?;
        }
        let connections = self.connection_count(transfer, first.as_ref());
        transfer.parallel.store(connections > 1, Ordering::Relaxed);
        // The first response holds the whole first missing range; with several
        // connections it serves only the first unit and the rest is queued.
        let step = match size {
            Some(size) if connections > 1 => unit_size(size, connections),
            _ => u64::MAX,
        };
        let mut first = first.map(|(body, range)| {
            let unit = range.start..range.end.min(range.start.saturating_add(step));
            (body, unit)
        });
        if let (Some(size), Some((_, unit))) = (size, first.as_ref()) {
            let mut rest = kept.clone();
            rest.insert(unit.clone());
            if let Ok(mut queue) = transfer.queue.lock() {
                queue.extend(split(rest.missing(size), step));
            }
        }
        self.progress.set_total(size);
        self.progress.set_done(kept.len());
        let with_sha256 = self.options.compute_sha256 || self.expected_sha256.is_some();
        let checkpoint = Checkpoint {
            sidecar: sidecar.clone(),
            path: self.paths.sidecar.clone(),
        };
        let sink = Sink::start(
            part,
            kept,
            with_sha256,
            2 * connections as usize + 2,
            Some(checkpoint),
        )?;
        let result = {
            let workers = (0..connections).map(|i| {
                let first = if i == 0 { first.take() } else { None };
                self.connection(transfer, &sink, first)
            });
            try_join_all(workers).await
        };
        if let Err(error) = result {
            let (part, written) = sink.abort().await;
            if let Some(part) = part.filter(|_| error.keeps_part()) {
                let mut checkpoint = Checkpoint {
                    sidecar,
                    path: self.paths.sidecar.clone(),
                };
                let _ = sink::record(&part, &mut checkpoint, &written);
            }
            return Err(error);
        }
        let SinkOutput {
            part,
            len,
            xxh3_128,
            sha256,
        } = sink.finish().await?;
        self.verify(len, sha256.as_deref(), &xxh3_128, size)?;
        self.persist(part)?;
        self.paths.remove_sidecar();
        Ok((len, sha256, xxh3_128))
    }

    /// A body that fits one block: read into memory, hashed and written here, on
    /// the I/O runtime — no pipeline threads, no sidecar, no checkpoints. (A cut
    /// one starts over: there is little to lose.)
    async fn fetch_small(
        &self,
        mut part: PartFile,
        body: Body,
        unit: Range<u64>,
    ) -> Result<(u64, Option<String>, String)> {
        self.progress.set_total(Some(unit.end));
        self.progress.set_done(0);
        let mut memory = Memory(Block::take());
        let streamed = self.stream_unit(body, &mut memory, &unit).await;
        let block = memory.0;
        let written = streamed.and_then(|()| part.write_at(block.as_slice(), 0));
        let len = block.len() as u64;
        let xxh3_128 = {
            let mut xxh = Xxh3Hasher::default();
            xxh.update(block.as_slice());
            xxh.finish_hex()
        };
        let sha256 = (self.options.compute_sha256 || self.expected_sha256.is_some()).then(|| {
            let mut sha = Sha256Hasher::default();
            sha.update(block.as_slice());
            sha.finish_hex()
        });
        buffer::recycle(block);
        if let Err(error) = written {
            // Without a sidecar the part cannot be resumed: leave nothing behind.
            drop(part);
            self.paths.discard();
            return Err(error);
        }
        self.verify(len, sha256.as_deref(), &xxh3_128, Some(unit.end))?;
        self.persist(part)?;
        Ok((len, sha256, xxh3_128))
    }

    /// Makes the verified part durable (when asked), gives it its mode and
    /// renames it over the final path.
    fn persist(&self, part: PartFile) -> Result<()> {
        part.finish(file_mode(self.options.executable))?;
        atomic::persist(
            &self.paths.part,
            self.paths.destination(),
            self.options.durable,
        )
    }

    fn connection_count(&self, transfer: &Transfer, first: Option<&(Body, Range<u64>)>) -> u32 {
        let ranged = first.is_some_and(|(b, _)| b.response.status() == StatusCode::PARTIAL_CONTENT);
        schedule::connection_count(
            self.options.connections,
            transfer.size,
            ranged,
            transfer.resumable(),
        )
    }

    /// One connection: streams its first response (if any), then takes units from
    /// the queue until none is left. A failed unit is handed back and retried alone.
    pub(super) async fn connection(
        &self,
        transfer: &Transfer,
        sink: &Sink,
        first: Option<(Body, Range<u64>)>,
    ) -> Result<()> {
        let mut next = first;
        loop {
            let (body, unit) = match next.take() {
                Some(started) => started,
                None => {
                    let Some(unit) = transfer.next_unit() else {
                        return Ok(());
                    };
                    match self.open_unit(transfer, unit.clone()).await {
                        Ok(body) => (body, unit),
                        Err(e) => {
                            self.retry_unit(transfer, e, unit).await?;
                            continue;
                        }
                    }
                }
            };
            let mut stream = sink.stream(unit.start);
            let streamed = self.stream_unit(body, &mut stream, &unit).await;
            // What arrived before an error is good data: keep it for the retry.
            let flushed = stream.flush().await;
            let remaining = stream.position()..unit.end;
            if let Err(e) = streamed.and(flushed) {
                self.retry_unit(transfer, e, remaining).await?;
            }
        }
    }

    /// After a failed unit: hands back what is left of it and waits out the
    /// backoff, or fails the transfer when it cannot or may not retry.
    pub(super) async fn retry_unit(
        &self,
        transfer: &Transfer,
        error: Error,
        rest: Range<u64>,
    ) -> Result<()> {
        let parallel = transfer.parallel.load(Ordering::Relaxed);
        if !(error.is_retryable() && parallel && transfer.resumable()) {
            return Err(error);
        }
        let Some(retry) = self.take_retry() else {
            return Err(error);
        };
        transfer.give_back(rest);
        self.backoff(retry, &error).await
    }

    /// Streams `unit` (its end `u64::MAX` when the size is unknown) from `body`,
    /// skipping what it holds before the unit; a body that holds more is dropped
    /// once the unit is complete.
    async fn stream_unit(
        &self,
        body: Body,
        stream: &mut impl UnitWriter,
        unit: &Range<u64>,
    ) -> Result<()> {
        let Body {
            mut response,
            start,
            holds_until,
        } = body;
        let url = response.url().clone();
        let announced = response.content_length().is_some();
        let mut skip = unit.start.saturating_sub(start);
        let mut meter = SpeedMeter::new(
            self.options.speed_limit,
            self.options.speed_time,
            Instant::now(),
        );
        loop {
            let chunk = self
                .guard
                .read(response.chunk())
                .await?
                .map_err(|e| self.http.transport_error(&e, &url))?;
            let Some(mut chunk) = chunk else { break };
            self.transferred
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            meter.record(chunk.len() as u64, Instant::now())?;
            if skip > 0 {
                let skipped = skip.min(chunk.len() as u64);
                skip -= skipped;
                let _ = chunk.split_to(skipped as usize);
                if chunk.is_empty() {
                    continue;
                }
            }
            let end = stream.position() + chunk.len() as u64;
            let done = end >= unit.end && holds_until > unit.end;
            if done {
                chunk.truncate((unit.end - stream.position()) as usize);
            } else if end > unit.end {
                // Never write past the expected size.
                return Err(Error::SizeMismatch {
                    expected: unit.end,
                    actual: end,
                });
            }
            stream.push(&chunk, &self.guard).await?;
            self.progress.add_done(chunk.len() as u64);
            if done {
                return Ok(());
            }
        }
        let at = stream.position();
        if unit.end != u64::MAX && at < unit.end && !announced {
            // No length was announced: the caller's size is what is wrong.
            return Err(Error::SizeMismatch {
                expected: unit.end,
                actual: at,
            });
        }
        if unit.end != u64::MAX && at < unit.end {
            return Err(Error::network(
                format!(
                    "the connection closed at byte {at} of {} from {}",
                    unit.end,
                    http::redact(&url)
                ),
                true,
            ));
        }
        Ok(())
    }

    /// Checks the size and digests of the `len` bytes received against what the
    /// caller (or the server, for the size) promised.
    fn verify(
        &self,
        len: u64,
        sha256: Option<&str>,
        xxh3_128: &str,
        expected: Option<u64>,
    ) -> Result<()> {
        if let Some(expected) = expected.filter(|&e| e != len) {
            return Err(Error::SizeMismatch {
                expected,
                actual: len,
            });
        }
        if let (Some(expected), Some(actual)) = (&self.expected_sha256, sha256) {
            if expected != actual {
                return Err(Error::ChecksumMismatch {
                    algorithm: "sha256",
                    expected: expected.clone(),
                    actual: actual.to_owned(),
                });
            }
        }
        if let Some(expected) = self.expected_xxh3.as_ref().filter(|e| *e != xxh3_128) {
            return Err(Error::ChecksumMismatch {
                algorithm: "xxh3_128",
                expected: expected.clone(),
                actual: xxh3_128.to_owned(),
            });
        }
        Ok(())
    }
}

/// Bodies up to this size take `fetch_small`: one block.
const SMALL_MAX: u64 = BLOCK_SIZE as u64;

/// Where `stream_unit` puts a unit's bytes: the sink's pipeline, or memory.
trait UnitWriter {
    /// File offset of the next byte.
    fn position(&self) -> u64;
    async fn push(&mut self, data: &[u8], guard: &Guard) -> Result<()>;
}

impl UnitWriter for RangeStream {
    fn position(&self) -> u64 {
        RangeStream::position(self)
    }

    async fn push(&mut self, data: &[u8], guard: &Guard) -> Result<()> {
        RangeStream::push(self, data, guard).await
    }
}

/// A small body, held whole in one block from offset 0.
struct Memory(Block);

impl UnitWriter for Memory {
    fn position(&self) -> u64 {
        self.0.len() as u64
    }

    async fn push(&mut self, data: &[u8], _guard: &Guard) -> Result<()> {
        if self.0.len() + data.len() > BLOCK_SIZE {
            return Err(Error::internal("a small body outgrew its block"));
        }
        self.0.fill_from(data);
        Ok(())
    }
}
