//! The engine's error type. `bindings` maps each variant to one exception class
//! of `surefetch.errors`; nothing here knows about Python.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
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
    /// A batch was cancelled before this item started: nothing of it is on disk.
    CancelledBeforeStart,
    ChecksumMismatch {
        algorithm: &'static str,
        expected: String,
        actual: String,
    },
    SizeMismatch {
        expected: u64,
        actual: u64,
    },
    /// A local filesystem operation failed (ENOSPC, EIO, EXDEV, EACCES...);
    /// `left` says what that failure left on disk, so the message can tell the truth.
    Storage {
        operation: &'static str,
        path: PathBuf,
        source: io::Error,
        left: Left,
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
    /// The system refused a resource the transfer needs (a thread: EAGAIN, ENOMEM).
    /// Nothing is wrong with the download: its part file is kept.
    System {
        what: &'static str,
        source: io::Error,
    },
    /// A bug (a panic, a broken invariant), reported as such; the part is kept.
    Internal(String),
    /// `error`, after which the part file holds what `note` says, for the next call
    /// to resume (a message tells the truth about what is on disk).
    PartKept {
        error: Box<Error>,
        note: String,
    },
}

/// What a failed storage operation leaves on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// It failed during the transfer: the part file and its sidecar are removed
    /// (`download_into` discards them) and the destination is untouched.
    PartRemoved,
    /// It failed before anything was written: the destination and any part file
    /// of an earlier call are as they were.
    Untouched,
    /// The verified file was renamed to `path`; only its durability is unknown
    /// (syncing the directory failed).
    Installed,
}

impl Error {
    pub fn network(message: impl Into<String>, retryable: bool) -> Self {
        Error::Network {
            message: message.into(),
            retryable,
        }
    }

    /// A bug, reported as such (the part is kept).
    pub fn internal(what: &str) -> Self {
        Error::Internal(format!("internal error: {what}; please report this"))
    }

    /// A storage failure during the transfer (the part is then removed).
    pub fn storage(operation: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Storage {
            operation,
            path: path.into(),
            source,
            left: Left::PartRemoved,
        }
    }

    /// The file is at `final_path`, but syncing its directory failed.
    pub fn not_durable(final_path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Storage {
            operation: "syncing the directory of",
            path: final_path.into(),
            source,
            left: Left::Installed,
        }
    }

    /// This error, marked as having happened before anything was written (a
    /// storage error from taking the lock, creating the part directory...).
    pub fn before_writing(self) -> Self {
        match self {
            Error::Storage {
                operation,
                path,
                source,
                ..
            } => Error::Storage {
                operation,
                path,
                source,
                left: Left::Untouched,
            },
            other => other,
        }
    }

    /// Whether another attempt may succeed: connect errors, cut bodies, 5xx, 408, 429.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Network { retryable, .. } => *retryable,
            Error::Http { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Error::Timeout { kind, .. } => *kind != TimeoutKind::Overall,
            Error::PartKept { error, .. } => error.is_retryable(),
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
                | Error::System { .. }
                | Error::Internal(_)
                | Error::PartKept { .. }
        )
    }

    /// What the part file keeps for a later call to resume, as `PartKept` says; None
    /// when it keeps nothing (the engine then removed it).
    pub fn kept_note(&self) -> Option<&str> {
        match self {
            Error::PartKept { note, .. } => Some(note),
            _ => None,
        }
    }

    /// The error itself, without what `PartKept` adds.
    pub fn unwrapped(self) -> Error {
        match self {
            Error::PartKept { error, .. } => error.unwrapped(),
            other => other,
        }
    }
}

