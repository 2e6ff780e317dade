//! Fetching: the connections over a transfer's units, streaming into the sink,
//! then verify and persist.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::future::try_join_all;
use reqwest::StatusCode;

use super::{Body, Job};
use crate::atomic;
use crate::error::{Error, Result};
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
        let sidecar = Sidecar {
            version: Sidecar::VERSION,
            url: self.shown_url.clone(),
            etag: transfer.validator.etag.clone(),
            last_modified: transfer.validator.last_modified.clone(),
            size,
            ranges_done: kept.to_pairs(),
        };
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
        let output = sink.finish().await?;
        self.verify(&output, size)?;
        let SinkOutput {
            part,
            len,
            xxh3_128,
            sha256,
        } = output;
        part.finish(file_mode(self.options.executable))?;
        atomic::persist(
            &self.paths.part,
            &self.paths.final_path,
            self.options.durable,
        )?;
        self.paths.remove_sidecar();
        Ok((len, sha256, xxh3_128))
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
    pub(super) async fn stream_unit(
        &self,
        body: Body,
        stream: &mut RangeStream,
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

    pub(super) fn verify(&self, output: &SinkOutput, expected: Option<u64>) -> Result<()> {
        if let Some(expected) = expected.filter(|&e| e != output.len) {
            return Err(Error::SizeMismatch {
                expected,
                actual: output.len,
            });
        }
        if let (Some(expected), Some(actual)) = (&self.expected_sha256, &output.sha256) {
            if expected != actual {
                return Err(Error::ChecksumMismatch {
                    algorithm: "sha256",
                    expected: expected.clone(),
                    actual: actual.clone(),
                });
            }
        }
        if let Some(expected) = self
            .expected_xxh3
            .as_ref()
            .filter(|e| **e != output.xxh3_128)
        {
            return Err(Error::ChecksumMismatch {
                algorithm: "xxh3_128",
                expected: expected.clone(),
                actual: output.xxh3_128.clone(),
            });
        }
        Ok(())
    }
}
