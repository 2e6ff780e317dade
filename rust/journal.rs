//! The engine's decisions, for the user who wants to know why a download is slow
//! or odd (retries and why, resume offsets, fall-backs, restarts, connections).
//!
//! The engine notes them here from any thread; the bindings hand them to Python's
//! `logging` (logger `surefetch.engine`) on the calling thread, so no engine thread
//! ever waits for the GIL. Messages never hold a password (URLs are redacted).

use std::collections::VecDeque;
use std::sync::Mutex;

/// How much a decision matters (Python's levels: INFO, WARNING).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warning,
}

/// Notes kept until the bindings take them; beyond this the oldest are dropped.
const LIMIT: usize = 10_000;

static NOTES: Mutex<VecDeque<(Level, String)>> = Mutex::new(VecDeque::new());

/// Records a decision.
pub fn note(level: Level, message: String) {
    let mut notes = NOTES.lock().unwrap_or_else(|e| e.into_inner());
    if notes.len() >= LIMIT {
        notes.pop_front();
    }
    notes.push_back((level, message));
}

/// Everything noted since the last call.
pub fn take() -> Vec<(Level, String)> {
    let mut notes = NOTES.lock().unwrap_or_else(|e| e.into_inner());
    notes.drain(..).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_taken_once_in_order() {
        note(Level::Info, "one".into());
        note(Level::Warning, "two".into());
        let taken: Vec<_> = take()
            .into_iter()
            .filter(|(_, m)| m == "one" || m == "two")
            .collect();
        assert_eq!(
            taken,
            [(Level::Info, "one".into()), (Level::Warning, "two".into())]
        );
        assert!(take().iter().all(|(_, m)| m != "one"));
    }
}
