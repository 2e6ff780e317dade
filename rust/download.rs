//! `download_into`: stream → hash → part file → verify → fsync → rename → fsync dir,
//! with retries, timeouts and cancellation.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};

use crate::atomic;
use crate::buffer::BLOCK_SIZE;
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::guard::Guard;
use crate::hash::{parse_digest, SHA256_HEX_LEN, XXH3_128_HEX_LEN};
use crate::http::{self, ContentRange, Http};
use crate::part::{file_mode, PartFile, PartPaths, Sidecar};
use crate::ranges::RangeSet;
use crate::retry::Backoff;
use crate::sink::{self, Checkpoint, RangeStream, Sink, SinkOutput};

/// What the caller asks of a download.
#[derive(Debug, Clone)]
pub struct Options {
    pub sha256: Option<String>,
    pub xxh3_128: Option<String>,
    pub size: Option<u64>,
    /// Compute SHA-256 even when no expected digest is given.
    pub compute_sha256: bool,
    pub durable: bool,
    pub executable: bool,
    pub timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub read_timeout: Option<Duration>,
    pub retries: u32,
    pub backoff: Backoff,
    pub headers: Vec<(String, String)>,
    /// Parallel ranged connections; `None` chooses (one for small files).
    pub connections: Option<u32>,
    /// Continue a part file an earlier call left, when it is safe to.
    pub resume: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            sha256: None,
            xxh3_128: None,
            size: None,
            compute_sha256: true,
            durable: true,
            executable: false,
            timeout: None,
            connect_timeout: Duration::from_secs(30),
            read_timeout: Some(Duration::from_secs(30)),
            retries: 3,
            backoff: Backoff::default(),
            headers: Vec::new(),
            connections: None,
            resume: true,
        }
    }
}

/// Bytes done and expected, shared with whoever reports progress.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    const UNKNOWN: u64 = u64::MAX;

    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            done: AtomicU64::new(0),
            total: AtomicU64::new(Self::UNKNOWN),
        })
    }

    /// (bytes done, total if known).
    pub fn get(&self) -> (u64, Option<u64>) {
        let total = self.total.load(Ordering::Relaxed);
        (
            self.done.load(Ordering::Relaxed),
            (total != Self::UNKNOWN).then_some(total),
        )
    }

    fn set_total(&self, total: Option<u64>) {
        self.total
            .store(total.unwrap_or(Self::UNKNOWN), Ordering::Relaxed);
    }

    fn set_done(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
    }

    fn add_done(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// A finished download.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: Option<String>,
    pub xxh3_128: String,
    pub resumed_from: u64,
    pub bytes_transferred: u64,
    pub elapsed: Duration,
}

/// Downloads `url` to `final_path`. Nothing appears at `final_path` unless it is
/// whole and verified; a failure leaves whatever was there untouched.
pub async fn download_into(
    url: &str,
    final_path: &Path,
    options: &Options,
    cancel: CancelToken,
    progress: Arc<Progress>,
) -> Result<Outcome> {
    let started = Instant::now();
    let job = Job::new(url, final_path, options, cancel, progress)?;
    let lock = job.paths.lock().map_err(Error::before_writing)?;
    let result = job.run_with_retries().await;
    match &result {
        Ok(_) => {}
        Err(e) if e.keeps_part() => {}
        Err(_) => job.paths.discard(),
    }
    drop(lock);
    // Leaves the destination tidy when nothing else is in progress there.
    let _ = std::fs::remove_dir(&job.paths.dir);
    let (size, sha256, xxh3_128) = result?;
    Ok(Outcome {
        path: job.paths.final_path.clone(),
        size,
        sha256,
        xxh3_128,
        resumed_from: match job.resumed_from.load(Ordering::Relaxed) {
            NOT_YET => 0,
            kept => kept,
        },
        bytes_transferred: job.transferred.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    })
}

