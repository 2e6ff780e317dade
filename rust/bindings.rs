//! The one place that speaks PyO3: classes, functions and error conversion.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::batch;
use crate::cancel;
use crate::download::{download_into, Options, Outcome, Progress};
use crate::error::{Error, TimeoutKind};
use crate::hash;
use crate::http;
use crate::journal;
use crate::names;
use crate::panics::{self, Caught};
use crate::part;
use crate::place;

pyo3::import_exception!(surefetch.errors, SurefetchError);
pyo3::import_exception!(surefetch.errors, ChecksumMismatch);
pyo3::import_exception!(surefetch.errors, SizeMismatch);
pyo3::import_exception!(surefetch.errors, HTTPError);
pyo3::import_exception!(surefetch.errors, NetworkError);
pyo3::import_exception!(surefetch.errors, DownloadTimeout);
pyo3::import_exception!(surefetch.errors, Cancelled);
pyo3::import_exception!(surefetch.errors, StorageError);
pyo3::import_exception!(surefetch.errors, LockTimeout);

/// How often the waiting thread wakes to run signal handlers and report progress.
const POLL: Duration = Duration::from_millis(50);
/// Progress callbacks are called at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// After a Python-side error cancelled the transfer, how long to wait for it to wind down.
const WIND_DOWN: Duration = Duration::from_secs(5);

struct PyEngineError(Error);

impl From<PyEngineError> for PyErr {
    fn from(PyEngineError(err): PyEngineError) -> PyErr {
        let message = err.to_string();
        match err.unwrapped() {
            Error::InvalidArgument(_) => PyValueError::new_err(message),
            Error::Http { status, url, .. } => HTTPError::new_err((message, status, url)),
            Error::Network { .. } | Error::SourceChanged { .. } | Error::Unusable { .. } => {
                NetworkError::new_err(message)
            }
            Error::Timeout { kind, .. } => {
                let kind = match kind {
                    TimeoutKind::Connect => "connect",
                    TimeoutKind::Read => "read",
                    TimeoutKind::Overall => "overall",
                    TimeoutKind::LowSpeed(_) => "low-speed",
                };
                DownloadTimeout::new_err((message, kind))
            }
            Error::System { .. } | Error::Internal(_) => SurefetchError::new_err(message),
            Error::Cancelled | Error::CancelledBeforeStart => Cancelled::new_err(message),
            Error::ChecksumMismatch {
                algorithm,
                expected,
                actual,
            } => ChecksumMismatch::new_err((message, algorithm, expected, actual)),
            Error::SizeMismatch { expected, actual } => {
                SizeMismatch::new_err((message, expected, actual))
            }
            Error::Storage { source, path, .. } => {
                let errno = source.raw_os_error().unwrap_or(0);
                StorageError::new_err((errno, message, path))
            }
            Error::Busy { .. } => LockTimeout::new_err(message),
            Error::NotModified => SurefetchError::new_err(message),
            Error::PartKept { .. } => unreachable!("unwrapped above"),
        }
    }
}

/// The process's one I/O runtime, and its generation.
struct Runtime {
    runtime: tokio::runtime::Runtime,
    generation: u64,
}

/// The runtime, built on first use; rebuilt when a panic broke the current one
/// (see `panics`), after the calls on it have failed.
fn runtime() -> PyResult<(tokio::runtime::Handle, u64)> {
    static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);
    static GENERATIONS: AtomicU64 = AtomicU64::new(1);
    let mut current = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = current.as_ref() {
        if panics::runtime_panic(rt.generation).is_none() {
            return Ok((rt.runtime.handle().clone(), rt.generation));
        }
    }
    if let Some(broken) = current.take() {
        // Drops its tasks without waiting for them (a dead worker never would).
        broken.runtime.shutdown_background();
        // Their connections belonged to the old runtime's I/O driver.
        http::forget_clients();
    }
    panics::install_hook();
    let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
    let runtime = start_runtime(generation).map_err(|e| {
        SurefetchError::new_err(format!(
            "could not start surefetch's I/O runtime: {e}; the system is short of memory or processes: retry later"
        ))
    })?;
    let handle = runtime.handle().clone();
    *current = Some(Runtime {
        runtime,
        generation,
    });
    Ok((handle, generation))
}

