//! Panics end the call, never the process and never with a hang.
//!
//! A panic in surefetch's own work (a pipeline stage, a transfer task, a file
//! hash) is caught where it happens, with `catch` or `Caught`, and becomes an
//! internal error. A panic anywhere else on a runtime thread (in tokio's driver
//! or scheduler, or in a task a library spawned) can leave the runtime unable to
//! finish anything: a worker that dies takes its queued tasks with it. The panic
//! hook marks that runtime broken, so that every call waiting on it fails at once
//! instead of waiting forever, and the next call gets a new runtime.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::{self, AssertUnwindSafe, PanicHookInfo};
use std::pin::Pin;
use std::sync::{Mutex, Once};
use std::task::{Context, Poll};

use crate::error::{Error, Result};

/// The name of the runtime's threads (workers and blocking pool).
pub const RUNTIME_THREAD: &str = "surefetch-io";
/// Every thread surefetch starts has a name with this prefix.
const OUR_THREADS: &str = "surefetch-";

thread_local! {
    /// Depth of `catch`/`Caught` on this thread: a panic here will be caught.
    static CATCHING: Cell<u32> = const { Cell::new(0) };
    /// The text of the last caught panic on this thread, with its location.
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
    /// The runtime generation this thread belongs to (0: none).
    static GENERATION: Cell<u64> = const { Cell::new(0) };
}

/// Runtimes that lost a thread to a panic: (generation, what panicked).
static BROKEN: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());

/// Installs the hook once. Panics on other threads go to the previous hook.
pub fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CATCHING.get() > 0 {
                // Reported by the catcher, as an error: keep stderr to one line.
                LAST.replace(Some(describe(info)));
                return;
            }
            let current = std::thread::current();
            let ours = current.name().is_some_and(|n| n.starts_with(OUR_THREADS));
            if !ours {
                return previous(info);
            }
            let text = describe(info);
            let generation = GENERATION.get();
            if generation != 0 {
                if let Ok(mut broken) = BROKEN.lock() {
                    broken.push((generation, text));
                }
                return;
            }
            previous(info);
        }));
    });
}

/// Called on every thread of runtime `generation` when it starts.
pub fn on_runtime_thread(generation: u64) {
    GENERATION.set(generation);
}

/// What panicked on a thread of runtime `generation`, if anything did outside
/// surefetch's own (caught) work.
pub fn runtime_panic(generation: u64) -> Option<String> {
    let broken = BROKEN.lock().unwrap_or_else(|e| e.into_inner());
    broken
        .iter()
        .find(|(g, _)| *g == generation)
        .map(|(_, text)| text.clone())
}

/// The internal error for a runtime that lost a thread.
pub fn broken_runtime(text: &str) -> Error {
    Error::internal(&format!(
        "a thread of surefetch's I/O runtime panicked ({text}); the transfers on it were stopped"
    ))
}

/// Runs `work`, turning a panic into an internal error naming `what`.
pub fn catch<T>(what: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_text(work)
        .unwrap_or_else(|text| Err(Error::internal(&format!("{what} panicked: {text}"))))
}

/// Runs `work`; a panic becomes its text (with its location).
pub fn catch_text<T>(work: impl FnOnce() -> T) -> std::result::Result<T, String> {
    CATCHING.set(CATCHING.get() + 1);
    let result = panic::catch_unwind(AssertUnwindSafe(work));
    CATCHING.set(CATCHING.get() - 1);
    result.map_err(|payload| panic_text(payload.as_ref()))
}

/// A future whose panics (in any poll) become an internal error naming `what`.
pub struct Caught<F> {
    inner: Pin<Box<F>>,
    what: &'static str,
}

impl<F> Caught<F> {
    pub fn new(what: &'static str, inner: F) -> Self {
        Self {
            inner: Box::pin(inner),
            what,
        }
    }
}

impl<T, F: Future<Output = Result<T>>> Future for Caught<F> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let what = self.what;
        let inner = self.inner.as_mut();
        CATCHING.set(CATCHING.get() + 1);
        let polled = panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx)));
        CATCHING.set(CATCHING.get() - 1);
        // A future that panicked is never polled again: this one is Ready.
        polled.unwrap_or_else(|payload| Poll::Ready(Err(panicked(what, payload.as_ref()))))
    }
}

fn panicked(what: &str, payload: &(dyn Any + Send)) -> Error {
    Error::internal(&format!("{what} panicked: {}", panic_text(payload)))
}

/// The text the hook kept for the panic just caught on this thread, else the payload's.
fn panic_text(payload: &(dyn Any + Send)) -> String {
    LAST.take()
        .unwrap_or_else(|| payload_text(payload).to_owned())
}

fn payload_text(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

fn describe(info: &PanicHookInfo<'_>) -> String {
    let text = payload_text(info.payload());
    let Some(at) = info.location() else {
        return text.to_owned();
    };
    // A dependency's path without the local registry: `tokio-1.54.1/src/...`.
    let file = at.file();
    let file = match file.rsplit_once("/registry/src/") {
        Some((_, rest)) => rest.split_once('/').map_or(rest, |(_, path)| path),
        None => file,
    };
    format!("{text}, at {file}:{}", at.line())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_our_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
        install_hook();
        std::thread::Builder::new()
            .name("surefetch-test".into())
            .spawn(work)
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn a_caught_panic_is_an_internal_error_with_its_place() {
        let err =
            on_our_thread(|| catch::<()>("the test stage", || panic!("boom {}", 42)).unwrap_err());
        let text = err.to_string();
        assert!(matches!(err, Error::Internal(_)), "{text}");
        assert!(text.contains("the test stage panicked: boom 42"), "{text}");
        assert!(text.contains("panics.rs"), "{text}");
    }

    #[test]
    fn a_panicking_future_is_ready_with_an_error() {
        let err = on_our_thread(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(Caught::new("the test task", async {
                if std::hint::black_box(true) {
                    panic!("inside a poll");
                }
                Ok(())
            }))
        })
        .unwrap_err();
        assert!(err
            .to_string()
            .contains("the test task panicked: inside a poll"));
    }

    #[test]
    fn an_uncaught_panic_on_a_runtime_thread_marks_it_broken() {
        install_hook();
        let generation = 1_000_000 + u64::from(fastrand::u32(..));
        assert_eq!(runtime_panic(generation), None);
        let joined = std::thread::Builder::new()
            .name(RUNTIME_THREAD.into())
            .spawn(move || {
                on_runtime_thread(generation);
                panic!("the driver failed");
            })
            .unwrap()
            .join();
        assert!(joined.is_err());
        let text = runtime_panic(generation).unwrap();
        assert!(text.contains("the driver failed"), "{text}");
        assert!(broken_runtime(&text).to_string().contains("internal error"));
    }
}