/// Each later range request asks for at most this much; units are multiples of
/// the block size, so every connection writes page-aligned blocks.
const MAX_UNIT: u64 = 4 << 20;
/// Below this size one connection is enough when the caller did not choose.
const AUTO_PARALLEL_MIN: u64 = 64 << 20;
const AUTO_CONNECTIONS: u32 = 8;
/// `Job::resumed_from` before an attempt reached the server.
const NOT_YET: u64 = u64::MAX;
/// Resumed ranges are cut to this alignment, so writes can stay `O_DIRECT`.
const RESUME_ALIGN: u64 = 4096;

/// What an earlier, interrupted call left that this one can build on.
struct Kept {
    sidecar: Sidecar,
    ranges: RangeSet,
    part: PartFile,
}

/// The identity of the file being transferred: what If-Range sends.
#[derive(Debug, Clone, Default)]
struct Validator {
    etag: Option<String>,
    last_modified: Option<String>,
}

impl Validator {
    fn of(response: &reqwest::Response) -> Self {
        let (etag, last_modified) = http::validators(response);
        Self {
            etag,
            last_modified,
        }
    }

    /// The version an earlier call recorded.
    fn of_sidecar(sidecar: &Sidecar) -> Self {
        Self {
            etag: sidecar.etag.clone(),
            last_modified: sidecar.last_modified.clone(),
        }
    }

    fn if_range(&self) -> Option<&str> {
        self.etag.as_deref().or(self.last_modified.as_deref())
    }

    /// Whether `response` shows another version than this one.
    fn differs_from(&self, response: &reqwest::Response) -> bool {
        let theirs = Self::of(response);
        match (&self.etag, &theirs.etag) {
            (Some(ours), Some(theirs)) => ours != theirs,
            _ => matches!(
                (&self.last_modified, &theirs.last_modified),
                (Some(ours), Some(theirs)) if ours != theirs
            ),
        }
    }
}

/// The transfer of one version of the file, once its size and validator are known.
struct Transfer {
    size: Option<u64>,
    validator: Validator,
    /// Units not yet taken by a connection, lowest offset first.
    queue: Mutex<VecDeque<Range<u64>>>,
    /// Several connections: a failed unit is retried alone. (One connection
    /// retries through a new attempt, which also handles a 200 to its Range.)
    parallel: AtomicBool,
}

impl Transfer {
    fn new(size: Option<u64>, validator: Validator) -> Self {
        Self {
            size,
            validator,
            queue: Mutex::new(VecDeque::new()),
            parallel: AtomicBool::new(false),
        }
    }

    /// Range requests (to resume, retry or split) are only safe with a validator
    /// for If-Range and a known size.
    fn resumable(&self) -> bool {
        self.size.is_some() && self.validator.if_range().is_some()
    }

    fn next_unit(&self) -> Option<Range<u64>> {
        self.queue.lock().ok()?.pop_front()
    }

    fn give_back(&self, range: Range<u64>) {
        if let Ok(mut queue) = self.queue.lock() {
            let at = queue.partition_point(|r| r.start < range.start);
            queue.insert(at, range);
        }
    }
}

/// How the first response of an attempt starts the transfer.
enum Start {
    /// The whole body from offset 0 (a 200): a fresh start.
    Whole(reqwest::Response),
    /// A 206 for `range` of the kept (or new) part file.
    Partial(reqwest::Response, Range<u64>),
    /// Nothing to fetch: the kept part already holds the whole file.
    Complete,
}

struct Job<'a> {
    url: Url,
    paths: PartPaths,
    options: &'a Options,
    expected_sha256: Option<String>,
    expected_xxh3: Option<String>,
    headers: HeaderMap,
    http: Http,
    guard: Guard,
    progress: Arc<Progress>,
    transferred: AtomicU64,
    resumed_from: AtomicU64,
    retries_used: AtomicU32,
}

