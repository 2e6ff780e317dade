//! Races every wait of a transfer against its cancel token, its overall
//! deadline and (for network reads) the idle-read timeout.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::cancel::CancelToken;
use crate::error::{Error, Result, TimeoutKind};

#[derive(Clone, Debug)]
pub struct Guard {
    cancel: CancelToken,
    overall: Option<Duration>,
    deadline: Option<Instant>,
    idle: Option<(Duration, TimeoutKind)>,
}

impl Guard {
    /// `idle`: how long a network read may stay silent, and which limit that is (the
    /// read timeout, or the low-speed limit when its window is shorter).
    pub fn new(
        cancel: CancelToken,
        overall: Option<Duration>,
        idle: Option<(Duration, TimeoutKind)>,
    ) -> Self {
        Self {
            cancel,
            overall,
            deadline: overall.map(|d| Instant::now() + d),
            idle,
        }
    }

    pub fn check(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        match (self.deadline, self.overall) {
            (Some(deadline), Some(after)) if Instant::now() >= deadline => Err(Error::Timeout {
                kind: TimeoutKind::Overall,
                after,
            }),
            _ => Ok(()),
        }
    }

    /// Waits for `fut` unless the token is cancelled or the deadline passes first.
    pub async fn wait<F: Future>(&self, fut: F) -> Result<F::Output> {
        self.race(fut, None).await
    }

    /// Like `wait`, and also fails when the network stays silent for the read timeout.
    pub async fn read<F: Future>(&self, fut: F) -> Result<F::Output> {
        self.race(fut, self.idle).await
    }

    /// Sleeps, unless cancelled or out of time.
    pub async fn sleep(&self, duration: Duration) -> Result<()> {
        self.wait(tokio::time::sleep(duration)).await
    }

    async fn race<F: Future>(
        &self,
        fut: F,
        idle: Option<(Duration, TimeoutKind)>,
    ) -> Result<F::Output> {
        let overall = sleep_until_or_forever(self.deadline);
        let idle_timer = sleep_until_or_forever(idle.map(|(d, _)| Instant::now() + d));
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(Error::Cancelled),
            _ = overall => Err(Error::Timeout {
                kind: TimeoutKind::Overall,
                after: self.overall.unwrap_or_default(),
            }),
            out = fut => Ok(out),
            _ = idle_timer => {
                let (after, kind) = idle.unwrap_or((Duration::ZERO, TimeoutKind::Read));
                Err(Error::Timeout { kind, after })
            }
        }
    }
}

async fn sleep_until_or_forever(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cancel_wins_over_a_pending_wait() {
        let token = CancelToken::new();
        let guard = Guard::new(token.clone(), None, None);
        let canceller = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            canceller.cancel();
        });
        let started = std::time::Instant::now();
        let out = guard.wait(std::future::pending::<()>()).await;
        assert!(matches!(out, Err(Error::Cancelled)));
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn idle_and_overall_timeouts() {
        let guard = Guard::new(
            CancelToken::new(),
            Some(Duration::from_millis(200)),
            Some((Duration::from_millis(30), TimeoutKind::Read)),
        );
        let out = guard.read(std::future::pending::<()>()).await;
        assert!(matches!(
            out,
            Err(Error::Timeout {
                kind: TimeoutKind::Read,
                ..
            })
        ));
        let out = guard.wait(std::future::pending::<()>()).await;
        assert!(matches!(
            out,
            Err(Error::Timeout {
                kind: TimeoutKind::Overall,
                ..
            })
        ));
        assert!(guard.check().is_err());
    }
}
