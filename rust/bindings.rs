//! The one place that speaks PyO3: classes, functions and error conversion.

use pyo3::prelude::*;

use crate::cancel;

/// A cancellation token: `cancel()`, `cancelled`, `child()`.
#[pyclass(name = "CancelToken", module = "surefetch._core", frozen)]
pub struct CancelToken {
    pub(crate) inner: cancel::CancelToken,
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

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<CancelToken>()?;
    Ok(())
}
