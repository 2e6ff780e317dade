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
use crate::error::{Error, Result, TimeoutKind};
use crate::guard::Guard;
use crate::hash::{parse_digest, SHA256_HEX_LEN, XXH3_128_HEX_LEN};
use crate::http::{self, Http};
use crate::part::{file_mode, PartFile, PartPaths, Sidecar};
use crate::ranges::RangeSet;
use crate::response::{judge, Asked, Comparison, Known, Seen, Unusable, Validator, Verdict};
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
    /// Low-speed limit in bytes per second (0: off): a response slower than this
    /// over `speed_time` is a stall, retried (curl's `--speed-limit`).
    pub speed_limit: u64,
    pub speed_time: Duration,
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
            speed_limit: 1024,
            speed_time: Duration::from_secs(30),
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
    let lock = job.paths.lock()?;
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
/// A unit's response may start this much before the unit (a server that aligns
/// ranges); more, and ranges are too costly to split on.
const UNIT_MAX_SKIP: u64 = BLOCK_SIZE as u64;
/// Fresh starts after the file changed on the server, beyond the retries.
const MAX_RESTARTS: u32 = 2;

/// What an earlier, interrupted call left that this one can build on.
struct Kept {
    sidecar: Sidecar,
    ranges: RangeSet,
    part: PartFile,
}

impl Kept {
    fn known(&self) -> Option<Known> {
        Some(Known {
            validator: validator_of_sidecar(&self.sidecar),
            total: self.sidecar.size?,
        })
    }
}

fn validator_of_sidecar(sidecar: &Sidecar) -> Validator {
    Validator {
        etag: sidecar.etag.clone(),
        last_modified: sidecar.last_modified.clone(),
    }
}

/// How much an attempt relies on the server's ranges. A server that mishandles
/// them moves the call down this ladder, within the same call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    /// Ranges to resume, and several connections for a large file.
    Parallel,
    /// Ranges to resume, one connection.
    Single,
    /// No `Range` at all: the whole file in one response, every attempt.
    Plain,
}

impl Mode {
    fn fewer_ranges(self) -> Option<Self> {
        match self {
            Mode::Parallel => Some(Mode::Single),
            Mode::Single => Some(Mode::Plain),
            Mode::Plain => None,
        }
    }
}

/// Where requests go once redirects are resolved, and with which headers
/// (credentials already dropped if a redirect left the origin).
#[derive(Clone)]
struct Target {
    url: Url,
    headers: HeaderMap,
}

/// The transfer of one version of the file, once its size and validator are known.
struct Transfer {
    size: Option<u64>,
    validator: Validator,
    /// Units not yet taken by a connection, lowest offset first.
    queue: Mutex<VecDeque<Range<u64>>>,
    /// Several connections: a failed unit is retried alone. (One connection
    /// retries through a new attempt.)
    parallel: AtomicBool,
    /// Resolved once per attempt; units go there directly.
    target: Mutex<Target>,
}

impl Transfer {
    fn new(size: Option<u64>, validator: Validator, target: Target) -> Self {
        Self {
            size,
            validator,
            queue: Mutex::new(VecDeque::new()),
            parallel: AtomicBool::new(false),
            target: Mutex::new(target),
        }
    }

    /// Range requests (to resume, retry or split) are only safe with a validator
    /// for If-Range and a known size.
    fn resumable(&self) -> bool {
        self.size.is_some() && self.validator.if_range().is_some()
    }

