//! Cooperative cancellation: a token checked between chunks and raced against
//! every network wait, with child tokens that are cancelled with their parent.

use tokio_util::sync::CancellationToken;

/// A cancellation token shared between the caller and a transfer.
///
/// Cancelling a token cancels all of its children; cancelling a child never
/// cancels its parent.
#[derive(Clone, Debug, Default)]
pub struct CancelToken {
    inner: CancellationToken,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token cancelled whenever `self` is, but which can be cancelled alone.
    pub fn child(&self) -> Self {
        Self {
            inner: self.inner.child_token(),
        }
    }

    pub fn cancel(&self) {
        self.inner.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.is_cancelled()
    }

    /// Resolves once the token is cancelled.
    pub async fn cancelled(&self) {
        self.inner.cancelled().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_follows_parent_not_the_reverse() {
        let parent = CancelToken::new();
        let child = parent.child();
        let sibling = parent.child();
        child.cancel();
        assert!(child.is_cancelled());
        assert!(!parent.is_cancelled());
        assert!(!sibling.is_cancelled());
        parent.cancel();
        assert!(sibling.is_cancelled());
    }

    #[test]
    fn child_of_cancelled_parent_starts_cancelled() {
        let parent = CancelToken::new();
        parent.cancel();
        assert!(parent.child().is_cancelled());
    }
}
