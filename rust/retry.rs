//! When to try again and how long to wait: exponential backoff with jitter,
//! and the server's Retry-After when it sends one.

use std::time::{Duration, SystemTime};

/// Exponential backoff: `base * 2^attempt`, capped, with "equal jitter"
/// (a uniformly random half on top of a fixed half) so that clients that failed
/// together do not retry together, while the delays still grow.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

/// The longest wait a Retry-After header can impose on one attempt.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.min(20));
        let full = exp.min(self.cap);
        let half = full / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// The delay before the next attempt, honouring a server's Retry-After.
    pub fn delay_for(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(wait) => wait.min(MAX_RETRY_AFTER),
            None => self.delay(attempt),
        }
    }
}

/// Parses a Retry-After value: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_under_the_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        for attempt in 0..10 {
            let d = b.delay(attempt);
            let full = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_secs(1));
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        // The lower bound of attempt n+1 is the upper bound of attempt n: growth survives jitter.
        assert!(b.delay(3) >= b.delay(2).min(Duration::from_millis(400)) / 2);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(7)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn retry_after_is_capped() {
        let b = Backoff::default();
        assert_eq!(
            b.delay_for(0, Some(Duration::from_secs(100_000))),
            MAX_RETRY_AFTER
        );
    }
}
