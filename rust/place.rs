//! Putting a verified cache blob at a new path without passing its bytes through
//! user space: a copy-on-write clone (`FICLONE`), a kernel copy (`copy_file_range`,
//! through `std::io::copy`), or, only when asked, a hardlink. The link modes are
//! uv's `--link-mode`; `surefetch._fs` documents them for users.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::hash::{hash_prefix, Xxh3Hasher};

/// How a blob may be placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkMode {
    /// A clone where the filesystem can, else a kernel copy.
    Auto,
    /// A clone, or an error.
    Reflink,
    /// The blob's own inode.
    Hardlink,
    /// A kernel copy.
    Copy,
}

impl LinkMode {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Self::Auto),
            "reflink" => Some(Self::Reflink),
            "hardlink" => Some(Self::Hardlink),
            "copy" => Some(Self::Copy),
            _ => None,
        }
    }
}

/// What was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    Reflink,
    Copy,
    Hardlink,
}

impl Placed {
    pub fn name(self) -> &'static str {
        match self {
            Self::Reflink => "reflink",
            Self::Copy => "copy",
            Self::Hardlink => "hardlink",
        }
    }
}

/// linux/fs.h: `_IOW(0x94, 9, int)`.
const FICLONE: u64 = 0x4004_9409;

/// Creates `target`, which must not exist, with the bytes of `blob`: a clone or copy
/// with the permission bits `mode` (minus the umask), or a hardlink to `blob`. A
/// partly written `target` is removed; the error names the file it is about.
pub fn place(blob: &Path, target: &Path, mode: u32, link: LinkMode) -> Result<Placed> {
    Placer::new(link)
        .place_checked(blob, target, mode, false)
        .map(|(how, _)| how)
}

/// Places many blobs in one link mode, remembering which pairs of filesystems cannot
/// clone (in `auto` mode, not asking them again for each file).
pub struct Placer {
    link: LinkMode,
    /// (source device, target directory) pairs whose clone failed as unsupported.
    no_clone: HashSet<(u64, PathBuf)>,
}

impl Placer {
    pub fn new(link: LinkMode) -> Self {
        Self {
            link,
            no_clone: HashSet::new(),
        }
    }

    /// `place`, and with `verify` the size and XXH3-128 of what landed: a copy read back
    /// through the descriptor that wrote it; a hardlink, which is the blob itself, read
    /// once, since nothing else would notice a blob damaged in the cache before it is
    /// installed.
    pub fn place_checked(
        &mut self,
        blob: &Path,
        target: &Path,
        mode: u32,
        verify: bool,
    ) -> Result<(Placed, Option<(u64, String)>)> {
        if self.link == LinkMode::Hardlink {
            return match std::fs::hard_link(blob, target) {
                Ok(()) if verify => {
                    let landed = File::open(target)
                        .and_then(|linked| digests_of(&linked))
                        .map_err(|e| Error::storage("read", target, e))?;
                    Ok((Placed::Hardlink, Some(landed)))
                }
                Ok(()) => Ok((Placed::Hardlink, None)),
                // Name the file that is missing: the blob (evicted), or the target's directory.
                Err(e) if e.kind() == io::ErrorKind::NotFound && !blob.exists() => {
                    Err(Error::storage("link", blob, e))
                }
                Err(e) => Err(Error::storage("link", target, e)),
            };
        }
        let source = File::open(blob).map_err(|e| Error::storage("open", blob, e))?;
        let mut copy = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(target)
            .map_err(|e| Error::storage("create", target, e))?;
        let placed = self
            .clone_or_copy(&source, &mut copy, target)
            .and_then(|how| {
                let landed = verify.then(|| digests_of(&copy)).transpose()?;
                Ok((how, landed))
            });
        drop(copy);
        placed.map_err(|e| {
            let _ = std::fs::remove_file(target);
            Error::storage("copy into", target, e)
        })
    }

