//! surefetch's hot path: stream, hash, write a part file, verify, fsync, rename.
//!
//! Only `bindings` knows about Python; every other module is plain Rust.

pub mod atomic;
pub mod batch;
pub mod buffer;
pub mod cancel;
pub mod download;
pub mod error;
pub mod guard;
pub mod hash;
pub mod http;
pub mod journal;
pub mod names;
pub mod options;
pub mod panics;
pub mod part;
pub mod place;
pub mod proxy;
pub mod ranges;
pub mod response;
pub mod retry;
pub mod schedule;
pub mod sink;
pub mod speed;

mod bindings;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    bindings::register(m)
}
