//! Digests: XXH3-128 always, SHA-256 unless the caller opts out. Both are fed
//! the bytes as they stream in, so no second pass over the file is needed.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::Xxh3;

use crate::buffer::{recycle, Block};
use crate::cancel::CancelToken;
use crate::error::{Error, Result};

pub const SHA256_HEX_LEN: usize = 64;
pub const XXH3_128_HEX_LEN: usize = 32;

/// Streaming SHA-256 (uses SHA-NI when the CPU has it).
#[derive(Clone, Default)]
pub struct Sha256Hasher(Sha256);

impl Sha256Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish_hex(self) -> String {
        to_hex(&self.0.finalize())
    }
}

/// Streaming XXH3-128, printed in its canonical big-endian form (as `xxhsum -H2`).
#[derive(Clone)]
pub struct Xxh3Hasher(Box<Xxh3>);

impl Default for Xxh3Hasher {
    fn default() -> Self {
        Self(Box::new(Xxh3::new()))
    }
}

impl Xxh3Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish_hex(&self) -> String {
        format!("{:032x}", self.0.digest128())
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Checks that `value` is a hex digest of `len` digits and returns it lowercased.
pub fn parse_digest(algorithm: &str, value: &str, len: usize) -> Result<String> {
    let value = value.trim();
    if value.len() != len || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::InvalidArgument(format!(
            "invalid {algorithm} digest {value:?}: expected {len} hex digits"
        )));
    }
    Ok(value.to_ascii_lowercase())
}

/// What `hash_file` found: the size and digests of a whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigests {
    pub size: u64,
    pub xxh3_128: String,
    pub sha256: Option<String>,
}

/// Digests of a whole file, read through a page-aligned buffer; stops with
/// `Cancelled` between blocks once `cancel` is cancelled.
pub fn hash_file(path: &Path, with_sha256: bool, cancel: &CancelToken) -> Result<FileDigests> {
    let mut file = File::open(path).map_err(|e| Error::storage("open", path, e))?;
    let mut xxh = Xxh3Hasher::default();
    let mut sha = with_sha256.then(Sha256Hasher::default);
    let mut reader = Cancellable {
        inner: &mut file,
        cancel,
    };
    let size = hash_prefix(&mut reader, u64::MAX, &mut xxh, sha.as_mut()).map_err(|e| {
        if cancel.is_cancelled() {
            Error::Cancelled
        } else {
            Error::storage("read", path, e)
        }
    })?;
    Ok(FileDigests {
        size,
        xxh3_128: xxh.finish_hex(),
        sha256: sha.map(Sha256Hasher::finish_hex),
    })
}

/// A reader that fails once its token is cancelled.
struct Cancellable<'a, R> {
    inner: &'a mut R,
    cancel: &'a CancelToken,
}

impl<R: Read> Read for Cancellable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
        }
        self.inner.read(buf)
    }
}

/// Feeds up to `limit` bytes of `reader` to the hashers; returns how many there were.
pub fn hash_prefix(
    reader: &mut impl Read,
    limit: u64,
    xxh: &mut Xxh3Hasher,
    mut sha: Option<&mut Sha256Hasher>,
) -> std::io::Result<u64> {
    let mut block = Block::take();
    let mut total = 0u64;
    while total < limit {
        block.clear();
        let want = usize::try_from(limit - total).unwrap_or(usize::MAX);
        let n = block.read_from(reader, want)?;
        if n == 0 {
            break;
        }
        xxh.update(block.as_slice());
        if let Some(sha) = sha.as_deref_mut() {
            sha.update(block.as_slice());
        }
        total += n as u64;
    }
    recycle(block);
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        let mut sha = Sha256Hasher::default();
        sha.update(b"abc");
        assert_eq!(
            sha.finish_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // xxhsum -H2 of an empty input.
        assert_eq!(
            Xxh3Hasher::default().finish_hex(),
            "99aa06d3014798d86001c324468d497f"
        );
    }

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut a = Xxh3Hasher::default();
        for piece in data.chunks(4099) {
            a.update(piece);
        }
        assert_eq!(
            a.finish_hex(),
            format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&data))
        );
    }

    #[test]
    fn digests_are_validated_and_lowercased() {
        let upper = "AB".repeat(16);
        assert_eq!(
            parse_digest("xxh3_128", &upper, 32).unwrap(),
            "ab".repeat(16)
        );
        assert!(parse_digest("sha256", "abc", 64).is_err());
        assert!(parse_digest("sha256", &"zz".repeat(32), 64).is_err());
    }
}
