//! Fetching: the connections over a transfer's units, streaming into the sink,
//! then verify and persist.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use reqwest::header;
use reqwest::StatusCode;

use super::{Body, Job};
use crate::atomic;
use crate::buffer::{self, Block, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::guard::Guard;
use crate::hash::{Sha256Hasher, Xxh3Hasher};
use crate::http;
use crate::part::{PartFile, Sidecar};
use crate::ranges::RangeSet;
use crate::response::Comparison;
use crate::schedule::{self, split, unit_size, Plan, Ramp, Stretch, Transfer};
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
        let plan = self.connection_plan(transfer, first.as_ref());
        let (initial, cap) = match plan {
            Plan::Fixed(n) => (n, n),
            Plan::Adaptive { cap } => (1, cap),
        };
        transfer.parallel.store(initial > 1, Ordering::Relaxed);
        let step = match size {
            Some(size) if cap > 1 => unit_size(size, cap),
            _ => u64::MAX,
        };
        // The first response holds the whole first missing range. With several
        // connections it serves only the first unit and the rest is queued; an
        // adaptive transfer streams all of it until more connections join.
        let first_step = match plan {
            Plan::Adaptive { .. } => u64::MAX,
            Plan::Fixed(_) => step,
        };
        let first = first.map(|(body, range)| {
            let unit = range.start..range.end.min(range.start.saturating_add(first_step));
            (body, unit)
        });
        let stretch = match (plan, first.as_ref()) {
            (Plan::Adaptive { .. }, Some((_, unit))) => Some(Stretch::new(unit)),
            _ => None,
        };
        if let (Some(size), Some((_, unit))) = (size, first.as_ref()) {
            let mut rest = kept.clone();
            rest.insert(unit.clone());
            if let Ok(mut queue) = transfer.queue.lock() {
                queue.extend(split(rest.missing(size), step));
            }
        }
        self.progress.set_total(size);
        self.progress.set_done(kept.len());
        // All that is missing, not only the first stretch: a resumed part has a gap per
        // connection of the interrupted call, and the ramp weighs what connections
        // could still save.
        let missing = size.map(|size| size.saturating_sub(kept.len()));
        let with_sha256 = self.options.compute_sha256 || self.expected_sha256.is_some();
        let checkpoint = Checkpoint {
            sidecar: sidecar.clone(),
            path: self.paths.sidecar.clone(),
        };
        let sink = Sink::start(
            part,
            kept,
            with_sha256,
            2 * cap as usize + 2,
            Some(checkpoint),
        )?;
        let crew = Crew {
            transfer,
            sink: &sink,
            stretch: stretch.as_ref(),
            allowed: AtomicU32::new(initial),
            step,
        };
        let ramp = match plan {
            Plan::Adaptive { cap } => stretch.as_ref().map(|s| {
                let stretch_left = s
                    .end
                    .load(Ordering::Acquire)
                    .saturating_sub(s.at.load(Ordering::Acquire));
                Ramp::new(cap, Instant::now(), Some(missing.unwrap_or(stretch_left)))
            }),
            _ => None,
        };
        let result = self.run_crew(&crew, initial, first, ramp).await;
        if let Err(error) = result {
            let (part, written, error) = sink.abort(error).await;
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
        if size.is_none() {
            self.check_unannounced_end(transfer, len)?;
        }
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
        let streamed = self.stream_unit(body, &mut memory, &unit, None).await;
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

    /// A body without a length ends where the connection closes: under the validator
    /// of a version whose size is known, ending short of it is a cut, not the file.
    fn check_unannounced_end(&self, transfer: &Transfer, len: u64) -> Result<()> {
        let Some(known) = self.known() else {
            return Ok(());
        };
        if len == known.total || known.validator.compare(&transfer.validator) != Comparison::Same {
            return Ok(());
        }
        Err(Error::network(
            format!(
                "{} sent {len} bytes without a Content-Length, but the file it tagged the same \
                 has {} bytes: the connection was cut",
                self.shown_url, known.total
            ),
            true,
        ))
    }

    /// Makes the verified part durable (when asked), gives it its mode and
    /// renames it over the final path.
    fn persist(&self, part: PartFile) -> Result<()> {
        let mode = part.mode_to_set(self.options.executable);
        if self.defer_commit {
            return part.finish_unsynced(mode);
        }
        part.finish(mode)?;
        atomic::persist(
            &self.paths.part,
            self.paths.destination(),
            self.options.durable,
        )
    }

    fn connection_plan(&self, transfer: &Transfer, first: Option<&(Body, Range<u64>)>) -> Plan {
        let ranged = first.is_some_and(|(b, _)| b.response.status() == StatusCode::PARTIAL_CONTENT);
        schedule::connection_plan(
            self.options.connections,
            transfer.size,
            ranged,
            transfer.resumable(),
        )
    }

    /// Runs `initial` connections, and for an adaptive transfer adds (or retires)
    /// connections as the ramp decides; ends at the first error or when all are done.
    async fn run_crew(
        &self,
        crew: &Crew<'_>,
        initial: u32,
        mut first: Option<(Body, Range<u64>)>,
        mut ramp: Option<Ramp>,
    ) -> Result<()> {
        let mut running = FuturesUnordered::new();
        for index in 0..initial {
            let first = if index == 0 { first.take() } else { None };
            running.push(self.connection(crew, index, first));
        }
        let mut launched = initial;
        let mut ticker = tokio::time::interval(RAMP_TICK);
        loop {
            let ramping = ramp.as_ref().is_some_and(|r| !r.settled());
            tokio::select! {
                next = running.next() => match next {
                    None => return Ok(()),
                    Some(Err(error)) => return Err(error),
                    Some(Ok(())) => {}
                },
                _ = ticker.tick(), if ramping => {
                    let Some(ramp) = ramp.as_mut() else { continue };
                    let wanted = ramp.tick(Instant::now(), self.transferred.load(Ordering::Relaxed));
                    if wanted != crew.allowed.swap(wanted, Ordering::Relaxed) {
                        crate::journal::note(
                            crate::journal::Level::Info,
                            format!("{}: {wanted} connection(s)", self.shown_url),
                        );
                    }
                    if wanted > 1 && crew.split_stretch() {
                        while launched < wanted {
                            running.push(self.connection(crew, launched, None));
                            launched += 1;
                        }
                    }
                }
            }
        }
    }

    /// One connection: streams its first response (if any), then takes units from
    /// the queue until none is left or it is no longer allowed to. A failed unit is
    /// handed back and retried alone.
    async fn connection(
        &self,
        crew: &Crew<'_>,
        index: u32,
        first: Option<(Body, Range<u64>)>,
    ) -> Result<()> {
        let transfer = crew.transfer;
        let mut next = first;
        loop {
            let stretched = next.is_some() && crew.stretch.is_some();
            let (body, unit) = match next.take() {
                Some(started) => started,
                None => {
                    if index >= crew.allowed.load(Ordering::Relaxed) {
                        return Ok(());
                    }
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
            let stretch = crew.stretch.filter(|_| stretched);
            let mut stream = crew.sink.stream(unit.start);
            let streamed = self.stream_unit(body, &mut stream, &unit, stretch).await;
            // What arrived before an error is good data: keep it for the retry.
            let flushed = stream.flush().await;
            let end = stretch.map_or(unit.end, |s| s.end.load(Ordering::Acquire));
            let remaining = stream.position()..end;
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
        stretch: Option<&Stretch>,
    ) -> Result<()> {
        let Body {
            mut response,
            start,
            holds_until,
        } = body;
        let url = response.url().clone();
        // A 206's Content-Range states what its body holds, with or without a length.
        let announced =
            response.content_length().is_some() || response.status() == StatusCode::PARTIAL_CONTENT;
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
            // A stretch's end moves in when other connections join.
            let unit_end = stretch.map_or(unit.end, |s| s.end.load(Ordering::Acquire));
            let end = stream.position() + chunk.len() as u64;
            let done = end >= unit_end && holds_until > unit_end;
            if done {
                chunk.truncate(unit_end.saturating_sub(stream.position()) as usize);
            } else if end > unit_end {
                // Never write past the expected size.
                return Err(Error::SizeMismatch {
                    expected: unit_end,
                    actual: end,
                });
            }
            stream.push(&chunk, &self.guard).await?;
            if let Some(stretch) = stretch {
                stretch.at.store(stream.position(), Ordering::Release);
            }
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

/// How often an adaptive transfer's ramp looks at the rate.
const RAMP_TICK: Duration = Duration::from_millis(100);
/// When connections join, the first one stops at least this far ahead of where
/// it is (more than any chunk it may be writing meanwhile).
const STRETCH_AHEAD: u64 = 4 << 20;

/// What the connections of one attempt share.
struct Crew<'a> {
    transfer: &'a Transfer,
    sink: &'a Sink,
    /// The first connection's open range, for an adaptive transfer.
    stretch: Option<&'a Stretch>,
    /// Connections with an index below this may take another unit.
    allowed: AtomicU32,
    step: u64,
}

impl Crew<'_> {
    /// Cuts the first connection's stretch and queues the rest as units, once;
    /// true when there is work for more connections.
    fn split_stretch(&self) -> bool {
        if self.transfer.parallel.swap(true, Ordering::AcqRel) {
            return true;
        }
        let Some(given) = self
            .stretch
            .and_then(|s| s.cut(STRETCH_AHEAD + BLOCK_SIZE as u64))
        else {
            return !self.transfer.queue_is_empty();
        };
        for unit in split(vec![given], self.step).into_iter().rev() {
            self.transfer.give_back(unit);
        }
        true
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

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderMap;
    use reqwest::Url;

    use super::*;
    use crate::cancel::CancelToken;
    use crate::options::{Options, Progress};
    use crate::response::{Known, Validator};
    use crate::schedule::Target;

    fn etag(tag: &str) -> Validator {
        Validator {
            etag: Some(tag.to_owned()),
            last_modified: None,
        }
    }

    fn transfer(validator: Validator) -> Transfer {
        let target = Target {
            url: Url::parse("http://127.0.0.1:9/f.bin").unwrap(),
            headers: HeaderMap::new(),
        };
        Transfer::new(None, validator, target)
    }

    #[test]
    fn a_length_less_body_short_of_the_known_size_of_its_version_is_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options::default();
        let job = Job::new(
            "http://127.0.0.1:9/f.bin",
            &dir.path().join("f.bin"),
            &options,
            CancelToken::new(),
            Progress::new(),
        )
        .unwrap();
        let same = transfer(etag("\"v1\""));
        // Nothing known: whatever arrived is the file.
        assert!(job.check_unannounced_end(&same, 10).is_ok());
        job.set_known(Some(Known {
            validator: etag("\"v1\""),
            total: 100,
        }));
        assert!(job.check_unannounced_end(&same, 100).is_ok());
        let cut = job.check_unannounced_end(&same, 99).unwrap_err();
        assert!(cut.is_retryable(), "{cut}");
        assert!(cut.to_string().contains("has 100 bytes"), "{cut}");
        // Another version (or none to compare) is not held to that size.
        assert!(job
            .check_unannounced_end(&transfer(etag("\"v2\"")), 99)
            .is_ok());
        let untagged = transfer(Validator::default());
        assert!(job.check_unannounced_end(&untagged, 99).is_ok());
    }

    #[tokio::test]
    async fn a_small_body_fills_one_block_and_no_more() {
        let guard = Guard::new(CancelToken::new(), None, None);
        let mut memory = Memory(Block::take());
        memory.push(&[7; 1000], &guard).await.unwrap();
        assert_eq!(memory.position(), 1000);
        memory.push(&[7; BLOCK_SIZE - 1000], &guard).await.unwrap();
        assert_eq!(memory.position(), BLOCK_SIZE as u64);
        let over = memory.push(&[7], &guard).await.unwrap_err();
        assert!(matches!(over, Error::Internal(_)), "{over}");
    }
}