    fn known(&self) -> Option<Known> {
        Some(Known {
            validator: self.validator.clone(),
            total: self.size?,
        })
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

    fn target(&self) -> Target {
        self.target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn retarget(&self, target: Target) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }
}

/// A response body that holds the file's bytes from `start` up to `holds_until`
/// (exclusive; `u64::MAX` when unknown).
struct Body {
    response: reqwest::Response,
    start: u64,
    holds_until: u64,
}

/// How the first response of an attempt starts the transfer.
enum Start {
    /// The whole body from offset 0 (a 200): a fresh start.
    Whole(reqwest::Response, Option<u64>, Target),
    /// A 206 that holds the range asked for (`asked`) of the kept part, or of a
    /// new one (`total` bytes).
    Partial {
        body: Body,
        asked: Range<u64>,
        total: Option<u64>,
        target: Target,
    },
    /// Nothing to fetch: the kept part already holds the whole file.
    Complete,
}

struct Job<'a> {
    url: Url,
    /// The URL as messages show it (no password).
    shown_url: String,
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
    /// The version (validator and size) this call last worked on, until it
    /// changed: a plain answer that contradicts it is not the whole file.
    known: Mutex<Option<Known>>,
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
        // Silence longer than the low-speed window is below any limit.
        let idle = match options.speed_limit {
            0 => options.read_timeout,
            _ => Some(
                options
                    .read_timeout
                    .map_or(options.speed_time, |r| r.min(options.speed_time)),
            ),
        };
        Ok(Self {
            paths: PartPaths::new(final_path)?,
            headers: http::request_headers(&options.headers)?,
            http: Http::shared(options.connect_timeout)?,
            guard: Guard::new(cancel, options.timeout, idle),
            shown_url: http::redact(&url),
            url,
            options,
            expected_sha256,
            expected_xxh3,
            progress,
            transferred: AtomicU64::new(0),
            resumed_from: AtomicU64::new(NOT_YET),
            retries_used: AtomicU32::new(0),
            known: Mutex::new(None),
        })
    }

    fn known(&self) -> Option<Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_known(&self, known: Option<Known>) {
        *self.known.lock().unwrap_or_else(|e| e.into_inner()) = known;
    }

    fn origin(&self) -> Target {
        Target {
            url: self.url.clone(),
            headers: self.headers.clone(),
        }
    }

    fn changed(&self, detail: String) -> Error {
        Error::SourceChanged {
            url: self.shown_url.clone(),
            detail,
        }
    }

    /// An attempt's first request answered unusably: asking the same again with
    /// one connection would not help, so the next attempt sends no `Range`.
    fn unusable(&self, detail: String) -> Error {
        Error::Unusable {
            url: self.shown_url.clone(),
            detail,
            unit: false,
        }
    }

    /// A unit answered unusably: the next attempt continues on one connection.
    fn unusable_unit(&self, detail: String) -> Error {
        Error::Unusable {
            url: self.shown_url.clone(),
            detail,
            unit: true,
        }
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
    /// A retry continues from what the failed attempt kept. A file that changed
    /// on the server starts over on one connection; a server that mishandles
    /// ranges is asked with fewer of them (parallel → one connection → none),
    /// neither costing a retry.
    async fn run_with_retries(&self) -> Result<(u64, Option<String>, String)> {
        let mut mode = match self.options.connections {
            Some(1) => Mode::Single,
            _ => Mode::Parallel,
        };
        let mut resume = self.options.resume;
        let mut restarts = 0;
        loop {
            self.guard.check()?;
            let error = match self.attempt(mode, resume).await {
                Ok(done) => return Ok(done),
                Err(e) => e,
            };
            match error {
                Error::Unusable {
                    ref detail, unit, ..
                } => {
                    let Some(next) = mode.fewer_ranges() else {
                        return Err(Error::network(
                            format!(
                                "{} answered even a plain request without Range in a way that cannot be used ({detail}): the server or a proxy is broken; nothing was installed",
                                self.shown_url
                            ),
                            false,
                        ));
                    };
                    mode = if unit { next } else { Mode::Plain };
                    resume = mode != Mode::Plain;
                }
                Error::SourceChanged { .. } if restarts < MAX_RESTARTS => {
                    restarts += 1;
                    self.set_known(None);
                    self.paths.discard();
                    mode = mode.max(Mode::Single);
                    resume = false;
                }
                error if error.is_retryable() => {
                    let Some(retry) = self.take_retry() else {
                        return Err(error);
                    };
                    self.backoff(retry, &error).await?;
                    resume = mode != Mode::Plain;
                }
                error => return Err(error),
            }
        }
    }

    /// What the sidecar and part file allow to keep; `None` means start over.
    fn load_kept(&self) -> Result<Option<Kept>> {
        let Some(sidecar) = Sidecar::load(&self.paths.sidecar) else {
            return Ok(None);
        };
        let usable = sidecar.url == self.shown_url
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

    /// `base` with `Range` (an end of `u64::MAX` asks to the end) and `If-Range`.
    fn ranged(base: &HeaderMap, range: &Range<u64>, validator: Option<&Validator>) -> HeaderMap {
        let mut headers = base.clone();
        let value = if range.end == u64::MAX {
            format!("bytes={}-", range.start)
        } else {
            format!("bytes={}-{}", range.start, range.end - 1)
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(header::RANGE, value);
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
    async fn attempt(&self, mode: Mode, resume: bool) -> Result<(u64, Option<String>, String)> {
        let kept = if resume && mode != Mode::Plain {
            self.load_kept()?
        } else {
            None
        };
        if kept.is_none() {
            self.paths.discard();
        }
        let (start, kept) = match kept {
            Some(kept) => self.open_kept(kept).await?,
            None => (self.open_fresh(mode).await?, None),
        };
        // What an earlier call left and this one builds on (0 if it started over),
        // as the first attempt that reached the server found it.
        let kept_bytes = kept.as_ref().map_or(0, |k| k.ranges.len());
        let _ = self.resumed_from.compare_exchange(
            NOT_YET,
            kept_bytes,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        let (transfer, part, ranges, first) = match start {
            Start::Whole(response, total, target) => {
                let size = self.expected_size(total)?;
                let validator = Validator::of(response.headers());
                let transfer = Transfer::new(size, validator, target);
                let part = PartFile::create(&self.paths.part, size, self.options.durable)?;
                let unit = 0..size.unwrap_or(u64::MAX);
                let body = Body {
                    response,
                    start: 0,
                    holds_until: unit.end,
                };
                (transfer, part, RangeSet::new(), Some((body, unit)))
            }
            Start::Partial {
                body,
                asked,
                total,
                target,
            } => {
                let (transfer, part, ranges) = match kept {
                    Some(kept) => {
                        let validator = validator_of_sidecar(&kept.sidecar);
                        let transfer = Transfer::new(kept.sidecar.size, validator, target);
                        (transfer, kept.part, kept.ranges)
                    }
                    None => {
                        let size = self.expected_size(total)?;
                        let validator = Validator::of(body.response.headers());
                        let transfer = Transfer::new(size, validator, target);
                        let part = PartFile::create(&self.paths.part, size, self.options.durable)?;
                        (transfer, part, RangeSet::new())
                    }
                };
                let end = transfer.size.map_or(asked.end, |s| asked.end.min(s));
                (transfer, part, ranges, Some((body, asked.start..end)))
            }
            Start::Complete => {
                let kept =
                    kept.ok_or_else(|| Error::internal("a complete start without a part"))?;
                let transfer =
                    Transfer::new(kept.sidecar.size, Validator::default(), self.origin());
                (transfer, kept.part, kept.ranges, None)
            }
        };
        if let Some(known) = transfer
            .known()
            .filter(|k| k.validator.if_range().is_some())
        {
            self.set_known(Some(known));
        }
        self.fetch_and_persist(&transfer, part, ranges, first).await
    }

    /// Asks for the first range `kept` is missing, under the validator it was
    /// recorded with (`If-Range`).
    async fn open_kept(&self, kept: Kept) -> Result<(Start, Option<Kept>)> {
        let size = kept.sidecar.size.unwrap_or(0);
        let Some(missing) = kept.ranges.missing(size).into_iter().next() else {
            return Ok((Start::Complete, Some(kept)));
        };
        // Open-ended to the end of the file: no large range end for servers to trip on.
        let end = if missing.end >= size {
            u64::MAX
        } else {
            missing.end
        };
        let asked = Asked {
            range: Some(missing.start..end),
            max_skip: u64::MAX,
        };
        let known = kept.known();
        self.set_known(known.clone());
        let validator = validator_of_sidecar(&kept.sidecar);
        let headers = Self::ranged(&self.headers, &(missing.start..end), Some(&validator));
        let opened = match self.http.open(&self.url, &headers, &self.guard).await {
            Err(Error::Http { status, .. }) if ranges_refused(status) => {
                return Ok((self.open_plain().await?, None));
            }
            other => other?,
        };
        let seen = Seen::of(&opened.response);
        match judge(&asked, known.as_ref(), &seen) {
            Verdict::Part { body, total } => {
                let target = Target {
                    url: opened.url,
                    headers: opened.headers,
                };
                let body = Body {
                    response: opened.response,
                    start: body.start,
                    holds_until: body.end,
                };
                let asked = missing.start..end;
                let start = Start::Partial {
                    body,
                    asked,
                    total,
                    target,
                };
                Ok((start, Some(kept)))
            }
            // The server ignored the range, or If-Range saw another version:
            // this body is the whole (current) file, so start over with it.
            Verdict::Whole { total } => {
                let target = Target {
                    url: opened.url,
                    headers: opened.headers,
                };
                Ok((Start::Whole(opened.response, total, target), None))
            }
            Verdict::Unusable(Unusable::Untrusted(detail)) => Err(self.changed(detail)),
            Verdict::Unusable(Unusable::Misfit(detail)) if seen.status == 416 => {
                let _ = detail;
                Ok((self.open_plain().await?, None))
            }
            Verdict::Unusable(Unusable::Misfit(detail)) => Err(self.unusable(detail)),
        }
    }

    /// A fresh start. With several connections possible, asks for `bytes=0-`, so
    /// that a `206` tells the size and that ranges work; otherwise a plain GET.
    async fn open_fresh(&self, mode: Mode) -> Result<Start> {
        if mode != Mode::Parallel {
            return self.open_plain().await;
        }
        let whole = 0..u64::MAX;
        let asked = Asked {
            range: Some(whole.clone()),
            max_skip: 0,
        };
        let headers = Self::ranged(&self.headers, &whole, None);
        let opened = match self.http.open(&self.url, &headers, &self.guard).await {
            // Ranges unusable here: ask once more without one.
            Err(Error::Http { status, .. }) if ranges_refused(status) => {
                return self.open_plain().await
            }
            other => other?,
        };
        let target = Target {
            url: opened.url,
            headers: opened.headers,
        };
        match judge(&asked, None, &Seen::of(&opened.response)) {
            Verdict::Part {
                body,
                total: Some(total),
            } => Ok(Start::Partial {
                body: Body {
                    response: opened.response,
                    start: body.start,
                    holds_until: body.end,
                },
                asked: whole,
                total: Some(total),
                target,
            }),
            Verdict::Whole { total } => Ok(Start::Whole(opened.response, total, target)),
            // An empty file has no byte 0 (416), and a range of a file of unknown
            // size cannot be split: ask again without a range.
            Verdict::Part { total: None, .. } => self.open_plain().await,
            Verdict::Unusable(Unusable::Misfit(_)) if opened.response.status() == 416 => {
                self.open_plain().await
            }
            Verdict::Unusable(Unusable::Misfit(detail) | Unusable::Untrusted(detail)) => {
                Err(self.unusable(detail))
            }
        }
    }

    /// A GET without `Range`, which must be answered with the whole file.
    async fn open_plain(&self) -> Result<Start> {
        let known = self.known();
        let opened = self
            .http
            .open(&self.url, &self.headers, &self.guard)
            .await?;
        let asked = Asked {
            range: None,
            max_skip: 0,
        };
        let status = opened.response.status();
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            return Err(Error::Http {
                status: 416,
                url: http::redact(&opened.url),
                retry_after: None,
            });
        }
        match judge(&asked, known.as_ref(), &Seen::of(&opened.response)) {
            Verdict::Whole { total } => {
                let target = Target {
                    url: opened.url,
                    headers: opened.headers,
                };
                Ok(Start::Whole(opened.response, total, target))
            }
            Verdict::Part { .. } => Err(self.unusable("a plain request was answered 206".into())),
            Verdict::Unusable(Unusable::Misfit(detail) | Unusable::Untrusted(detail)) => {
                Err(self.unusable(detail))
            }
        }
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

    /// Runs the connections over the missing ranges, then verifies and persists.
    async fn fetch_and_persist(
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

    /// Asks for one unit where the attempt's first request was redirected to,
    /// resolving again from the original URL when that place refuses (a signed
    /// URL that expired).
    async fn open_unit(&self, transfer: &Transfer, unit: Range<u64>) -> Result<Body> {
        let size = transfer.size.unwrap_or(u64::MAX);
        let range = unit.start..if unit.end >= size { u64::MAX } else { unit.end };
        let target = transfer.target();
        let headers = Self::ranged(&target.headers, &range, Some(&transfer.validator));
        let opened = match self.http.open(&target.url, &headers, &self.guard).await {
            Err(Error::Http { status, .. })
                if matches!(status, 401 | 403 | 410) && target.url != self.url =>
            {
                let headers = Self::ranged(&self.headers, &range, Some(&transfer.validator));
                let opened = self.http.open(&self.url, &headers, &self.guard).await;
                if let Ok(opened) = &opened {
                    transfer.retarget(Target {
                        url: opened.url.clone(),
                        headers: opened.headers.clone(),
                    });
                }
                opened
            }
            other => other,
        };
        let opened = match opened {
            Err(Error::Http { status, .. }) if ranges_refused(status) => {
                return Err(self.unusable_unit(format!("a range request was answered {status}")))
            }
            other => other?,
        };
        let asked = Asked {
            range: Some(range),
            max_skip: UNIT_MAX_SKIP,
        };
        let known = transfer.known();
        let seen = Seen::of(&opened.response);
        match judge(&asked, known.as_ref(), &seen) {
            Verdict::Part { body, .. } => Ok(Body {
                response: opened.response,
                start: body.start,
                holds_until: body.end,
            }),
            Verdict::Whole { .. }
                if transfer.validator.compare(&seen.validator) == Comparison::Other =>
            {
                Err(self.changed("its ETag or Last-Modified changed".into()))
            }
            Verdict::Whole { .. } => {
                Err(self.unusable_unit("a range request was answered 200".into()))
            }
            Verdict::Unusable(Unusable::Untrusted(detail)) => Err(self.changed(detail)),
            Verdict::Unusable(Unusable::Misfit(detail)) => Err(self.unusable_unit(detail)),
        }
    }

    /// Streams `unit` (its end `u64::MAX` when the size is unknown) from `body`,
    /// skipping what it holds before the unit; a body that holds more is dropped
    /// once the unit is complete.
    async fn stream_unit(
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
        let mut meter = SpeedMeter::new(self.options.speed_limit, self.options.speed_time);
        loop {
            let chunk = self
                .guard
                .read(response.chunk())
                .await?
                .map_err(|e| self.http.transport_error(&e, &url))?;
            let Some(mut chunk) = chunk else { break };
            self.transferred
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            meter.record(chunk.len() as u64)?;
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

/// Statuses that, answering a range request, say "not with ranges here" rather
/// than "try later": the request is made again without `Range`.
fn ranges_refused(status: u16) -> bool {
    !matches!(status, 408 | 429 | 502 | 503 | 504)
}

/// curl's low-speed limit: a response that delivers fewer than `limit` bytes a
/// second over `window` is stalled (retried, and resumed where it can be).
struct SpeedMeter {
    limit: u64,
    window: Duration,
    since: Instant,
    bytes: u64,
}

impl SpeedMeter {
    fn new(limit: u64, window: Duration) -> Self {
        Self {
            limit,
            window,
            since: Instant::now(),
            bytes: 0,
        }
    }

    fn record(&mut self, bytes: u64) -> Result<()> {
        if self.limit == 0 {
            return Ok(());
        }
        self.bytes += bytes;
        let elapsed = self.since.elapsed();
        if elapsed < self.window {
            return Ok(());
        }
        if (self.bytes as f64) < self.limit as f64 * elapsed.as_secs_f64() {
            return Err(Error::Timeout {
                kind: TimeoutKind::LowSpeed(self.limit),
                after: elapsed,
            });
        }
        self.since = Instant::now();
        self.bytes = 0;
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