    fn clone_or_copy(
        &mut self,
        source: &File,
        copy: &mut File,
        target: &Path,
    ) -> io::Result<Placed> {
        let meta = source.metadata()?;
        let pair = (
            meta.dev(),
            target.parent().unwrap_or(Path::new("")).to_path_buf(),
        );
        let try_clone = match self.link {
            LinkMode::Reflink => true,
            LinkMode::Auto => !self.no_clone.contains(&pair),
            _ => false,
        };
        if try_clone {
            // SAFETY: both descriptors are open for the duration of the call.
            let cloned = unsafe { libc::ioctl(copy.as_raw_fd(), FICLONE as _, source.as_raw_fd()) };
            if cloned == 0 {
                return Ok(Placed::Reflink);
            }
            let error = io::Error::last_os_error();
            if self.link == LinkMode::Reflink || !cannot_clone(&error) {
                return Err(error);
            }
            self.no_clone.insert(pair);
        }
        copy_exactly(source, copy, meta.len())?;
        Ok(Placed::Copy)
    }
}

/// Copies the first `size` bytes of `source` into `copy` in the kernel
/// (`copy_file_range`; where that is not supported, `std::io::copy`, which falls back
/// to `sendfile` and then to read/write).
fn copy_exactly(source: &File, copy: &mut File, size: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < size {
        let left = usize::try_from(size - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: the descriptors are open; null offsets use and advance the file positions.
        let copied = unsafe {
            libc::copy_file_range(
                source.as_raw_fd(),
                std::ptr::null_mut(),
                copy.as_raw_fd(),
                std::ptr::null_mut(),
                left,
                0,
            )
        };
        match copied {
            0 => break,
            n if n > 0 => done += n as u64,
            _ => {
                let error = io::Error::last_os_error();
                let unsupported = matches!(
                    error.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)
                );
                if !unsupported || done > 0 {
                    return Err(error);
                }
                done = io::copy(&mut source.take(size), copy)?;
                break;
            }
        }
    }
    if done != size {
        return Err(io::Error::other(format!(
            "the source changed size while it was copied ({done} of {size} bytes)"
        )));
    }
    Ok(())
}

/// What `Placer::place_checked` gives for one item.
pub type Checked = Result<(Placed, Option<(u64, String)>)>;

/// Items per thread below which a batch is placed on the calling thread alone.
const ITEMS_PER_THREAD: usize = 64;

/// `Placer::place_checked` for each `(blob, target, mode)`, in order, on up to one
/// thread per core (copies and hashes overlap; creating the files in one directory
/// does not). A thread that cannot start leaves its share to the calling thread.
pub fn place_all(items: &[(PathBuf, PathBuf, u32)], link: LinkMode, verify: bool) -> Vec<Checked> {
    let place_share = |share: &[(PathBuf, PathBuf, u32)]| -> Vec<Checked> {
        let mut placer = Placer::new(link);
        share
            .iter()
            .map(|(blob, target, mode)| placer.place_checked(blob, target, *mode, verify))
            .collect()
    };
    let cores = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4);
    let threads = (items.len() / ITEMS_PER_THREAD).clamp(1, cores);
    if threads == 1 {
        return place_share(items);
    }
    let share = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let started: Vec<_> = items
            .chunks(share)
            .map(|chunk| {
                let spawned = std::thread::Builder::new()
                    .name("surefetch-place".into())
                    .spawn_scoped(scope, move || place_share(chunk));
                (chunk, spawned)
            })
            .collect();
        started
            .into_iter()
            .flat_map(|(chunk, spawned)| match spawned {
                Ok(handle) => handle.join().unwrap_or_else(|_| {
                    let panicked = || Error::internal("a placing thread panicked");
                    chunk.iter().map(|_| Err(panicked())).collect()
                }),
                Err(_) => place_share(chunk),
            })
            .collect()
    })
}

