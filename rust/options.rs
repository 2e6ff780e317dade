//! What a caller asks of a download, how far it got, and what it returns.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::retry::Backoff;

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
    /// `Authorization` values by host (`""`: any other) for redirects that leave
    /// the origin: netrc's entries (`http::HostCredentials`).
    pub host_credentials: Vec<(String, String)>,
    /// Parallel ranged connections; `None` chooses (one for small files).
    pub connections: Option<u32>,
    /// Continue a part file an earlier call left, when it is safe to.
    pub resume: bool,
    /// Revalidation (RFC 9110 §13.1): a fresh start sends these, and a `304`
    /// ends the call with `Outcome::not_modified` and nothing written.
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<String>,
    /// Name the file after the first response's Content-Disposition filename
    /// (a bare name, beside `final_path`) instead; see `PartPaths::name_after_server`.
    pub content_disposition: bool,
    /// Low-speed limit in bytes per second (0: off): a response slower than this
    /// over `speed_time` is a stall, retried (curl's `--speed-limit`).
    pub speed_limit: u64,
    pub speed_time: Duration,
    /// Take the part lock (`<name>.lock` beside the part file). `false`: the caller
    /// holds a lock that covers this destination (the cache's artifact lock), so a
    /// lock file of the engine's own would only cost a file creation.
    pub part_lock: bool,
    /// In a batch (`batch::download_batch`), install the verified file at
    /// `<dir>/<its SHA-256's first two hex digits>/<its SHA-256>` instead of its
    /// destination: a content-addressed store, whose shard directories the caller has
    /// created and checked. Needs `compute_sha256`.
    pub install_by_digest: Option<PathBuf>,
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
            host_credentials: Vec::new(),
            connections: None,
            resume: true,
            content_disposition: false,
            if_none_match: None,
            if_modified_since: None,
            speed_limit: 1024,
            speed_time: Duration::from_secs(30),
            part_lock: true,
            install_by_digest: None,
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

    pub(crate) fn set_total(&self, total: Option<u64>) {
        self.total
            .store(total.unwrap_or(Self::UNKNOWN), Ordering::Relaxed);
    }

    pub(crate) fn set_done(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
    }

    pub(crate) fn add_done(&self, bytes: u64) {
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
    /// The server answered a conditional request `304`: nothing was written.
    pub not_modified: bool,
    /// The validators of the representation received (for a later revalidation).
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_python_api() {
        let options = Options::default();
        assert_eq!(options.read_timeout, Some(Duration::from_secs(30)));
        assert_eq!(options.connect_timeout, Duration::from_secs(30));
        assert_eq!(options.retries, 3);
        assert_eq!(options.speed_limit, 1024);
        assert_eq!(options.speed_time, Duration::from_secs(30));
        assert!(options.resume && options.durable && options.compute_sha256);
    }

    #[test]
    fn progress_reports_an_unknown_total_as_none() {
        let progress = Progress::new();
        assert_eq!(progress.get(), (0, None));
        progress.set_total(Some(10));
        progress.set_done(4);
        progress.add_done(2);
        assert_eq!(progress.get(), (6, Some(10)));
        progress.set_total(None);
        assert_eq!(progress.get(), (6, None));
    }
}
