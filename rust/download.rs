//! `download_into`: stream → hash → part file → verify → fsync → rename → fsync dir,
//! with retries, timeouts and cancellation.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::Url;

use crate::atomic;
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::guard::Guard;
use crate::hash::{parse_digest, SHA256_HEX_LEN, XXH3_128_HEX_LEN};
use crate::http::{self, Http};
use crate::part::{file_mode, PartFile, PartLock, PartPaths, Sidecar};
use crate::retry::Backoff;
use crate::sink::{Sink, SinkOutput};

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
    job.paths.create_dir()?;
    let lock = PartLock::acquire(&job.paths.lock)?;
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
        resumed_from: 0,
        bytes_transferred: job.transferred.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    })
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
        })
    }

    async fn run_with_retries(&self) -> Result<(u64, Option<String>, String)> {
        let mut retry = 0;
        loop {
            self.guard.check()?;
            match self.attempt().await {
                Err(e) if e.is_retryable() && retry < self.options.retries => {
                    let retry_after = match &e {
                        Error::Http { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    self.guard
                        .sleep(self.options.backoff.delay_for(retry, retry_after))
                        .await?;
                    retry += 1;
                }
                other => return other,
            }
        }
    }

    /// One request: open, stream into a fresh part file, verify, persist.
    async fn attempt(&self) -> Result<(u64, Option<String>, String)> {
        let opened = self
            .http
            .open(&self.url, &self.headers, &self.guard)
            .await?;
        let mut response = opened.response;
        let announced = response.content_length();
        let expected = match (self.options.size, announced) {
            (Some(size), Some(announced)) if size != announced => {
                return Err(Error::SizeMismatch {
                    expected: size,
                    actual: announced,
                })
            }
            (size, announced) => size.or(announced),
        };
        self.progress.set_total(expected);
        self.progress.set_done(0);
        let (etag, last_modified) = http::validators(&response);
        let sidecar = Sidecar {
            version: Sidecar::VERSION,
            url: self.url.to_string(),
            etag,
            last_modified,
            size: expected,
            ranges_done: Vec::new(),
        };
        let part = PartFile::create(&self.paths.part, expected, self.options.durable)?;
        self.store_sidecar(&sidecar)?;
        let with_sha256 = self.options.compute_sha256 || self.expected_sha256.is_some();
        let mut sink = Sink::new(part, with_sha256);
        if let Err(e) = self
            .stream_body(&mut response, &mut sink, expected, announced, &opened.url)
            .await
        {
            let written = sink.abort().await;
            if e.keeps_part() {
                let sidecar = Sidecar {
                    ranges_done: vec![[0, written]],
                    ..sidecar
                };
                let _ = self.store_sidecar(&sidecar);
            }
            return Err(e);
        }
        let output = sink.finish().await?;
        self.verify(&output, expected)?;
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
        let _ = std::fs::remove_file(&self.paths.sidecar);
        Ok((len, sha256, xxh3_128))
    }

    async fn stream_body(
        &self,
        response: &mut reqwest::Response,
        sink: &mut Sink,
        expected: Option<u64>,
        announced: Option<u64>,
        url: &Url,
    ) -> Result<()> {
        loop {
            let chunk = self
                .guard
                .read(response.chunk())
                .await?
                .map_err(|e| self.http.transport_error(&e, url))?;
            let Some(chunk) = chunk else { break };
            let received = sink.received() + chunk.len() as u64;
            if let Some(expected) = expected.filter(|&e| received > e) {
                // Never write past the expected size.
                return Err(Error::SizeMismatch {
                    expected,
                    actual: received,
                });
            }
            self.transferred
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            sink.push(&chunk, &self.guard).await?;
            self.progress.set_done(received);
        }
        let received = sink.received();
        match expected {
            Some(expected) if received < expected && announced == Some(expected) => {
                Err(Error::network(
                    format!(
                        "the connection closed after {received} of {expected} bytes from {url}"
                    ),
                    true,
                ))
            }
            Some(expected) if received != expected => Err(Error::SizeMismatch {
                expected,
                actual: received,
            }),
            _ => Ok(()),
        }
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

    fn store_sidecar(&self, sidecar: &Sidecar) -> Result<()> {
        sidecar
            .store(&self.paths.sidecar, self.options.durable)
            .map_err(|e| Error::storage("writing", &self.paths.sidecar, e))
    }
}
