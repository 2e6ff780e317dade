//! `download_into`: stream → hash → part file → verify → fsync → rename → fsync dir,
//! with retries, timeouts and cancellation. This module holds the attempt loop
//! and the fall-back ladder; `open` asks and judges each request, `fetch` runs
//! the connections and persists.

mod fetch;
mod open;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use reqwest::header::HeaderMap;
use reqwest::Url;

use crate::buffer::BLOCK_SIZE;
use crate::cancel::CancelToken;
use crate::error::{Error, Result, TimeoutKind};
use crate::guard::Guard;
use crate::hash::{parse_digest, SHA256_HEX_LEN, XXH3_128_HEX_LEN};
use crate::http::{self, Http};
use crate::journal::{self, Level};
use crate::part::{self, remove_if_present, PartFile, PartLock, PartPaths, Sidecar};
use crate::ranges::RangeSet;
use crate::response::{Known, Validator};
use crate::schedule::{Target, Transfer};

pub use crate::options::{Options, Outcome, Progress};

/// Downloads `url` to `final_path`. Nothing appears at `final_path` unless it is
/// whole and verified; a failure leaves whatever was there untouched.
pub async fn download_into(
    url: &str,
    final_path: &Path,
    options: &Options,
    cancel: CancelToken,
    progress: Arc<Progress>,
) -> Result<Outcome> {
    let (outcome, _) = fetch_verified(url, final_path, options, cancel, progress, false).await?;
    Ok(outcome)
}

/// A verified file left at its part path for a group commit (`crate::batch`):
/// not yet synced nor renamed; its lock is held until it is dropped.
#[derive(Debug)]
pub struct Staged {
    pub part: PathBuf,
    pub destination: PathBuf,
    pub part_dir: PathBuf,
    /// The destination is named by the content's digest (`Options::install_by_digest`):
    /// two items that land on it bring the same bytes.
    pub content_addressed: bool,
    _lock: Option<PartLock>,
}

/// Like `download_into`, but leaves the verified file `Staged`: the caller
/// makes it durable and renames it, together with others. Nothing is staged
/// when a revalidation was answered `304` (`Outcome::not_modified`).
pub async fn download_staged(
    url: &str,
    final_path: &Path,
    options: &Options,
    cancel: CancelToken,
    progress: Arc<Progress>,
) -> Result<(Outcome, Option<Staged>)> {
    let (outcome, staged) =
        fetch_verified(url, final_path, options, cancel, progress, true).await?;
    match (&staged, outcome.not_modified) {
        (None, false) => Err(Error::internal("a deferred commit left nothing staged")),
        _ => Ok((outcome, staged)),
    }
}

async fn fetch_verified(
    url: &str,
    final_path: &Path,
    options: &Options,
    cancel: CancelToken,
    progress: Arc<Progress>,
    defer_commit: bool,
) -> Result<(Outcome, Option<Staged>)> {
    let started = Instant::now();
    let mut job = Job::new(url, final_path, options, cancel, progress)?;
    job.defer_commit = defer_commit;
    let made = part::missing_levels(job.paths.dir.parent().unwrap_or(Path::new(".")));
    let lock = match options.part_lock {
        true => Some(job.paths.lock().map_err(Error::before_writing)?),
        false => {
            job.paths.create_dir().map_err(Error::before_writing)?;
            None
        }
    };
    let result = job.run_with_retries().await;
    let not_modified = matches!(result, Err(Error::NotModified));
    let result = match result {
        Err(Error::NotModified) => Ok((0, None, String::new())),
        other => other,
    };
    let result = match result {
        Err(error) if error.keeps_part() => Err(job.what_is_kept(error)),
        Err(error) => {
            job.paths.discard();
            Err(error)
        }
        ok => ok,
    };
    let staged = match (&result, defer_commit && !not_modified) {
        (Ok(_), true) => Some(Staged {
            part: job.paths.part.clone(),
            destination: job.paths.destination().to_path_buf(),
            part_dir: job.paths.dir.clone(),
            content_addressed: false,
            _lock: lock,
        }),
        _ => {
            drop(lock);
            // Leaves the destination tidy when nothing else is in progress there.
            let _ = std::fs::remove_dir(&job.paths.dir);
            if result.is_err() {
                part::remove_made(&made); // a failed download leaves no directory it made
            }
            None
        }
    };
    let (size, sha256, xxh3_128) = result?;
    let outcome = Outcome {
        path: job.paths.destination().to_path_buf(),
        size,
        sha256,
        xxh3_128,
        resumed_from: match job.resumed_from.load(Ordering::Relaxed) {
            NOT_YET => 0,
            kept => kept,
        },
        bytes_transferred: job.transferred.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        not_modified,
        etag: job.known().and_then(|k| k.validator.etag),
        last_modified: job.known().and_then(|k| k.validator.last_modified),
    };
    Ok((outcome, staged))
}

/// `Job::resumed_from` before an attempt reached the server.
const NOT_YET: u64 = u64::MAX;
/// Resumed ranges are cut to this alignment, so writes can stay `O_DIRECT`.
const RESUME_ALIGN: u64 = 4096;
/// A unit's response may start this much before the unit (a server that aligns
/// ranges); more, and ranges are too costly to split on.
const UNIT_MAX_SKIP: u64 = BLOCK_SIZE as u64;
/// Fresh starts after the file changed on the server, beyond the retries.
const MAX_RESTARTS: u32 = 2;

