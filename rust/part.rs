//! The part file beside the destination, its resume sidecar, and the lock that
//! keeps two processes from writing the same part.
//!
//! Layout: `<dest dir>/.surefetch/<name>.part`, `<name>.part.json` (what resume
//! needs: url, validator, total size, byte ranges done), `<name>.lock`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, IntoRawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const PART_DIR: &str = ".surefetch";

/// How far behind the write head data is pushed to the disk while writing, so
/// that the final fsync has little left to do.
const FLUSH_WINDOW: u64 = 8 << 20;

/// Where a download to `final_path` keeps its work.
#[derive(Debug, Clone)]
pub struct PartPaths {
    pub final_path: PathBuf,
    pub dir: PathBuf,
    pub part: PathBuf,
    pub sidecar: PathBuf,
    pub lock: PathBuf,
}

impl PartPaths {
    pub fn new(final_path: &Path) -> Result<Self> {
        let name = final_path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "destination {} has no usable file name",
                    final_path.display()
                ))
            })?;
        let parent = final_path.parent().unwrap_or(Path::new("."));
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let dir = parent.join(PART_DIR);
        Ok(Self {
            final_path: final_path.to_path_buf(),
            part: dir.join(format!("{name}.part")),
            sidecar: dir.join(format!("{name}.part.json")),
            lock: dir.join(format!("{name}.lock")),
            dir,
        })
    }

    pub fn create_dir(&self) -> Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.dir)
            .map_err(|e| Error::storage("creating", &self.dir, e))
    }

    /// Creates the part directory and takes the lock in it. Another download
    /// finishing in the same directory may remove the directory in between
    /// (when it looks empty): before the lock is taken (NotFound), or between
    /// mkdir's EEXIST and its check that the directory is there (AlreadyExists).
    /// Then create it again.
    pub fn lock(&self) -> Result<PartLock> {
        let mut tries = 0;
        loop {
            match self
                .create_dir()
                .and_then(|()| PartLock::acquire(&self.lock))
            {
                Err(Error::Storage { source, .. })
                    if matches!(
                        source.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::AlreadyExists
                    ) && tries < 100 =>
                {
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    /// Removes the part file and its sidecar; a missing file is not an error.
    pub fn discard(&self) {
        let _ = fs::remove_file(&self.part);
        self.remove_sidecar();
    }

    /// Removes the sidecar and a temporary one a killed process may have left.
    pub fn remove_sidecar(&self) {
        let _ = fs::remove_file(&self.sidecar);
        let _ = fs::remove_file(Sidecar::temporary(&self.sidecar));
    }
}

use std::os::unix::fs::DirBuilderExt;

/// What a later call needs to resume a part file (written atomically).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sidecar {
    pub version: u32,
    pub url: String,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub size: Option<u64>,
    /// Half-open byte ranges `[start, end)` of the part that hold verified-in-order data.
    pub ranges_done: Vec<[u64; 2]>,
}

impl Sidecar {
    pub const VERSION: u32 = 1;

    /// Where `store` writes before renaming.
    pub fn temporary(path: &Path) -> PathBuf {
        path.with_extension("json.tmp")
    }

    /// Reads a sidecar; a missing, unreadable or corrupt one is `None` (start over).
    pub fn load(path: &Path) -> Option<Self> {
        let text = fs::read(path).ok()?;
        let sidecar: Sidecar = serde_json::from_slice(&text).ok()?;
        (sidecar.version == Self::VERSION).then_some(sidecar)
    }

    /// Writes to a temporary file, then renames it over the sidecar (fsyncing the
    /// temporary file first when `durable`). A sidecar lost to a power cut only
    /// means starting over: the digests of a resumed file cover every byte.
    pub fn store(&self, path: &Path, durable: bool) -> io::Result<()> {
        let tmp = Self::temporary(path);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(&serde_json::to_vec(self).map_err(io::Error::other)?)?;
        if durable {
            file.sync_data()?;
        }
        fs::rename(&tmp, path)
    }
}

/// An exclusive, kernel-released lock on `<name>.lock`: a process that dies
/// releases it, so it can never go stale.
#[derive(Debug)]
pub struct PartLock {
    /// Held only for its lock, which closing the file releases.
    _file: File,
    path: PathBuf,
}

impl PartLock {
    /// Takes the lock, or fails with `Busy` when another process holds it.
    pub fn acquire(path: &Path) -> Result<Self> {
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)
                .map_err(|e| Error::storage("opening", path, e))?;
            // SAFETY: flock on a file descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = io::Error::last_os_error();
                return Err(match err.raw_os_error() {
                    Some(libc::EWOULDBLOCK) => Error::Busy {
                        path: path.to_path_buf(),
                    },
                    _ => Error::storage("locking", path, err),
                });
            }
            // The holder we waited on may have unlinked the file: only a lock on
            // the inode that is still at `path` counts.
            let ours = file
                .metadata()
                .map_err(|e| Error::storage("locking", path, e))?;
            match fs::metadata(path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {
                    return Ok(Self {
                        _file: file,
                        path: path.to_path_buf(),
                    })
                }
                _ => continue,
            }
        }
    }
}

