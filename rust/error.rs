//! The engine's error type. `bindings` maps each variant to one exception class
//! of `surefetch.errors`; nothing here knows about Python.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which timeout expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    Connect,
    Read,
    Overall,
    /// Below the low-speed limit (bytes per second) for the window.
    LowSpeed(u64),
}

#[derive(Debug)]
pub enum Error {
    /// The caller passed something unusable (bad URL, bad digest...).
    InvalidArgument(String),
    /// The server answered with a non-success status.
    Http {
        status: u16,
        url: String,
        retry_after: Option<Duration>,
    },
    /// Connecting, reading or a redirect failed. `retryable` marks transient failures.
    Network {
        message: String,
        retryable: bool,
    },
    Timeout {
        kind: TimeoutKind,
        after: Duration,
    },
    Cancelled,
    ChecksumMismatch {
        algorithm: &'static str,
        expected: String,
        actual: String,
    },
    SizeMismatch {
        expected: u64,
        actual: u64,
    },
    /// A local filesystem operation failed (ENOSPC, EIO, EXDEV, EACCES...).
    Storage {
        operation: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The file on the server changed during the transfer (validator, size or
    /// range support differ): the transfer starts over rather than mix versions.
    SourceChanged {
        url: String,
        detail: String,
    },
    /// The server answered in a way that cannot be used for what was asked
    /// (it mishandles ranges): the engine asks again with fewer ranges.
    Unusable {
        url: String,
        detail: String,
        /// Answering one unit of a parallel transfer (not an attempt's first request).
        unit: bool,
    },
    /// A conditional request was answered `304 Not Modified` (not a failure: the
    /// engine turns it into `Outcome::not_modified`).
    NotModified,
    /// Another process holds the part file of this destination.
    Busy {
        path: PathBuf,
    },
}

impl Error {
    pub fn network(message: impl Into<String>, retryable: bool) -> Self {
        Error::Network {
            message: message.into(),
            retryable,
        }
    }

    /// A bug, reported as such (a non-retryable network error, so the part is kept).
    pub fn internal(what: &str) -> Self {
        Error::network(format!("internal error: {what}; please report this"), false)
    }

    pub fn storage(operation: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Storage {
            operation,
            path: path.into(),
            source,
        }
    }

    /// Whether another attempt may succeed: connect errors, cut bodies, 5xx, 408, 429.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Network { retryable, .. } => *retryable,
            Error::Http { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Error::Timeout { kind, .. } => *kind != TimeoutKind::Overall,
            _ => false,
        }
    }

    /// Whether the part file is worth keeping for a later resume.
    pub fn keeps_part(&self) -> bool {
        matches!(
            self,
            Error::Cancelled
                | Error::Network { .. }
                | Error::Timeout { .. }
                | Error::Http { .. }
                | Error::Unusable { .. }
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(message) => f.write_str(message),
            Error::Http { status, url, .. } => {
                let hint = match status {
                    401 | 403 => "check your credentials (--header / headers=)",
                    404 | 410 => "check the URL",
                    408 | 429 | 500..=599 => "the server may be overloaded: retry later",
                    _ => "check the URL and the server",
                };
                write!(f, "HTTP {status} from {url}: {hint}")
            }
            Error::Network { message, .. } => f.write_str(message),
            Error::Timeout { kind, after } => {
                let secs = after.as_secs_f64();
                match kind {
                    TimeoutKind::Connect => write!(
                        f,
                        "could not connect within {secs:.3} s: check the host and your network"
                    ),
                    TimeoutKind::Read => write!(
                        f,
                        "the server sent nothing for {secs:.3} s: retry later or raise the read timeout"
                    ),
                    TimeoutKind::LowSpeed(limit) => write!(
                        f,
                        "the server sent less than {limit} bytes/s for {secs:.0} s (the low-speed limit): it or the network is stalled; retry later, or change --speed-limit / --speed-time"
                    ),
                    TimeoutKind::Overall => write!(
                        f,
                        "the download did not finish within {secs:.3} s: raise the timeout; the part file is kept for resume"
                    ),
                }
            }
            Error::Cancelled => f.write_str("the download was cancelled; its part file is kept for resume"),
            Error::ChecksumMismatch {
                algorithm,
                expected,
                actual,
            } => write!(
                f,
                "{algorithm} mismatch: expected {expected}, got {actual}; the download was discarded: check the digest or the URL"
            ),
            Error::SizeMismatch { expected, actual } => write!(
                f,
                "size mismatch: expected {expected} bytes, got {actual}; the download was discarded: check the size or the URL"
            ),
            Error::Storage {
                operation,
                path,
                source,
            } => {
                let hint = match source.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                        "free space on that filesystem and retry"
                    }
                    Some(libc::EXDEV) => {
                        "the part directory is on another filesystem than the destination; surefetch never falls back to a copy: make .surefetch/ live on the destination's filesystem"
                    }
                    Some(libc::EIO) => "the device reported an I/O error: check the disk",
                    Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                        "check the permissions of the destination directory"
                    }
                    _ => "check the destination",
                };
                write!(
                    f,
                    "{operation} {} failed: {source}; the part file was removed and the destination left untouched: {hint}",
                    path.display()
                )
            }
            Error::Unusable { url, detail, .. } => write!(
                f,
                "{url} answered in a way that cannot be used ({detail}); the part file is kept"
            ),
            Error::SourceChanged { url, detail } => write!(
                f,
                "the file at {url} changed on the server during the download ({detail}); nothing was kept: run again to download the new version"
            ),
            Error::NotModified => f.write_str("not modified since the copy held"),
            Error::Busy { path } => write!(
                f,
                "another process is downloading to {} right now: wait for it to finish or stop it",
                path.display()
            ),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses() {
        let http = |status| Error::Http {
            status,
            url: "u".into(),
            retry_after: None,
        };
        for status in [408, 429, 500, 502, 503, 599] {
            assert!(http(status).is_retryable(), "{status}");
        }
        for status in [400, 401, 403, 404, 410, 416] {
            assert!(!http(status).is_retryable(), "{status}");
        }
        assert!(!Error::Cancelled.is_retryable());
        assert!(!Error::Timeout {
            kind: TimeoutKind::Overall,
            after: Duration::from_secs(1)
        }
        .is_retryable());
    }

    #[test]
    fn storage_messages_say_what_to_do() {
        let e = Error::storage(
            "write",
            "/x/.surefetch/f.part",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        let text = e.to_string();
        assert!(text.contains("free space"), "{text}");
        assert!(text.contains("/x/.surefetch/f.part"), "{text}");
    }
}
