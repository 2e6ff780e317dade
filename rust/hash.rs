//! Digests: XXH3-128 always, SHA-256 unless the caller opts out. Both are fed
//! the bytes as they stream in, so no second pass over the file is needed.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::Xxh3;

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

/// Digests of a whole file: (xxh3_128, sha256 if asked).
pub fn hash_file(path: &Path, with_sha256: bool) -> std::io::Result<(String, Option<String>)> {
    let mut file = File::open(path)?;
    let mut xxh = Xxh3Hasher::default();
    let mut sha = with_sha256.then(Sha256Hasher::default);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        xxh.update(&buf[..n]);
        if let Some(sha) = sha.as_mut() {
            sha.update(&buf[..n]);
        }
    }
    Ok((xxh.finish_hex(), sha.map(Sha256Hasher::finish_hex)))
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