impl<'a> Job<'a> {
    fn new(
        url: &str,
        final_path: &Path,
        options: &'a Options,
        cancel: CancelToken,
        progress: Arc<Progress>,
    ) -> Result<Self> {
        let url = http::parse_url(url)?;
        if final_path.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "destination {} is a directory: give a file path",
                final_path.display()
            )));
        }
        if options.connections == Some(0) {
            return Err(Error::InvalidArgument(
                "connections must be at least 1".into(),
            ));
        }
        let expected_sha256 = options
            .sha256
            .as_deref()
            .map(|d| parse_digest("sha256", d, SHA256_HEX_LEN))
            .transpose()?;
        let expected_xxh3 = options
            .xxh3_128
            .as_deref()
            .map(|d| parse_digest("xxh3_128", d, XXH3_128_HEX_LEN))
            .transpose()?;
        Ok(Self {
            paths: PartPaths::new(final_path)?,
            headers: http::request_headers(&options.headers)?,
            http: Http::shared(options.connect_timeout)?,
            guard: Guard::new(cancel, options.timeout, options.read_timeout),
            url,
            options,
            expected_sha256,
            expected_xxh3,
            progress,
            transferred: AtomicU64::new(0),
            resumed_from: AtomicU64::new(NOT_YET),
            retries_used: AtomicU32::new(0),
        })
    }

    /// Takes one retry from the call's budget; returns its number (for the backoff).
    fn take_retry(&self) -> Option<u32> {
        self.retries_used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used < self.options.retries).then_some(used + 1)
            })
            .ok()
    }

    async fn backoff(&self, retry: u32, error: &Error) -> Result<()> {
        let retry_after = match error {
            Error::Http { retry_after, .. } => *retry_after,
            _ => None,
        };
        self.guard
            .sleep(self.options.backoff.delay_for(retry, retry_after))
            .await
    }

    /// Attempts until success, a permanent error, or the retry budget is spent.
    /// A retry continues from what the failed attempt kept; a file that changed
    /// on the server starts over.
    async fn run_with_retries(&self) -> Result<(u64, Option<String>, String)> {
        let mut resume = self.options.resume;
        loop {
            self.guard.check()?;
            let error = match self.attempt(resume).await {
                Ok(done) => return Ok(done),
                Err(e) => e,
            };
            let changed = matches!(error, Error::SourceChanged { .. });
            if !(changed || error.is_retryable()) {
                return Err(error);
            }
            let Some(retry) = self.take_retry() else {
                return Err(error);
            };
            if changed {
                self.paths.discard();
                resume = false;
            } else {
                self.backoff(retry, &error).await?;
                resume = true;
            }
        }
    }

    /// What the sidecar and part file allow to keep; `None` means start over.
    fn load_kept(&self) -> Result<Option<Kept>> {
        let Some(sidecar) = Sidecar::load(&self.paths.sidecar) else {
            return Ok(None);
        };
        let usable = sidecar.url == self.url.as_str()
            && (sidecar.etag.is_some() || sidecar.last_modified.is_some())
            && sidecar
                .size
                .is_some_and(|s| self.options.size.is_none_or(|e| e == s));
        let Some(size) = sidecar.size.filter(|_| usable) else {
            return Ok(None);
        };
        let Some(part) = PartFile::open_existing(&self.paths.part, size, self.options.durable)?
        else {
            return Ok(None);
        };
        let ranges = RangeSet::from_pairs(&sidecar.ranges_done).clamp_aligned(size, RESUME_ALIGN);
        Ok(Some(Kept {
            sidecar,
            ranges,
            part,
        }))
    }

    fn request_headers(
        &self,
        range: Option<Range<u64>>,
        validator: Option<&Validator>,
    ) -> HeaderMap {
        let mut headers = self.headers.clone();
        if let Some(range) = range {
            let value = format!("bytes={}-{}", range.start, range.end - 1);
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(header::RANGE, value);
            }
        }
        if let Some(tag) = validator.and_then(Validator::if_range) {
            if let Ok(value) = HeaderValue::from_str(tag) {
                headers.insert(header::IF_RANGE, value);
            }
        }
        headers
    }

    /// One attempt: continue what `kept` holds (or start fresh), fetch what is
    /// missing over one or more connections, verify, persist.
    async fn attempt(&self, resume: bool) -> Result<(u64, Option<String>, String)> {
        let kept = if resume { self.load_kept()? } else { None };
        if kept.is_none() {
            self.paths.discard();
        }
        let (start, kept) = self.open_first(kept).await?;
        // What an earlier call left and this one builds on (0 if it started over),
        // as the first attempt that reached the server found it.
        let kept_bytes = kept.as_ref().map_or(0, |k| k.ranges.len());
        let _ = self.resumed_from.compare_exchange(
            NOT_YET,
            kept_bytes,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        let (transfer, part, ranges, first_unit) = match start {
            Start::Whole(response) => {
                let size = self.expected_size(response.content_length())?;
                let transfer = Transfer::new(size, Validator::of(&response));
                let part = PartFile::create(&self.paths.part, size, self.options.durable)?;
                let unit = 0..size.unwrap_or(u64::MAX);
                (transfer, part, RangeSet::new(), Some((response, unit)))
            }
            Start::Partial(response, range) => {
                let (transfer, part, ranges) = match kept {
                    Some(kept) => {
                        let transfer =
                            Transfer::new(kept.sidecar.size, Validator::of_sidecar(&kept.sidecar));
                        (transfer, kept.part, kept.ranges)
                    }
                    None => {
                        let size = match http::content_range(&response) {
                            Some(ContentRange::Bytes { total, .. }) => total,
                            _ => None,
                        };
                        let size = self.expected_size(size)?;
                        let transfer = Transfer::new(size, Validator::of(&response));
                        let part = PartFile::create(&self.paths.part, size, self.options.durable)?;
                        (transfer, part, RangeSet::new())
                    }
                };
                (transfer, part, ranges, Some((response, range)))
            }
            Start::Complete => {
                let kept =
                    kept.ok_or_else(|| Error::internal("a complete start without a part"))?;
                let transfer = Transfer::new(kept.sidecar.size, Validator::default());
                (transfer, kept.part, kept.ranges, None)
            }
        };
        self.fetch_and_persist(&transfer, part, ranges, first_unit)
            .await
    }

    /// Sends the attempt's first request: the first missing range of `kept` with
    /// If-Range, or (fresh) a plain GET, or a first unit when going parallel.
    async fn open_first(&self, kept: Option<Kept>) -> Result<(Start, Option<Kept>)> {
        let Some(kept) = kept else {
            if self.options.connections == Some(1) {
                let opened = self
                    .http
                    .open(&self.url, &self.headers, &self.guard)
                    .await?;
                return Ok((self.plain(opened)?, None));
            }
            // All of it: one request for a small file; a large one is split once
            // the size is known, this connection stopping at its first unit.
            let headers = self.request_headers(Some(0..u64::MAX), None);
            let opened = self.http.open(&self.url, &headers, &self.guard).await?;
            let response = opened.response;
            let total_known = matches!(
                http::content_range(&response),
                Some(ContentRange::Bytes { total: Some(_), .. })
            );
            return match response.status() {
                StatusCode::PARTIAL_CONTENT if total_known => {
                    let range = self.check_partial(&response, 0..u64::MAX, None)?;
                    Ok((Start::Partial(response, range), None))
                }
                StatusCode::PARTIAL_CONTENT | StatusCode::RANGE_NOT_SATISFIABLE => {
                    // An empty file has no byte 0, and a range of a file of unknown
                    // size cannot be split: ask again without a range.
                    let opened = self
                        .http
                        .open(&self.url, &self.headers, &self.guard)
                        .await?;
                    Ok((self.plain(opened)?, None))
                }
                _ => Ok((Start::Whole(response), None)),
            };
        };
        let size = kept.sidecar.size.unwrap_or(0);
        let Some(missing) = kept.ranges.missing(size).into_iter().next() else {
            return Ok((Start::Complete, Some(kept)));
        };
        let validator = Validator::of_sidecar(&kept.sidecar);
        let headers = self.request_headers(Some(missing.clone()), Some(&validator));
        let opened = self.http.open(&self.url, &headers, &self.guard).await?;
        let response = opened.response;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let range = self.check_partial(&response, missing, Some((&validator, size)))?;
                Ok((Start::Partial(response, range), Some(kept)))
            }
            // The server ignored the range, or If-Range saw another version:
            // this body is the whole (current) file, so start over with it.
            StatusCode::OK => Ok((Start::Whole(response), None)),
            // The file is shorter than what we kept: it changed.
            _ => Err(Error::SourceChanged {
                url: self.url.to_string(),
                detail: format!("a range request answered {}", response.status()),
            }),
        }
    }

    fn plain(&self, opened: http::Opened) -> Result<Start> {
        let response = opened.response;
        if response.status() == StatusCode::RANGE_NOT_SATISFIABLE {
            return Err(Error::Http {
                status: 416,
                url: opened.url.to_string(),
                retry_after: None,
            });
        }
        Ok(Start::Whole(response))
    }

    /// The size to expect: the caller's, checked against what the server announced.
    fn expected_size(&self, announced: Option<u64>) -> Result<Option<u64>> {
        match (self.options.size, announced) {
            (Some(size), Some(announced)) if size != announced => Err(Error::SizeMismatch {
                expected: size,
                actual: announced,
            }),
            (size, announced) => Ok(size.or(announced)),
        }
    }

    /// Checks that a 206 holds exactly the range asked for (cut at the file's
    /// end) of the expected version; returns the range it holds.
    fn check_partial(
        &self,
        response: &reqwest::Response,
        asked: Range<u64>,
        known: Option<(&Validator, u64)>,
    ) -> Result<Range<u64>> {
        let changed = |detail: String| Error::SourceChanged {
            url: self.url.to_string(),
            detail,
        };
        if let Some((validator, _)) = known {
            if validator.differs_from(response) {
                return Err(changed("its ETag or Last-Modified changed".into()));
            }
        }
        let Some(ContentRange::Bytes { first, last, total }) = http::content_range(response) else {
            return Err(Error::network(
                format!(
                    "{} answered a range request with a 206 without a usable Content-Range: the server is broken; try --connections 1",
                    self.url
                ),
                false,
            ));
        };
        if let (Some((_, size)), Some(total)) = (known, total) {
            if total != size {
                return Err(changed(format!(
                    "its size went from {size} to {total} bytes"
                )));
            }
        }
        let end = total.map_or(asked.end, |t| asked.end.min(t));
        if let Some(length) = response.content_length().filter(|l| *l != last + 1 - first) {
            return Err(Error::network(
                format!(
                    "{} sent a Content-Length of {length} for bytes {first}-{last}: the server or a proxy is broken; try --connections 1",
                    self.url
                ),
                true,
            ));
        }
        if first != asked.start || last + 1 != end {
            return Err(Error::network(
                format!(
                    "{} sent bytes {first}-{last} when asked for {}-{}: refusing to splice them in; try --connections 1",
                    self.url,
                    asked.start,
                    end - 1
                ),
                false,
            ));
        }
        Ok(asked.start..end)
    }

    /// Runs the connections over the missing ranges, then verifies and persists.
    async fn fetch_and_persist(
        &self,
        transfer: &Transfer,
        part: PartFile,
        kept: RangeSet,
        first_unit: Option<(reqwest::Response, Range<u64>)>,
    ) -> Result<(u64, Option<String>, String)> {
        let size = transfer.size;
        let sidecar = Sidecar {
            version: Sidecar::VERSION,
            url: self.url.to_string(),
            etag: transfer.validator.etag.clone(),
            last_modified: transfer.validator.last_modified.clone(),
            size,
            ranges_done: kept.to_pairs(),
        };
        if first_unit.is_some() {
            sidecar
                .store(&self.paths.sidecar, false)
                .map_err(|e| Error::storage("writing", &self.paths.sidecar, e))?;
        }
        let connections = self.connection_count(transfer, first_unit.as_ref());
        transfer.parallel.store(connections > 1, Ordering::Relaxed);
        // The first response holds the whole first missing range; with several
        // connections it serves only the first unit and the rest is queued.
        let mut first_unit = first_unit.map(|(response, range)| {
            let step = match size {
                Some(size) if connections > 1 => unit_size(size, connections),
                _ => u64::MAX,
            };
            let unit = range.start..range.end.min(range.start.saturating_add(step));
            (response, unit, range.end)
        });
        if let (Some(size), Some((_, unit, _))) = (size, first_unit.as_ref()) {
            let mut rest = kept.clone();
            rest.insert(unit.clone());
            let step = if connections > 1 {
                unit_size(size, connections)
            } else {
                u64::MAX
            };
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
                let first = if i == 0 { first_unit.take() } else { None };
                self.connection(transfer, &sink, first)
            });
            try_join_all(workers).await
        };
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

    fn connection_count(
        &self,
        transfer: &Transfer,
        first_unit: Option<&(reqwest::Response, Range<u64>)>,
    ) -> u32 {
        let ranged = first_unit.is_some_and(|(r, _)| r.status() == StatusCode::PARTIAL_CONTENT);
        if !ranged || !transfer.resumable() {
            return 1;
        }
        match (self.options.connections, transfer.size) {
            (Some(n), _) => n,
            (None, Some(size)) if size >= AUTO_PARALLEL_MIN => AUTO_CONNECTIONS,
            _ => 1,
        }
    }

    /// One connection: streams its first response (if any), then takes units from
    /// the queue until none is left. A failed unit is handed back and retried alone.
    async fn connection(
        &self,
        transfer: &Transfer,
        sink: &Sink,
        first: Option<(reqwest::Response, Range<u64>, u64)>,
    ) -> Result<()> {
        let mut next = first;
        loop {
            let (response, unit, holds_until) = match next.take() {
                Some(started) => started,
                None => {
                    let Some(unit) = transfer.next_unit() else {
                        return Ok(());
                    };
                    match self.open_unit(transfer, unit.clone()).await {
                        Ok(response) => (response, unit.clone(), unit.end),
                        Err(e) => {
                            self.retry_unit(transfer, e, unit).await?;
                            continue;
                        }
                    }
                }
            };
            let mut stream = sink.stream(unit.start);
            let streamed = self
                .stream_unit(response, &mut stream, &unit, holds_until)
                .await;
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
    async fn retry_unit(&self, transfer: &Transfer, error: Error, rest: Range<u64>) -> Result<()> {
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

    async fn open_unit(&self, transfer: &Transfer, unit: Range<u64>) -> Result<reqwest::Response> {
        let headers = self.request_headers(Some(unit.clone()), Some(&transfer.validator));
        let response = self
            .http
            .open(&self.url, &headers, &self.guard)
            .await?
            .response;
        if response.status() != StatusCode::PARTIAL_CONTENT {
            return Err(Error::SourceChanged {
                url: self.url.to_string(),
                detail: format!("a range request answered {}", response.status()),
            });
        }
        let size = transfer.size.unwrap_or(u64::MAX);
        self.check_partial(&response, unit, Some((&transfer.validator, size)))?;
        Ok(response)
    }

    /// Streams `unit` (its end `u64::MAX` when the size is unknown) from a
    /// response that holds the file up to `holds_until`; a response that holds
    /// more is dropped once the unit is complete.
    async fn stream_unit(
        &self,
        mut response: reqwest::Response,
        stream: &mut RangeStream,
        unit: &Range<u64>,
        holds_until: u64,
    ) -> Result<()> {
        let url = response.url().clone();
        let announced = response.content_length().is_some();
        loop {
            let chunk = self
                .guard
                .read(response.chunk())
                .await?
                .map_err(|e| self.http.transport_error(&e, &url))?;
            let Some(mut chunk) = chunk else { break };
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
            self.transferred
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
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
                    "the connection closed at byte {at} of {} from {url}",
                    unit.end
                ),
                true,
            ));
        }
        Ok(())
    }

    fn verify(&self, output: &SinkOutput, expected: Option<u64>) -> Result<()> {
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

/// About four units per connection, so that they finish close together, in
/// whole blocks of at most `MAX_UNIT`.
fn unit_size(size: u64, connections: u32) -> u64 {
    let block = BLOCK_SIZE as u64;
    let per = size / (u64::from(connections) * 4);
    (per / block * block).clamp(block, MAX_UNIT)
}

/// `ranges` cut into pieces of at most `step` bytes, in order.
fn split(ranges: Vec<Range<u64>>, step: u64) -> Vec<Range<u64>> {
    let mut units = Vec::new();
    for range in ranges {
        let mut at = range.start;
        while at < range.end {
            let end = range.end.min(at.saturating_add(step));
            units.push(at..end);
            at = end;
        }
    }
    units
}
