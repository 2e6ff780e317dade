//! curl's low-speed limit (`--speed-limit`, `--speed-time`): a response that
//! keeps below a rate for a while is stalled, and is retried like a cut one.

use std::time::{Duration, Instant};

use crate::error::{Error, Result, TimeoutKind};

/// curl's low-speed limit: a response that delivers fewer than `limit` bytes a
/// second over `window` is stalled (retried, and resumed where it can be).
pub struct SpeedMeter {
    limit: u64,
    window: Duration,
    since: Instant,
    bytes: u64,
}

impl SpeedMeter {
    /// A meter whose first window starts at `now`; a `limit` of 0 never fails.
    pub fn new(limit: u64, window: Duration, now: Instant) -> Self {
        Self {
            limit,
            window,
            since: now,
            bytes: 0,
        }
    }

    /// Counts `bytes` that arrived at `now`; fails once the window closed below the limit.
    pub fn record(&mut self, bytes: u64, now: Instant) -> Result<()> {
        if self.limit == 0 {
            return Ok(());
        }
        self.bytes += bytes;
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed < self.window {
            return Ok(());
        }
        if (self.bytes as f64) < self.limit as f64 * elapsed.as_secs_f64() {
            return Err(Error::Timeout {
                kind: TimeoutKind::LowSpeed(self.limit),
                after: self.window, // the --speed-time given, as the message says
            });
        }
        self.since = now;
        self.bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn below_the_limit_for_the_window_is_a_stall() {
        let t0 = Instant::now();
        let mut meter = SpeedMeter::new(1000, 10 * SECOND, t0);
        meter.record(500, t0 + SECOND).unwrap();
        meter.record(500, t0 + 9 * SECOND).unwrap(); // the window is not over yet
        let err = meter.record(100, t0 + 10 * SECOND).unwrap_err();
        assert!(matches!(
            err,
            Error::Timeout {
                kind: TimeoutKind::LowSpeed(1000),
                ..
            }
        ));
    }

    #[test]
    fn a_fast_window_starts_a_new_one() {
        let t0 = Instant::now();
        let mut meter = SpeedMeter::new(1000, 10 * SECOND, t0);
        meter.record(20_000, t0 + 10 * SECOND).unwrap();
        // The next window counts only its own bytes.
        meter.record(5_000, t0 + 15 * SECOND).unwrap();
        assert!(meter.record(1, t0 + 20 * SECOND).is_err());
    }

    #[test]
    fn a_limit_of_zero_is_off() {
        let t0 = Instant::now();
        let mut meter = SpeedMeter::new(0, SECOND, t0);
        meter.record(0, t0 + 100 * SECOND).unwrap();
    }
}