/// An `io::Error` with the same errno (or kind) and text; `io::Error` is not `Clone`.
fn copy_io(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// A stage's error is shown to every connection that ran into its closed queue.
impl Clone for Error {
    fn clone(&self) -> Self {
        match self {
            Error::InvalidArgument(message) => Error::InvalidArgument(message.clone()),
            Error::Http {
                status,
                url,
                retry_after,
            } => Error::Http {
                status: *status,
                url: url.clone(),
                retry_after: *retry_after,
            },
            Error::Network { message, retryable } => Error::Network {
                message: message.clone(),
                retryable: *retryable,
            },
            Error::Timeout { kind, after } => Error::Timeout {
                kind: *kind,
                after: *after,
            },
            Error::Cancelled => Error::Cancelled,
            Error::CancelledBeforeStart => Error::CancelledBeforeStart,
            Error::ChecksumMismatch {
                algorithm,
                expected,
                actual,
            } => Error::ChecksumMismatch {
                algorithm,
                expected: expected.clone(),
                actual: actual.clone(),
            },
            Error::SizeMismatch { expected, actual } => Error::SizeMismatch {
                expected: *expected,
                actual: *actual,
            },
            Error::Storage {
                operation,
                path,
                source,
                left,
            } => Error::Storage {
                operation,
                path: path.clone(),
                source: copy_io(source),
                left: *left,
            },
            Error::SourceChanged { url, detail } => Error::SourceChanged {
                url: url.clone(),
                detail: detail.clone(),
            },
            Error::Busy { path } => Error::Busy { path: path.clone() },
            Error::Unusable { url, detail, unit } => Error::Unusable {
                url: url.clone(),
                detail: detail.clone(),
                unit: *unit,
            },
            Error::NotModified => Error::NotModified,
            Error::PartKept { error, note } => Error::PartKept {
                error: error.clone(),
                note: note.clone(),
            },
            Error::System { what, source } => Error::System {
                what,
                source: copy_io(source),
            },
            Error::Internal(message) => Error::Internal(message.clone()),
        }
    }
}

/// `d` in seconds as a user would write it: at most six decimals, without trailing
/// zeros (`--timeout 1` is "1 s", not "1.000 s"; 0.1234 stays 0.1234).
fn seconds(d: Duration) -> String {
    let text = format!("{:.6}", d.as_secs_f64());
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(message) => f.write_str(message),
            Error::Http { status, url, .. } => {
                let hint = match status {
                    401 | 403 => "check the credentials sent (the URL's user:password, ~/.netrc or $NETRC, --header / headers=)",
                    407 => "the proxy wants credentials: put them in the proxy's URL (http://user:password@host:port)",
                    404 | 410 => "check the URL",
                    408 | 429 | 500..=599 => "the server may be overloaded: retry later",
                    _ => "check the URL and the server",
                };
                write!(f, "HTTP {status} from {url}: {hint}")
            }
            Error::Network { message, .. } => f.write_str(message),
            Error::Timeout { kind, after } => {
                let secs = seconds(*after);
                match kind {
                    TimeoutKind::Connect => write!(
                        f,
                        "could not connect within {secs} s: check the host and your network"
                    ),
                    TimeoutKind::Read => write!(
                        f,
                        "the server sent nothing for {secs} s: retry later or raise the read timeout"
                    ),
                    TimeoutKind::LowSpeed(limit) => write!(
                        f,
                        "the server sent less than {limit} bytes/s for {secs} s (the low-speed limit): it or the network is stalled; retry later, or change --speed-limit / --speed-time"
                    ),
                    TimeoutKind::Overall => write!(
                        f,
                        "the download did not finish within {secs} s: raise the timeout"
                    ),
                }
            }
            Error::Cancelled => f.write_str("the download was cancelled"),
            Error::CancelledBeforeStart => f.write_str(
                "the batch was cancelled before this download started: nothing of it was written",
            ),
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
                left,
            } => {
                let hint = storage_hint(operation, source);
                match left {
                    Left::Installed => {
                        let dir = match path.parent() {
                            Some(p) if !p.as_os_str().is_empty() => p,
                            _ => Path::new("."),
                        };
                        write!(
                            f,
                            "installed at {}, but its durability is unknown: syncing the directory {} failed: {source}; the file is whole and verified, but a crash or power loss could still undo its rename: {hint}",
                            path.display(),
                            dir.display()
                        )
                    }
                    Left::PartRemoved => write!(
                        f,
                        "{operation} {} failed: {source}; the part file was removed and the destination left untouched: {hint}",
                        path.display()
                    ),
                    Left::Untouched => write!(
                        f,
                        "{operation} {} failed: {source}; nothing was written and the destination was left untouched: {hint}",
                        path.display()
                    ),
                }
            }
            Error::Unusable { url, detail, .. } => write!(
                f,
                "{url} answered in a way that cannot be used ({detail})"
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
            Error::System { what, source } => write!(
                f,
                "could not {what}: {source}; the system is short of memory or processes: retry later, or use fewer parallel jobs"
            ),
            Error::Internal(message) => f.write_str(message),
            Error::PartKept { error, note } => write!(f, "{error}; {note}"),
        }
    }
}

fn storage_hint(operation: &str, source: &io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => "free space on that filesystem and retry",
        Some(libc::EXDEV) if operation == "renaming into" => {
            "the part directory is on another filesystem than the destination; surefetch never falls back to a copy: make .surefetch/ live on the destination's filesystem"
        }
        Some(libc::EXDEV) => "a rename crossed filesystems: check what is mounted there",
        Some(libc::EIO) => "the device reported an I/O error: check the disk",
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
            "check the permissions of the destination directory"
        }
        _ => "check the destination",
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    #[test]
    fn seconds_are_written_as_given() {
        for (secs, shown) in [
            (1.0, "1"),
            (0.25, "0.25"),
            (1.5, "1.5"),
            (30.0, "30"),
            (100.0, "100"),
            (0.1234, "0.1234"),
            (0.00001, "0.00001"),
        ] {
            assert_eq!(seconds(Duration::from_secs_f64(secs)), shown);
        }
        let timeout = Error::Timeout {
            kind: TimeoutKind::Overall,
            after: Duration::from_secs(1),
        };
        assert!(timeout.to_string().contains("within 1 s:"), "{timeout}");
    }

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

    #[test]
    fn storage_messages_tell_what_is_on_disk() {
        let eio = || io::Error::from_raw_os_error(libc::EIO);
        let removed = Error::storage("writing", "/x/.surefetch/f.part", eio()).to_string();
        assert!(removed.contains("part file was removed"), "{removed}");
        assert!(removed.contains("destination left untouched"), "{removed}");
        let early = Error::storage("locking", "/x/.surefetch/f.lock", eio())
            .before_writing()
            .to_string();
        assert!(early.contains("nothing was written"), "{early}");
        assert!(!early.contains("removed"), "{early}");
        let installed = Error::not_durable("/x/f", eio()).to_string();
        assert!(
            installed.starts_with(
                "installed at /x/f, but its durability is unknown: syncing the directory /x failed: Input/output error (os error 5)"
            ),
            "{installed}"
        );
        assert!(!installed.contains("untouched"), "{installed}");
    }

    #[test]
    fn a_clone_keeps_the_errno_and_the_text() {
        let e = Error::storage("writing", "/p", io::Error::from_raw_os_error(libc::ENOSPC));
        let copy = e.clone();
        assert_eq!(copy.to_string(), e.to_string());
        let Error::Storage { source, .. } = copy else {
            panic!("{copy}")
        };
        assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
        let eof = Error::storage("reading back", "/p", io::ErrorKind::UnexpectedEof.into());
        assert_eq!(eof.clone().to_string(), eof.to_string());
    }
}
