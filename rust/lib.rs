//! surefetch's hot path: stream, hash, write a part file, verify, fsync, rename.
//!
//! Only `bindings` knows about Python; every other module is plain Rust.

pub mod cancel;

mod bindings;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    bindings::register(m)
}