/// Builds runtime `generation` and waits until every worker thread runs.
///
/// tokio cannot always start its threads and say so: when the OS refuses one
/// (EAGAIN), tokio queues that worker behind the running ones, forever (tasks
/// handed to it would never run); or it panics, and unwinding then waits for the
/// workers already started, which nobody stops. So the build runs on a helper
/// thread that is given up on (and leaked) when it does not return in time.
fn start_runtime(generation: u64) -> Result<tokio::runtime::Runtime, String> {
    const START_WITHIN: Duration = Duration::from_secs(5);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&started);
    let (built_tx, built_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("surefetch-start".into())
        .spawn(move || {
            let built = panics::catch_text(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers)
                    .enable_all()
                    .thread_name(panics::RUNTIME_THREAD)
                    .on_thread_start(move || {
                        panics::on_runtime_thread(generation);
                        counted.fetch_add(1, Ordering::Relaxed);
                    })
                    .build()
            });
            let _ = built_tx.send(built);
        })
        .map_err(|e| format!("could not start a thread: {e}"))?;
    let deadline = Instant::now() + START_WITHIN;
    let runtime = match built_rx.recv_timeout(START_WITHIN) {
        Ok(Ok(Ok(runtime))) => runtime,
        Ok(Ok(Err(e))) => return Err(e.to_string()),
        Ok(Err(panic)) => return Err(panic),
        Err(_) => return Err("its worker threads could not all be started".into()),
    };
    while started.load(Ordering::Relaxed) < workers {
        if Instant::now() > deadline {
            let running = started.load(Ordering::Relaxed);
            runtime.shutdown_background();
            return Err(format!("only {running} of its {workers} threads started"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(runtime)
}

/// Runs `work` on the runtime without the GIL, waking every `POLL` to run Python's
/// signal handlers (so Ctrl+C raises `KeyboardInterrupt` at once) and to report
/// progress. Any Python error cancels the transfer, waits for it to stop, and is raised.
fn run_blocking<T, F>(
    py: Python<'_>,
    token: &cancel::CancelToken,
    progress: Option<(&Bound<'_, PyAny>, &Progress)>,
    work: F,
) -> PyResult<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = crate::error::Result<T>> + Send + 'static,
{
    let (runtime, generation) = runtime()?;
    let (tx, rx) = mpsc::sync_channel(1);
    runtime.spawn(async move {
        // A panic in the transfer ends it with an internal error (and drops it).
        let _ = tx.send(Caught::new("the transfer", work).await);
    });
    let mut reporter = progress.map(|(callback, progress)| Reporter::new(callback, progress));
    // `Receiver` is `Send` but not `Sync`: it moves into the GIL-free closure and back.
    let mut rx = Some(rx);
    let mut wait = |py: Python<'_>, timeout: Duration| {
        let Some(receiver) = rx.take() else {
            return Err(mpsc::RecvTimeoutError::Disconnected);
        };
        let (receiver, got) = py.detach(move || {
            let got = receiver.recv_timeout(timeout);
            (receiver, got)
        });
        rx = Some(receiver);
        got
    };
    loop {
        match wait(py, POLL) {
            Ok(result) => {
                log_engine_notes(py)?;
                let value = result.map_err(|e| PyErr::from(PyEngineError(e)))?;
                if let Some(reporter) = reporter.as_mut() {
                    reporter.report(true)?;
                }
                return Ok(value);
            }
            Err(_) if panics::runtime_panic(generation).is_some() => {
                // The runtime lost a thread: this transfer may never be polled again.
                token.cancel();
                let text = panics::runtime_panic(generation).unwrap_or_default();
                return Err(PyEngineError(panics::broken_runtime(&text)).into());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let checked = py
                    .check_signals()
                    .and_then(|()| log_engine_notes(py))
                    .and_then(|()| reporter.as_mut().map_or(Ok(()), |r| r.report(false)));
                if let Err(err) = checked {
                    token.cancel();
                    if let Ok(Err(stopped)) = wait(py, WIND_DOWN) {
                        tell_what_is_kept(py, &err, &stopped);
                    }
                    return Err(err);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(SurefetchError::new_err(
                "internal error: the transfer task stopped without a result; please report this",
            )),
        }
    }
}

/// The attribute of an exception that stopped a transfer (Ctrl+C, the CLI's SIGTERM) that
/// says what its part file keeps: the engine's note, or None when it keeps nothing.
const KEPT_ATTRIBUTE: &str = "surefetch_kept";

/// Sets `KEPT_ATTRIBUTE` on `err` from how the transfer it stopped ended (`stopped`), so
/// that the message of the interruption tells the truth about what is on disk.
fn tell_what_is_kept(py: Python<'_>, err: &PyErr, stopped: &Error) {
    let _ = err.value(py).setattr(KEPT_ATTRIBUTE, stopped.kept_note());
}

/// Hands the engine's notes (`crate::journal`) to the library's logging
/// (`surefetch._log`, logger `surefetch.engine`), on this (the calling) thread. A
/// logging failure is not the download's: it is reported by `logging` itself or
/// dropped. But a signal handled while the logging code runs (KeyboardInterrupt, the
/// CLI's SIGTERM) is raised there and must reach the caller, or that Ctrl+C is lost:
/// such an error is returned.
fn log_engine_notes(py: Python<'_>) -> PyResult<()> {
    let notes = journal::take();
    if notes.is_empty() {
        return Ok(());
    }
    let raised_by_a_signal = |err: PyErr| match err.is_instance_of::<PyException>(py) {
        true => Ok(()),
        false => Err(err),
    };
    let log = match py
        .import("surefetch._log")
        .and_then(|module| module.getattr("log"))
    {
        Ok(log) => log,
        Err(err) => return raised_by_a_signal(err),
    };
    for (level, message) in notes {
        let level = match level {
            journal::Level::Info => 20,    // logging.INFO
            journal::Level::Warning => 30, // logging.WARNING
        };
        if let Err(err) = log.call1(("surefetch.engine", level, "%s", message)) {
            raised_by_a_signal(err)?;
        }
    }
    Ok(())
}

/// Calls a Python progress callback with `(done, total)`, at most every `PROGRESS_INTERVAL`.
struct Reporter<'a, 'py> {
    callback: &'a Bound<'py, PyAny>,
    progress: &'a Progress,
    last_call: Option<Instant>,
    last_value: Option<(u64, Option<u64>)>,
}

impl<'a, 'py> Reporter<'a, 'py> {
    fn new(callback: &'a Bound<'py, PyAny>, progress: &'a Progress) -> Self {
        Self {
            callback,
            progress,
            last_call: None,
            last_value: None,
        }
    }

    fn report(&mut self, last: bool) -> PyResult<()> {
        let due = self
            .last_call
            .is_none_or(|at| at.elapsed() >= PROGRESS_INTERVAL);
        let value = self.progress.get();
        if (due || last) && self.last_value != Some(value) {
            self.last_call = Some(Instant::now());
            self.last_value = Some(value);
            self.callback.call1(value)?;
        }
        Ok(())
    }
}

/// A cancellation token: `cancel()`, `cancelled`, `child()`.
#[pyclass(name = "CancelToken", module = "surefetch._core", frozen)]
pub struct CancelToken {
    inner: cancel::CancelToken,
}

#[pymethods]
impl CancelToken {
    #[new]
    fn new() -> Self {
        Self {
            inner: cancel::CancelToken::new(),
        }
    }

    /// Cancel this token and all of its children. Idempotent.
    fn cancel(&self) {
        self.inner.cancel();
    }

    /// True once this token (or one of its ancestors) was cancelled.
    #[getter]
    fn cancelled(&self) -> bool {
        self.inner.is_cancelled()
    }

    /// A new token cancelled with this one, which can also be cancelled alone.
    fn child(&self) -> Self {
        Self {
            inner: self.inner.child(),
        }
    }

    fn __repr__(&self) -> String {
        format!("CancelToken(cancelled={})", self.inner.is_cancelled())
    }
}

fn seconds(value: Option<f64>, name: &str) -> PyResult<Option<Duration>> {
    value
        .map(|v| {
            Duration::try_from_secs_f64(v).map_err(|_| {
                PyValueError::new_err(format!(
                    "{name} must be a non-negative number of seconds, not {v}"
                ))
            })
        })
        .transpose()
}

/// Downloads `url` to the file `dest`; `options` holds `download`'s keyword
/// arguments (`options_from_dict`: those given, the rest keep `Options::default()`).
#[pyfunction]
#[pyo3(signature = (url, dest, options=None, *, cancel=None, progress=None))]
fn download<'py>(
    py: Python<'py>,
    url: String,
    dest: PathBuf,
    options: Option<Bound<'py, PyDict>>,
    cancel: Option<PyRef<'py, CancelToken>>,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let options = match &options {
        Some(given) => options_from_dict(given)?,
        None => Options::default(),
    };
    // A child token: cancelling because of Ctrl+C must not cancel the caller's token.
    let token = match &cancel {
        Some(parent) => parent.inner.child(),
        None => cancel::CancelToken::new(),
    };
    let shared = Progress::new();
    let task_progress = Arc::clone(&shared);
    let task_token = token.clone();
    let outcome: Outcome = run_blocking(
        py,
        &token,
        progress.as_ref().map(|cb| (cb, &*shared)),
        async move { download_into(&url, &dest, &options, task_token, task_progress).await },
    )?;
    outcome_dict(py, outcome)
}

/// The engine's own defaults of the transfer options (`TransferOptions` in
/// Python must agree; a test compares them).
#[pyfunction]
fn default_options(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let defaults = Options::default();
    let secs = |d: Duration| d.as_secs_f64();
    let dict = PyDict::new(py);
    dict.set_item("connections", defaults.connections)?;
    dict.set_item("resume", defaults.resume)?;
    dict.set_item("timeout", defaults.timeout.map(secs))?;
    dict.set_item("read_timeout", defaults.read_timeout.map(secs))?;
    dict.set_item("connect_timeout", secs(defaults.connect_timeout))?;
    dict.set_item("retries", defaults.retries)?;
    dict.set_item("speed_limit", defaults.speed_limit)?;
    dict.set_item("speed_time", secs(defaults.speed_time))?;
    dict.set_item("durable", defaults.durable)?;
    dict.set_item("compute_sha256", defaults.compute_sha256)?;
    Ok(dict)
}

/// The options of a download, single or in a batch: the keyword arguments of
/// `download` (those given; the rest keep `Options::default()`).
fn options_from_dict(item: &Bound<'_, PyDict>) -> PyResult<Options> {
    let mut options = Options::default();
    for (key, value) in item.iter() {
        let key: String = key.extract()?;
        match key.as_str() {
            "sha256" => options.sha256 = value.extract()?,
            "xxh3_128" => options.xxh3_128 = value.extract()?,
            "size" => options.size = value.extract()?,
            "compute_sha256" => options.compute_sha256 = value.extract()?,
            "executable" => options.executable = value.extract()?,
            "timeout" => options.timeout = seconds(value.extract()?, "timeout")?,
            "connect_timeout" => {
                options.connect_timeout =
                    seconds(Some(value.extract()?), "connect_timeout")?.unwrap_or_default()
            }
            "read_timeout" => options.read_timeout = seconds(value.extract()?, "read_timeout")?,
            "retries" => options.retries = value.extract()?,
            "headers" => {
                options.headers = value
                    .extract::<Option<Vec<(String, String)>>>()?
                    .unwrap_or_default()
            }
            "host_credentials" => {
                options.host_credentials = value
                    .extract::<Option<Vec<(String, String)>>>()?
                    .unwrap_or_default()
            }
            "connections" => options.connections = value.extract()?,
            "resume" => options.resume = value.extract()?,
            "speed_limit" => options.speed_limit = value.extract()?,
            "speed_time" => {
                options.speed_time =
                    seconds(Some(value.extract()?), "speed_time")?.unwrap_or_default()
            }
            "content_disposition" => options.content_disposition = value.extract()?,
            "durable" => options.durable = value.extract()?,
            "part_lock" => options.part_lock = value.extract()?,
            "install_by_digest" => options.install_by_digest = value.extract()?,
            "if_none_match" => options.if_none_match = value.extract()?,
            "if_modified_since" => options.if_modified_since = value.extract()?,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown download option {other:?}"
                )))
            }
        }
    }
    Ok(options)
}