impl Drop for PartLock {
    fn drop(&mut self) {
        // Unlink while still holding the lock, so that a waiter notices the change.
        let _ = fs::remove_file(&self.path);
    }
}

/// Writes at least this large go straight to the device (`O_DIRECT`) when they
/// are page-aligned: no page-cache copy, no fresh-page cost, and a short fsync.
const DIRECT_ALIGN: u64 = 4096;
/// Files smaller than this are not worth the synchronous device writes of `O_DIRECT`.
const DIRECT_MIN_SIZE: u64 = 16 << 20;

/// The part file being written: one buffered descriptor, and a second one with
/// `O_DIRECT` for page-aligned writes where the filesystem supports it.
#[derive(Debug)]
pub struct PartFile {
    file: File,
    direct: Option<File>,
    path: PathBuf,
    durable: bool,
    /// Everything below this offset was handed to the disk with `sync_file_range`.
    flushed_to: u64,
    written_to: u64,
}

impl PartFile {
    /// Creates a new, empty part file (removing any previous one), 0644 minus the umask,
    /// preallocated to `size` when it is known. Large files are written with
    /// `O_DIRECT` where the filesystem supports it.
    pub fn create(path: &Path, size: Option<u64>, durable: bool) -> Result<Self> {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::storage("removing", path, e)),
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::storage("creating", path, e))?;
        let part = Self::with_file(file, path, size, durable);
        if let Some(size) = size.filter(|s| *s > 0) {
            part.preallocate(size)?;
        }
        Ok(part)
    }

    /// Opens the part file an interrupted transfer left, to fill in what is
    /// missing; `None` when it is absent or not `size` bytes long (start over).
    pub fn open_existing(path: &Path, size: u64, durable: bool) -> Result<Option<Self>> {
        let file = match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::storage("opening", path, e)),
        };
        let len = file
            .metadata()
            .map_err(|e| Error::storage("opening", path, e))?
            .len();
        Ok((len == size).then(|| Self::with_file(file, path, Some(size), durable)))
    }

    fn with_file(file: File, path: &Path, size: Option<u64>, durable: bool) -> Self {
        let large = size.is_none_or(|s| s >= DIRECT_MIN_SIZE);
        let direct = if large {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
                .open(path)
                .ok()
        } else {
            None
        };
        Self {
            file,
            direct,
            path: path.to_path_buf(),
            durable,
            flushed_to: 0,
            written_to: 0,
        }
    }

    fn preallocate(&self, size: u64) -> Result<()> {
        let len = libc::off_t::try_from(size)
            .map_err(|_| Error::InvalidArgument(format!("size {size} is too large")))?;
        // SAFETY: fallocate on a descriptor we own.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Filesystems without fallocate simply grow as they are written.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                // Still give the file its size, so a resume finds it whole.
                self.file
                    .set_len(size)
                    .map_err(|e| Error::storage("preallocating", &self.path, e))
            }
            _ => Err(Error::storage("preallocating", &self.path, err)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` at `offset`, and pushes older data to the disk behind the write head.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        let aligned = offset % DIRECT_ALIGN == 0
            && data.len() as u64 % DIRECT_ALIGN == 0
            && data.as_ptr() as u64 % DIRECT_ALIGN == 0;
        let direct = match self.direct.as_ref().filter(|_| aligned) {
            Some(direct) => match direct.write_all_at(data, offset) {
                // Some filesystems accept the flag but refuse the write.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct = None;
                    false
                }
                other => {
                    other.map_err(|e| Error::storage("writing", &self.path, e))?;
                    true
                }
            },
            None => false,
        };
        if !direct {
            self.file
                .write_all_at(data, offset)
                .map_err(|e| Error::storage("writing", &self.path, e))?;
        }
        self.written_to = self.written_to.max(offset + data.len() as u64);
        if self.durable && !direct {
            self.flush_behind();
        }
        Ok(())
    }

    /// Makes what was written so far durable (before a sidecar claims it); a
    /// no-op for a non-durable transfer (`--no-fsync`).
    pub fn sync_data(&self) -> Result<()> {
        if !self.durable {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::storage("syncing", &self.path, e))
    }

    /// Starts write-back of each full window as it completes, and waits for the
    /// window before it, so dirty pages stay bounded and the final fsync is short.
    fn flush_behind(&mut self) {
        while self.written_to - self.flushed_to >= FLUSH_WINDOW {
            let fd = self.file.as_raw_fd();
            let start = self.flushed_to as libc::off64_t;
            let window = FLUSH_WINDOW as libc::off64_t;
            // SAFETY: sync_file_range on a descriptor we own; errors surface at fsync.
            unsafe {
                libc::sync_file_range(fd, start, window, libc::SYNC_FILE_RANGE_WRITE);
                if start >= window {
                    libc::sync_file_range(
                        fd,
                        start - window,
                        window,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                }
            }
            self.flushed_to += FLUSH_WINDOW;
        }
    }

    /// Cuts the file to `len` (drops preallocated space past the data).
    pub fn truncate(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::storage("truncating", &self.path, e))
    }

    /// Makes the data durable (when asked), sets the mode, and closes the file,
    /// reporting errors that only show at close (ENOSPC, EIO on some filesystems).
    pub fn finish(self, mode: u32) -> Result<()> {
        drop(self.direct);
        let path = self.path;
        if self.durable {
            self.file
                .sync_all()
                .map_err(|e| Error::storage("syncing", &path, e))?;
        }
        let fd = self.file.into_raw_fd();
        // SAFETY: fchmod and close on the descriptor we own; it is closed exactly once.
        unsafe {
            if libc::fchmod(fd, mode) != 0 {
                let err = io::Error::last_os_error();
                libc::close(fd);
                return Err(Error::storage("setting the mode of", &path, err));
            }
            if libc::close(fd) != 0 {
                return Err(Error::storage("closing", &path, io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

/// The process umask, read without changing it (Linux exposes it in /proc).
pub fn current_umask() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// 0644 (or 0755 when executable) minus the umask.
pub fn file_mode(executable: bool) -> u32 {
    let base = if executable { 0o755 } else { 0o644 };
    base & !current_umask()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_live_in_the_part_dir() {
        let p = PartPaths::new(Path::new("/data/model.bin")).unwrap();
        assert_eq!(p.part, Path::new("/data/.surefetch/model.bin.part"));
        assert_eq!(p.sidecar, Path::new("/data/.surefetch/model.bin.part.json"));
        let rel = PartPaths::new(Path::new("model.bin")).unwrap();
        assert_eq!(rel.part, Path::new("./.surefetch/model.bin.part"));
        assert!(PartPaths::new(Path::new("/data/..")).is_err());
        assert!(PartPaths::new(Path::new("/")).is_err());
    }

    #[test]
    fn sidecar_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.part.json");
        let sidecar = Sidecar {
            version: Sidecar::VERSION,
            url: "http://h/x".into(),
            etag: Some("\"abc\"".into()),
            last_modified: None,
            size: Some(10),
            ranges_done: vec![[0, 4]],
        };
        sidecar.store(&path, true).unwrap();
        assert_eq!(Sidecar::load(&path), Some(sidecar));
        fs::write(&path, b"{\"version\": 1, \"url\": ").unwrap();
        assert_eq!(Sidecar::load(&path), None);
        assert_eq!(Sidecar::load(&dir.path().join("missing.json")), None);
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = PartLock::acquire(&path).unwrap();
        assert!(matches!(PartLock::acquire(&path), Err(Error::Busy { .. })));
        drop(held);
        assert!(!path.exists());
        PartLock::acquire(&path).unwrap();
    }

    #[test]
    fn direct_writes_fall_back_for_an_unaligned_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.part");
        let mut part = PartFile::create(&path, None, false).unwrap();
        let mut block = crate::buffer::Block::take();
        block.fill_from(&vec![1u8; 1 << 20]);
        part.write_at(block.as_slice(), 0).unwrap();
        part.write_at(&[2u8; 10], 1 << 20).unwrap();
        part.finish(0o644).unwrap();
        let data = fs::read(&path).unwrap();
        assert_eq!(data.len(), (1 << 20) + 10);
        assert!(data[..1 << 20].iter().all(|b| *b == 1));
        assert_eq!(&data[1 << 20..], &[2u8; 10]);
    }

    #[test]
    fn part_file_is_written_and_closed_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.part");
        let mut part = PartFile::create(&path, Some(30 << 20), true).unwrap();
        let block = vec![5u8; 1 << 20];
        for i in 0..30u64 {
            part.write_at(&block, i << 20).unwrap();
        }
        part.finish(0o640).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 30 << 20);
        assert_eq!(meta.mode() & 0o777, 0o640);
    }
}