/// What an attempt finds of an earlier call (`Job::load_kept`).
enum Resume {
    /// No sidecar: nothing to resume, and nothing to remove first.
    NoSidecar,
    /// A sidecar that cannot be used (another URL, no validator, corrupt, its part
    /// gone or of another size): removed, and the download starts over.
    StartOver,
    Kept(Kept),
}

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
    host_credentials: http::HostCredentials,
    http: Http,
    guard: Guard,
    progress: Arc<Progress>,
    transferred: AtomicU64,
    resumed_from: AtomicU64,
    retries_used: AtomicU32,
    /// The version (validator and size) this call last worked on, until it
    /// changed: a plain answer that contradicts it is not the whole file.
    known: Mutex<Option<Known>>,
    /// Leave the verified part for a group commit instead of syncing and renaming it.
    defer_commit: bool,
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
        // (Installed by digest, `final_path` is a name of the cache's own, never a directory.)
        if options.install_by_digest.is_none() && final_path.is_dir() {
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
        // Silence longer than the low-speed window is below any limit, and said as such.
        let read = options.read_timeout.map(|r| (r, TimeoutKind::Read));
        let idle = match options.speed_limit {
            0 => read,
            limit => {
                let low_speed = (options.speed_time, TimeoutKind::LowSpeed(limit));
                Some(
                    read.filter(|(r, _)| *r <= options.speed_time)
                        .unwrap_or(low_speed),
                )
            }
        };
        Ok(Self {
            paths: PartPaths::new(final_path)?,
            headers: http::request_headers(&options.headers)?,
            host_credentials: http::HostCredentials::parse(&options.host_credentials)?,
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
            defer_commit: false,
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
                    journal::note(
                        Level::Warning,
                        format!(
                            "{}: {detail}; continuing {}",
                            self.shown_url,
                            match mode {
                                Mode::Plain => "without Range (a plain request)",
                                _ => "on one connection",
                            }
                        ),
                    );
                }
                Error::SourceChanged { ref detail, .. } if restarts < MAX_RESTARTS => {
                    journal::note(
                        Level::Warning,
                        format!(
                            "{}: the file changed on the server ({detail}); starting over",
                            self.shown_url
                        ),
                    );
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
                    journal::note(
                        Level::Info,
                        format!(
                            "{}: retry {} of {} after: {error}",
                            self.shown_url,
                            retry + 1,
                            self.options.retries
                        ),
                    );
                    self.backoff(retry, &error).await?;
                    resume = mode != Mode::Plain;
                }
                error => return Err(error),
            }
        }
    }

    /// `error`, one that keeps the part, with what the part holds for the next call
    /// to resume; when it holds nothing a later call could resume (no sidecar: a small
    /// body, or nothing received yet), the part is removed and `error` is as it was.
    fn what_is_kept(&self, error: Error) -> Error {
        match self.load_kept() {
            Ok(Resume::Kept(kept)) if !kept.ranges.is_empty() => Error::PartKept {
                error: Box::new(error),
                note: format!(
                    "the {} bytes received are kept in {}: run the same download again to resume",
                    kept.ranges.len(),
                    self.paths.part.display()
                ),
            },
            _ => {
                self.paths.discard();
                error
            }
        }
    }

    /// What the sidecar and part file allow to keep.
    fn load_kept(&self) -> Result<Resume> {
        let sidecar = match Sidecar::read(&self.paths.sidecar) {
            Ok(Some(sidecar)) => sidecar,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Resume::NoSidecar),
            _ => return Ok(Resume::StartOver),
        };
        let usable = sidecar.url == self.shown_url
            && (sidecar.etag.is_some() || sidecar.last_modified.is_some())
            && sidecar
                .size
                .is_some_and(|s| self.options.size.is_none_or(|e| e == s));
        let Some(size) = sidecar.size.filter(|_| usable) else {
            return Ok(Resume::StartOver);
        };
        let Some(part) = PartFile::open_existing(&self.paths.part, size, self.options.durable)?
        else {
            return Ok(Resume::StartOver);
        };
        let ranges = RangeSet::from_pairs(&sidecar.ranges_done).clamp_aligned(size, RESUME_ALIGN);
        Ok(Resume::Kept(Kept {
            sidecar,
            ranges,
            part,
        }))
    }

    /// One attempt: continue what `kept` holds (or start fresh), fetch what is
    /// missing over one or more connections, verify, persist.
    async fn attempt(&self, mode: Mode, resume: bool) -> Result<(u64, Option<String>, String)> {
        let found = if resume && mode != Mode::Plain {
            self.load_kept()?
        } else {
            Resume::StartOver
        };
        let kept = match found {
            Resume::Kept(kept) => Some(kept),
            Resume::NoSidecar => None, // (most calls: nothing to remove)
            Resume::StartOver => {
                // The sidecar goes first: it must never describe the new part. The old
                // part itself is replaced when the new one is created (`PartFile::create`),
                // and a temporary sidecar a killed process left when the next one is stored.
                let _ = remove_if_present(&self.paths.sidecar);
                None
            }
        };
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
}

/// Statuses that, answering a range request, say "not with ranges here" rather
/// than "try later": the request is made again without `Range`.
fn ranges_refused(status: u16) -> bool {
    !matches!(status, 408 | 429 | 502 | 503 | 504)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ladder_ends_with_a_plain_request() {
        assert_eq!(Mode::Parallel.fewer_ranges(), Some(Mode::Single));
        assert_eq!(Mode::Single.fewer_ranges(), Some(Mode::Plain));
        assert_eq!(Mode::Plain.fewer_ranges(), None);
        assert!(Mode::Parallel < Mode::Single && Mode::Single < Mode::Plain);
    }

    #[test]
    fn try_later_statuses_are_not_a_refusal_of_ranges() {
        for status in [408, 429, 502, 503, 504] {
            assert!(!ranges_refused(status), "{status}");
        }
        for status in [400, 403, 404, 416, 500, 501] {
            assert!(ranges_refused(status), "{status}");
        }
    }
}