/// Downloads many `(url, dest, options)` items, at most `jobs` at a time, on the
/// one runtime; calls `on_result(index, result_dict_or_exception)` on this thread
/// as each item is final, and `progress(items_done, items, bytes_done,
/// bytes_known)` about ten times a second, and `item_progress(index, done, total or
/// None)` for each item whose bytes moved since. Durable items are committed in groups.
#[pyfunction]
#[pyo3(signature = (
    items, *, jobs=8, durable=true, cancel=None, on_result, progress=None, item_progress=None
))]
#[allow(clippy::too_many_arguments)]
fn download_many<'py>(
    py: Python<'py>,
    items: Vec<(String, PathBuf, Bound<'py, PyDict>)>,
    jobs: usize,
    durable: bool,
    cancel: Option<PyRef<'py, CancelToken>>,
    on_result: Bound<'py, PyAny>,
    progress: Option<Bound<'py, PyAny>>,
    item_progress: Option<Bound<'py, PyAny>>,
) -> PyResult<()> {
    if jobs == 0 {
        return Err(PyValueError::new_err("jobs must be at least 1"));
    }
    let items = items
        .into_iter()
        .map(|(url, dest, options)| {
            Ok(batch::Item {
                url,
                dest,
                options: options_from_dict(&options)?,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let token = match &cancel {
        Some(parent) => parent.inner.child(),
        None => cancel::CancelToken::new(),
    };
    let shared = batch::BatchProgress::new(items.len());
    let (tx, rx) = mpsc::channel();
    let (task_token, task_progress) = (token.clone(), Arc::clone(&shared));
    let (runtime, generation) = runtime()?;
    runtime.spawn(async move {
        // A panic ends the batch: the items without a result are reported as such.
        let batch = async move {
            batch::download_batch(items, jobs, durable, task_token, task_progress, tx).await;
            Ok(())
        };
        let _ = Caught::new("the batch", batch).await;
    });
    let mut rx = Some(rx);
    let mut last_report: Option<(Instant, batch::Totals)> = None;
    let mut items_seen: Vec<(u64, Option<u64>)> = vec![(0, None); shared.len()];
    let mut report = |last: bool| -> PyResult<()> {
        if progress.is_none() && item_progress.is_none() {
            return Ok(());
        }
        let totals = shared.get();
        let due = last_report
            .is_none_or(|(at, seen)| seen != totals && (last || at.elapsed() >= PROGRESS_INTERVAL));
        if !due {
            return Ok(());
        }
        last_report = Some((Instant::now(), totals));
        if let Some(callback) = item_progress.as_ref() {
            for (index, seen) in items_seen.iter_mut().enumerate() {
                let now = shared.item(index);
                if now != *seen {
                    *seen = now;
                    callback.call1((index, now.0, now.1))?;
                }
            }
        }
        if let Some(callback) = progress.as_ref() {
            callback.call1((
                totals.items_done,
                totals.items,
                totals.bytes_done,
                totals.bytes_known,
            ))?;
        }
        Ok(())
    };
    let deliver = |index: usize, result: crate::error::Result<Outcome>| -> PyResult<()> {
        let value = match result {
            Ok(outcome) => outcome_dict(py, outcome)?.into_any(),
            Err(error) => PyErr::from(PyEngineError(error))
                .into_value(py)
                .into_bound(py)
                .into_any(),
        };
        on_result.call1((index, value)).map(|_| ())
    };
    loop {
        let Some(receiver) = rx.take() else {
            return Ok(());
        };
        let (receiver, got) = py.detach(move || {
            let got = receiver.recv_timeout(POLL);
            (receiver, got)
        });
        rx = Some(receiver);
        let step = match got {
            Ok((index, result)) => deliver(index, result),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(text) = panics::runtime_panic(generation) {
                    // The runtime lost a thread: the batch may never be polled again.
                    token.cancel();
                    return Err(PyEngineError(panics::broken_runtime(&text)).into());
                }
                py.check_signals()
                    .and_then(|()| log_engine_notes(py))
                    .and_then(|()| report(false))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                log_engine_notes(py)?;
                return report(true);
            }
        };
        if let Err(err) = step {
            token.cancel();
            // Let the items wind down (their parts kept), then hand over how the ones
            // that had started ended (installed, or what each part keeps), so that the
            // caller tells the truth about each before `err` is raised; those that never
            // started are all alike, and may be thousands: not handed over.
            let mut ended = Vec::new();
            if let Some(receiver) = rx.take() {
                let deadline = Instant::now() + WIND_DOWN;
                ended = py.detach(move || {
                    let mut ended = Vec::new();
                    while Instant::now() < deadline {
                        match receiver.recv_timeout(POLL) {
                            Ok((_, Err(Error::CancelledBeforeStart))) => {}
                            Ok(result) => ended.push(result),
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                            Err(mpsc::RecvTimeoutError::Timeout) => {}
                        }
                    }
                    ended
                });
            }
            for (index, result) in ended {
                if deliver(index, result).is_err() {
                    break; // another interrupt, or a callback that fails: no more
                }
            }
            return Err(err);
        }
    }
}

/// A batch that takes items while it runs (a supervisor worker's jobs): `submit`
/// starts an item when fewer than `jobs` are in flight, `results` hands back the
/// final ones, each after the group commit that made it durable.
#[pyclass(module = "surefetch._core", frozen)]
struct Batch {
    submissions: Mutex<Option<tokio::sync::mpsc::UnboundedSender<batch::Submission>>>,
    results: Mutex<mpsc::Receiver<batch::ItemResult>>,
    next: AtomicUsize,
    generation: u64,
}

#[pymethods]
impl Batch {
    #[new]
    #[pyo3(signature = (*, jobs=8, durable=true))]
    fn new(jobs: usize, durable: bool) -> PyResult<Self> {
        if jobs == 0 {
            return Err(PyValueError::new_err("jobs must be at least 1"));
        }
        let (submit_tx, submit_rx) = tokio::sync::mpsc::unbounded_channel();
        let (tx, rx) = mpsc::channel();
        let (runtime, generation) = runtime()?;
        runtime.spawn(async move {
            let stream = async move {
                batch::download_stream(submit_rx, jobs, durable, tx).await;
                Ok(())
            };
            let _ = Caught::new("the batch", stream).await;
        });
        Ok(Self {
            submissions: Mutex::new(Some(submit_tx)),
            results: Mutex::new(rx),
            next: AtomicUsize::new(0),
            generation,
        })
    }

    /// Queues a download (options as `download`'s); returns its index in `results`.
    #[pyo3(signature = (url, dest, options, cancel=None))]
    fn submit(
        &self,
        url: String,
        dest: PathBuf,
        options: &Bound<'_, PyDict>,
        cancel: Option<PyRef<'_, CancelToken>>,
    ) -> PyResult<usize> {
        let item = batch::Item {
            url,
            dest,
            options: options_from_dict(options)?,
        };
        let cancel = match &cancel {
            Some(token) => token.inner.child(),
            None => cancel::CancelToken::new(),
        };
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        let submissions = self.submissions.lock().unwrap_or_else(|e| e.into_inner());
        let submission = batch::Submission {
            index,
            item,
            cancel,
        };
        match submissions.as_ref() {
            Some(tx) if tx.send(submission).is_ok() => Ok(index),
            _ => Err(PyValueError::new_err("the batch is closed")),
        }
    }

    /// The items that became final, as `(index, result dict or exception)`, waiting
    /// at most `timeout` seconds for the first.
    fn results(&self, py: Python<'_>, timeout: f64) -> PyResult<Vec<(usize, Py<PyAny>)>> {
        let wait = Duration::try_from_secs_f64(timeout.max(0.0)).unwrap_or(POLL);
        let got: Vec<batch::ItemResult> = py.detach(|| {
            let receiver = self.results.lock().unwrap_or_else(|e| e.into_inner());
            let mut got = Vec::new();
            if let Ok(first) = receiver.recv_timeout(wait) {
                got.push(first);
                got.extend(receiver.try_iter());
            }
            got
        });
        log_engine_notes(py)?;
        if got.is_empty() {
            if let Some(text) = panics::runtime_panic(self.generation) {
                return Err(PyEngineError(panics::broken_runtime(&text)).into());
            }
        }
        got.into_iter()
            .map(|(index, result)| {
                let value = match result {
                    Ok(outcome) => outcome_dict(py, outcome)?.into_any().unbind(),
                    Err(error) => PyErr::from(PyEngineError(error)).into_value(py).into_any(),
                };
                Ok((index, value))
            })
            .collect()
    }

    /// Takes no more items; those submitted still finish.
    fn close(&self) {
        self.submissions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

/// Makes everything written to the filesystem holding `path` durable (`syncfs`):
/// one call for a group of files; raises the `OSError` it gets.
#[pyfunction]
fn sync_filesystem(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    let synced = py.detach(|| batch::syncfs(&path));
    synced.map_err(|source| plain_os_error(Error::storage("syncing", path, source)))
}

/// Files up to this size (bytes) are hashed on the calling thread.
const HASH_INLINE_MAX: u64 = 4 << 20;

/// Size and digests of a file: `(size, xxh3_128, sha256 or None)`.
#[pyfunction]
#[pyo3(signature = (path, *, sha256=true, cancel=None))]
fn hash_file(
    py: Python<'_>,
    path: PathBuf,
    sha256: bool,
    cancel: Option<PyRef<'_, CancelToken>>,
) -> PyResult<(u64, String, Option<String>)> {
    let token = match &cancel {
        Some(parent) => parent.inner.child(),
        None => cancel::CancelToken::new(),
    };
    // A small file is hashed in a few milliseconds: on this thread, without the
    // GIL, rather than on a thread of its own that Ctrl+C could interrupt.
    if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() <= HASH_INLINE_MAX) {
        let hashed =
            py.detach(|| panics::catch("hashing", || hash::hash_file(&path, sha256, &token)));
        let digests = hashed.map_err(plain_os_error)?;
        return Ok((digests.size, digests.xxh3_128, digests.sha256));
    }
    let task_token = token.clone();
    let work = async move {
        // A thread of its own rather than tokio's blocking pool, which panics
        // when it cannot start a thread: here that is an error like any other.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let started = std::thread::Builder::new()
            .name("surefetch-hash".into())
            .spawn(move || {
                let hashed =
                    panics::catch("hashing", || hash::hash_file(&path, sha256, &task_token));
                let _ = done_tx.send(hashed);
            });
        match started {
            Ok(_) => done_rx
                .await
                .unwrap_or_else(|_| Err(Error::internal("the hashing thread stopped"))),
            Err(source) => Err(Error::System {
                what: "start a hashing thread",
                source,
            }),
        }
    };
    // The inner result carries file errors out as plain OSErrors, as open() raises them.
    let digests =
        run_blocking(py, &token, None, async move { Ok(work.await) })?.map_err(plain_os_error)?;
    Ok((digests.size, digests.xxh3_128, digests.sha256))
}

/// A storage error as the OSError subclass Python's own file functions raise
/// (FileNotFoundError, IsADirectoryError, ...), with the path; others as usual.
fn plain_os_error(err: Error) -> PyErr {
    match err {
        Error::Storage { path, source, .. } => {
            let errno = source.raw_os_error().unwrap_or(0);
            let text = source.to_string();
            let strerror = text.split(" (os error").next().unwrap_or_default();
            PyOSError::new_err((errno, strerror.to_owned(), path))
        }
        other => PyEngineError(other).into(),
    }
}

/// What `place_many` did for one item: how, and with `verify` the size and XXH3-128
/// of what landed.
type PlacedItem = (&'static str, Option<(u64, String)>);

/// Places each blob at its target (`place::place`: `(blob, target, mode)`, mode
/// minus the umask) in `link_mode`; with `verify`, hashes what landed. Returns, per
/// item, `(how, (size, xxh3_128) or None)` or the `OSError` it met (not raised: the
/// others are placed all the same).
#[pyfunction]
#[pyo3(signature = (items, link_mode, *, verify))]
fn place_many(
    py: Python<'_>,
    items: Vec<(PathBuf, PathBuf, u32)>,
    link_mode: &str,
    verify: bool,
) -> PyResult<Vec<Py<PyAny>>> {
    let link = place::LinkMode::parse(link_mode)
        .ok_or_else(|| PyValueError::new_err(format!("unknown link mode {link_mode:?}")))?;
    let placed: Vec<std::result::Result<PlacedItem, Error>> = py.detach(|| {
        place::place_all(&items, link, verify)
            .into_iter()
            .map(|checked| checked.map(|(how, landed)| (how.name(), landed)))
            .collect()
    });
    placed
        .into_iter()
        .map(|item| match item {
            Ok(done) => Ok(done.into_pyobject(py)?.into_any().unbind()),
            Err(error) => Ok(plain_os_error(error).into_value(py).into_any()),
        })
        .collect()
}

/// `raw` reduced to a bare file name, "" when nothing is left (`names::bare_name`).
#[pyfunction]
fn bare_name(raw: &str) -> String {
    names::bare_name(raw)
}

/// `name` + `suffix`, shortened to fit in 255 bytes (`names::fit_name`).
#[pyfunction]
fn fit_name(name: OsString, suffix: &str) -> OsString {
    names::fit_name(&name, suffix)
}

/// Creates `<directory>/.surefetch` and checks that it is surefetch's own
/// (`part::part_dir`); returns its path.
#[pyfunction]
fn part_dir(directory: PathBuf) -> PyResult<PathBuf> {
    part::part_dir(&directory).map_err(|e| PyEngineError(e).into())
}

/// Starts the I/O runtime and the default HTTP client on a thread of their own and
/// returns at once, so that a caller about to download (a sync still reading its
/// manifest) finds them ready. Failures are left for the download to report.
#[pyfunction]
fn warm_up() {
    let _ = std::thread::Builder::new()
        .name("surefetch-warm".into())
        .spawn(|| {
            let _ = runtime();
            let _ = http::Http::shared(Options::default().connect_timeout);
        });
}

fn outcome_dict(py: Python<'_>, outcome: Outcome) -> PyResult<Bound<'_, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("path", outcome.path)?;
    dict.set_item("size", outcome.size)?;
    dict.set_item("sha256", outcome.sha256)?;
    dict.set_item("xxh3_128", outcome.xxh3_128)?;
    dict.set_item("resumed_from", outcome.resumed_from)?;
    dict.set_item("bytes_transferred", outcome.bytes_transferred)?;
    dict.set_item("elapsed", outcome.elapsed.as_secs_f64())?;
    dict.set_item("not_modified", outcome.not_modified)?;
    dict.set_item("etag", outcome.etag)?;
    dict.set_item("last_modified", outcome.last_modified)?;
    Ok(dict)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<CancelToken>()?;
    m.add_class::<Batch>()?;
    // The engine's half of the redaction rule (Python's: surefetch.errors), compared in a test.
    m.add(
        "CREDENTIAL_PARAMETERS",
        http::CREDENTIAL_PARAMETERS.to_vec(),
    )?;
    m.add_function(wrap_pyfunction!(download, m)?)?;
    m.add_function(wrap_pyfunction!(download_many, m)?)?;
    m.add_function(wrap_pyfunction!(default_options, m)?)?;
    m.add_function(wrap_pyfunction!(sync_filesystem, m)?)?;
    m.add_function(wrap_pyfunction!(hash_file, m)?)?;
    m.add_function(wrap_pyfunction!(bare_name, m)?)?;
    m.add_function(wrap_pyfunction!(fit_name, m)?)?;
    m.add_function(wrap_pyfunction!(part_dir, m)?)?;
    m.add_function(wrap_pyfunction!(place_many, m)?)?;
    m.add_function(wrap_pyfunction!(warm_up, m)?)?;
    Ok(())
}