/// Size and XXH3-128 of the whole of `file`, read from its start (its position unused).
fn digests_of(file: &File) -> io::Result<(u64, String)> {
    let mut reader = ReadAt { file, offset: 0 };
    let mut xxh = Xxh3Hasher::default();
    let size = hash_prefix(&mut reader, u64::MAX, &mut xxh, None)?;
    Ok((size, xxh.finish_hex()))
}

/// Reads a file with `pread`, from `offset` on.
struct ReadAt<'a> {
    file: &'a File,
    offset: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// The errors by which a filesystem (or a pair of them) says it cannot clone.
fn cannot_clone(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::EOPNOTSUPP
                | libc::ENOTTY
                | libc::EXDEV
                | libc::EINVAL
                | libc::ENOSYS
                | libc::EPERM
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn each_mode_places_the_bytes_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, b"verified bytes").unwrap();
        for (name, link) in [
            ("auto", LinkMode::Auto),
            ("copy", LinkMode::Copy),
            ("hardlink", LinkMode::Hardlink),
        ] {
            let target = dir.path().join(name);
            let placed = place(&blob, &target, 0o600, link).unwrap();
            assert_eq!(std::fs::read(&target).unwrap(), b"verified bytes");
            let same_inode = std::fs::metadata(&target).unwrap().ino()
                == std::fs::metadata(&blob).unwrap().ino();
            assert_eq!(same_inode, placed == Placed::Hardlink, "{name}");
            if placed != Placed::Hardlink {
                let mode = std::fs::metadata(&target).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{name}");
            }
            let again = place(&blob, &target, 0o600, link).unwrap_err();
            assert!(matches!(&again, Error::Storage { source, .. }
                if source.kind() == io::ErrorKind::AlreadyExists));
        }
    }

    #[test]
    fn a_checked_copy_reports_what_landed() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        let bytes = vec![7u8; 10_000];
        std::fs::write(&blob, &bytes).unwrap();
        let mut placer = Placer::new(LinkMode::Auto);
        let (_, landed) = placer
            .place_checked(&blob, &dir.path().join("copy"), 0o644, true)
            .unwrap();
        let mut xxh = Xxh3Hasher::default();
        xxh.update(&bytes);
        assert_eq!(landed, Some((10_000, xxh.finish_hex())));
        let mut linker = Placer::new(LinkMode::Hardlink);
        let (how, landed) = linker
            .place_checked(&blob, &dir.path().join("link"), 0o644, true)
            .unwrap();
        assert_eq!(how, Placed::Hardlink);
        assert_eq!(landed.map(|(size, _)| size), Some(10_000));
    }

    #[test]
    fn a_batch_placed_on_several_threads_keeps_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let items: Vec<(PathBuf, PathBuf, u32)> = (0..300)
            .map(|i| {
                let blob = dir.path().join(format!("blob{i}"));
                // Every fifth blob is missing: its error must stay at its place.
                if i % 5 != 0 {
                    std::fs::write(&blob, format!("bytes of {i}")).unwrap();
                }
                (blob, dir.path().join(format!("copy{i}")), 0o644)
            })
            .collect();
        let placed = place_all(&items, LinkMode::Auto, true);
        assert_eq!(placed.len(), items.len());
        for (i, ((blob, copy, _), checked)) in items.iter().zip(&placed).enumerate() {
            match checked {
                Ok((_, Some((size, _)))) => {
                    assert_eq!(*size, format!("bytes of {i}").len() as u64);
                    assert_eq!(std::fs::read(copy).unwrap(), std::fs::read(blob).unwrap());
                }
                Err(Error::Storage { path, .. }) => assert!(i % 5 == 0 && path == blob),
                other => panic!("item {i}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_missing_blob_is_named_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("gone");
        let target = dir.path().join("target");
        let error = place(&blob, &target, 0o644, LinkMode::Auto).unwrap_err();
        assert!(matches!(&error, Error::Storage { path, .. } if path == &blob));
        assert!(!target.exists());
    }
}
