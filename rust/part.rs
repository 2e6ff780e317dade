//! The part file beside the destination, its resume sidecar, and the lock that
//! keeps two processes from writing the same part.
//!
//! Layout: `<dest dir>/.surefetch/<stem>.part`, `<stem>.part.json` (what resume
//! needs: url, validator, total size, byte ranges done), `<stem>.lock`. The stem
//! is the destination's name, shortened (`names::stem`) when a suffix would push
//! it past the filesystem's 255 bytes.
//!
//! Everything under `.surefetch` is ours: the directory must be a real directory
//! (never a symlink) owned by this user or root, its files are opened with
//! `O_NOFOLLOW`, and the sidecar (which holds the URL) and the lock are 0600.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::names;

pub const PART_DIR: &str = ".surefetch";

/// The longest suffix added to a stem: the sidecar's temporary.
const LONGEST_SUFFIX: &str = ".part.json.tmp";

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
    /// `final_path` renamed after the server's Content-Disposition, once known.
    server_named: OnceLock<PathBuf>,
}

impl PartPaths {
    pub fn new(final_path: &Path) -> Result<Self> {
        let name = final_path
            .file_name()
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "destination {} has no usable file name",
                    final_path.display()
                ))
            })?;
        if name == PART_DIR {
            return Err(Error::InvalidArgument(format!(
                "destination {}: {PART_DIR} is the directory where surefetch keeps part files; \
                 choose another file name",
                final_path.display()
            )));
        }
        let parent = final_path.parent().unwrap_or(Path::new("."));
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let dir = parent.join(PART_DIR);
        let stem = names::stem(name.as_bytes(), LONGEST_SUFFIX.len());
        let file = |suffix: &str| dir.join(OsStr::from_bytes(&[&stem, suffix.as_bytes()].concat()));
        Ok(Self {
            final_path: final_path.to_path_buf(),
            part: file(".part"),
            sidecar: file(".part.json"),
            lock: file(".lock"),
            dir: dir.clone(),
            server_named: OnceLock::new(),
        })
    }

    /// Where the file is installed: `final_path`, or beside it under the name
    /// the server gave (`name_after_server`).
    pub fn destination(&self) -> &Path {
        self.server_named.get().unwrap_or(&self.final_path)
    }

    /// Installs the file beside `final_path` under the name a `Content-Disposition`
    /// header value gives, reduced to a bare name (`names::server_name`). The
    /// first usable name counts; an unusable one (nothing left, `.surefetch`)
    /// keeps `final_path`.
    pub fn name_after_server(&self, content_disposition: &[u8]) {
        if let Some(name) = names::server_name(content_disposition).filter(|n| n != PART_DIR) {
            let _ = self.server_named.set(self.final_path.with_file_name(name));
        }
    }

    /// Creates the part directory (and the destination's missing parents), and
    /// checks that it is ours (`part_dir`).
    pub fn create_dir(&self) -> Result<()> {
        let parent = self.dir.parent().unwrap_or(Path::new("."));
        part_dir(parent).map(|_| ())
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
                // The user knows the destination, not our lock file beside it.
                Err(Error::Busy { .. }) => {
                    return Err(Error::Busy {
                        path: self.final_path.clone(),
                    })
                }
                other => return other,
            }
        }
    }

    /// Removes the part file and its sidecar; a missing file is not an error.
    pub fn discard(&self) {
        let _ = remove_if_present(&self.part);
        self.remove_sidecar();
    }

    /// Removes the sidecar and a temporary one a killed process may have left.
    pub fn remove_sidecar(&self) {
        let _ = remove_if_present(&self.sidecar);
        let _ = remove_if_present(&Sidecar::temporary(&self.sidecar));
    }
}

/// The levels of `dir` that do not exist yet, outermost first: what creating it makes,
/// so that a download that fails can remove them again (`remove_made`).
pub fn missing_levels(dir: &Path) -> Vec<PathBuf> {
    let mut missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|level| !level.as_os_str().is_empty() && fs::symlink_metadata(level).is_err())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    missing
}

/// Removes the directories `missing_levels` found missing, innermost first, as long as
/// they are empty (another download may have put something there: it stays).
pub fn remove_made(levels: &[PathBuf]) {
    for level in levels.iter().rev() {
        if fs::remove_dir(level).is_err() {
            return;
        }
    }
}

pub(crate) fn owned_by_me_or_root(meta: &fs::Metadata) -> bool {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    meta.uid() == me || meta.uid() == 0
}

/// The first component of `path` that exists and is not a directory (following
/// symlinks, as creating the directories does), if any.
fn blocking_file(path: &Path) -> Option<PathBuf> {
    let mut at = PathBuf::new();
    for component in path.components() {
        at.push(component);
        match fs::metadata(&at) {
            Ok(meta) if !meta.is_dir() => return Some(at),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Creates `<parent>/.surefetch` (and `parent` when missing), 0755 minus the
/// umask, and checks that it is surefetch's own: a real directory, not a
/// symlink, owned by this user or root. Returns its path.
pub fn part_dir(parent: &Path) -> Result<PathBuf> {
    let dir = parent.join(PART_DIR);
    if fs::symlink_metadata(&dir).is_ok_and(|meta| meta.is_dir() && owned_by_me_or_root(&meta)) {
        return Ok(dir); // the common case, without a mkdir of each level
    }
    // Another download that found the directory empty may remove it at any moment
    // (`remove_dir` when it ends): create it again when it vanished under us.
    let mut tries = 0;
    let meta = loop {
        match create_part_dir(parent, &dir) {
            Err(Error::Storage { source, .. })
                if source.kind() == io::ErrorKind::NotFound && tries < 100 =>
            {
                tries += 1;
            }
            other => break other?,
        }
    };
    check_part_dir(dir, &meta)
}

/// Creates `parent` (each missing level) and the part directory `dir` in it; what is
/// now at `dir`, not followed through a symlink.
fn create_part_dir(parent: &Path, dir: &Path) -> Result<fs::Metadata> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(|e| match blocking_file(parent) {
            // `create_dir_all` says "exists" when a component is a file: name that file.
            Some(file) => Error::storage(
                "creating the directory",
                &file,
                io::Error::from_raw_os_error(libc::ENOTDIR),
            ),
            None => Error::storage("creating", parent, e),
        })?;
    match fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {}
        // Checked by the caller: a directory (ours or not), a file, a symlink...
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::storage("creating", dir, e)),
    }
    fs::symlink_metadata(dir).map_err(|e| Error::storage("creating", dir, e))
}

/// `dir` when `meta` shows a real directory of ours (or root's); else why not.
fn check_part_dir(dir: PathBuf, meta: &fs::Metadata) -> Result<PathBuf> {
    let problem = if meta.file_type().is_symlink() {
        "it is a symbolic link, which surefetch never follows to its part files".to_owned()
    } else if !meta.is_dir() {
        "it is not a directory".to_owned()
    } else if !owned_by_me_or_root(meta) {
        format!(
            "it belongs to another user (uid {}), not to you",
            meta.uid()
        )
    } else {
        return Ok(dir);
    };
    Err(Error::storage(
        "using",
        &dir,
        io::Error::other(format!(
            "{problem}; surefetch keeps its part files in a directory of that name: \
             move it away, or download into another directory"
        )),
    ))
}

/// An error opening one of our files: a symlink in its place is named as such.
fn open_error(operation: &'static str, path: &Path, err: io::Error) -> Error {
    if err.raw_os_error() == Some(libc::ELOOP) {
        return Error::storage(
            operation,
            path,
            io::Error::other(
                "it is a symbolic link, which surefetch never follows among its own files: \
                 remove it",
            ),
        );
    }
    Error::storage(operation, path, err)
}

/// Removes the file at `path` (not following a symlink); nothing there is no error.
/// Looks first: an unlink takes its directory's lock even when there is nothing to
/// remove, and a batch's downloads creating their part files in one directory would
/// wait on each other for nothing.
pub fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(_) => match fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Flags for every open of a file of ours.
const OWN_FILE_FLAGS: i32 = libc::O_CLOEXEC | libc::O_NOFOLLOW;

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
        Self::read(path).ok().flatten()
    }

    /// Reads a sidecar: an error when it cannot be opened (`NotFound`: there is none),
    /// `None` when it is unreadable or corrupt.
    pub fn read(path: &Path) -> io::Result<Option<Self>> {
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(OWN_FILE_FLAGS)
            .open(path)?;
        let mut text = Vec::new();
        if file.read_to_end(&mut text).is_err() {
            return Ok(None);
        }
        let sidecar = serde_json::from_slice::<Sidecar>(&text).ok();
        Ok(sidecar.filter(|s| s.version == Self::VERSION))
    }

    /// Writes to a new temporary file (0600: the URL may hold a password), then
    /// renames it over the sidecar (fsyncing the temporary file first when
    /// `durable`). A sidecar lost to a power cut only means starting over: the
    /// digests of a resumed file cover every byte.
    pub fn store(&self, path: &Path, durable: bool) -> io::Result<()> {
        let tmp = Self::temporary(path);
        remove_if_present(&tmp)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(OWN_FILE_FLAGS)
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
                .mode(0o600)
                .custom_flags(OWN_FILE_FLAGS)
                .open(path)
                .map_err(|e| open_error("opening", path, e))?;
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
            match fs::symlink_metadata(path) {
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
/// Files up to this size are not preallocated: one write allocates them anyway (and
/// fails as early when the disk is full), while `fallocate` would add an unwritten
/// extent for the journal to convert.
const PREALLOCATE_MIN_SIZE: u64 = 1 << 20;

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
    /// `create` made the file (with mode 0644 minus the umask), rather than
    /// `open_existing` finding it.
    created_here: bool,
}

impl PartFile {
    /// Creates a new, empty part file (removing any previous one), 0644 minus the umask,
    /// preallocated to `size` when it is known and over 1 MiB. Large files are written with
    /// `O_DIRECT` where the filesystem supports it.
    pub fn create(path: &Path, size: Option<u64>, durable: bool) -> Result<Self> {
        let create = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(OWN_FILE_FLAGS)
                .open(path)
        };
        let mut created = create();
        for _ in 0..100 {
            match &created {
                // An earlier part (of a call that started over, or was killed): removed
                // only now, as most calls find none.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    remove_if_present(path).map_err(|e| Error::storage("removing", path, e))?;
                }
                // Without a part lock in it (`Options::part_lock`), the part directory may
                // have looked empty to another download tidying up: create it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let destination_dir = path.parent().and_then(Path::parent);
                    part_dir(destination_dir.unwrap_or(Path::new(".")))?;
                }
                _ => break,
            }
            created = create();
        }
        let file = created.map_err(|e| Error::storage("creating", path, e))?;
        let mut part = Self::with_file(file, path, size, durable);
        part.created_here = true;
        if let Some(size) = size.filter(|s| *s > PREALLOCATE_MIN_SIZE) {
            part.preallocate(size)?;
        }
        Ok(part)
    }

    /// Opens the part file an interrupted transfer left, to fill in what is
    /// missing; `None` when it is absent or not `size` bytes long (start over).
    pub fn open_existing(path: &Path, size: u64, durable: bool) -> Result<Option<Self>> {
        let file = match OpenOptions::new()
            .write(true)
            .custom_flags(OWN_FILE_FLAGS)
            .open(path)
        {
            Ok(file) => file,
            // A symlink is never written through: start over (the caller removes it).
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) =>
            {
                return Ok(None)
            }
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
                .custom_flags(OWN_FILE_FLAGS | libc::O_DIRECT)
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
            created_here: false,
        }
    }

    /// The mode `finish` must set for a file with these execute bits, or None when
    /// it has it already: created here 0644, the kernel took the umask off then (so
    /// the umask is read from /proc only for executables and resumed parts).
    pub fn mode_to_set(&self, executable: bool) -> Option<u32> {
        (executable || !self.created_here).then(|| file_mode(executable))
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

    /// Like `finish` without the fsync: for a group commit, which makes many
    /// files durable together (`crate::batch`).
    pub fn finish_unsynced(mut self, mode: Option<u32>) -> Result<()> {
        self.durable = false;
        self.finish(mode)
    }

    /// Makes the data durable (when asked), sets the mode, and closes the file,
    /// reporting errors that only show at close (ENOSPC, EIO on some filesystems).
    pub fn finish(self, mode: Option<u32>) -> Result<()> {
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
            let set_mode = match mode {
                Some(mode) if libc::fchmod(fd, mode) != 0 => Err(io::Error::last_os_error()),
                _ => Ok(()),
            };
            if let Err(err) = set_mode {
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

    /// A download that ends removes the part directory when it is empty; one that
    /// starts at that moment creates it again instead of failing with ENOENT.
    #[test]
    fn part_dir_survives_a_concurrent_tidy() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join(PART_DIR);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tidier = {
            let (dir, stop) = (dir.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = fs::remove_dir(&dir);
                }
            })
        };
        let results: Vec<_> = (0..20000).map(|_| part_dir(parent.path())).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        tidier.join().unwrap();
        let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(failed.is_empty(), "{failed:?}");
    }

    #[test]
    fn paths_live_in_the_part_dir() {
        let p = PartPaths::new(Path::new("/data/model.bin")).unwrap();
        assert_eq!(p.part, Path::new("/data/.surefetch/model.bin.part"));
        assert_eq!(p.sidecar, Path::new("/data/.surefetch/model.bin.part.json"));
        let rel = PartPaths::new(Path::new("model.bin")).unwrap();
        assert_eq!(rel.part, Path::new("./.surefetch/model.bin.part"));
        assert!(PartPaths::new(Path::new("/data/..")).is_err());
        assert!(PartPaths::new(Path::new("/")).is_err());
        assert!(matches!(
            PartPaths::new(Path::new("/data/.surefetch")),
            Err(Error::InvalidArgument(_))
        ));
    }

    /// Every name the filesystem accepts gets internal files that fit, on a
    /// real filesystem: sidecar, its temporary, part and lock are all created.
    #[test]
    fn internal_names_fit_whatever_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "a".to_owned(),
            "n".repeat(200),
            "n".repeat(241),
            "n".repeat(250),
            "n".repeat(255),
            "é".repeat(125),
            format!("{}.bin", "日本".repeat(41)),
        ];
        let mut stems = std::collections::HashSet::new();
        for name in &names {
            assert!(name.len() <= 255);
            let paths = PartPaths::new(&dir.path().join(name)).unwrap();
            for internal in [&paths.part, &paths.sidecar, &paths.lock] {
                let file = internal.file_name().unwrap().as_bytes();
                assert!(file.len() <= 255, "{} → {}", name.len(), file.len());
                assert!(std::str::from_utf8(file).is_ok());
            }
            if name.len() <= 241 {
                assert_eq!(
                    paths.part,
                    dir.path().join(PART_DIR).join(format!("{name}.part"))
                );
            }
            let lock = paths.lock().unwrap();
            let sidecar = Sidecar {
                version: Sidecar::VERSION,
                url: "http://h/x".into(),
                etag: None,
                last_modified: None,
                size: Some(1),
                ranges_done: vec![],
            };
            sidecar.store(&paths.sidecar, false).unwrap();
            PartFile::create(&paths.part, Some(1), false).unwrap();
            assert!(
                stems.insert(paths.part.clone()),
                "two names share a part file"
            );
            drop(lock);
        }
    }

    #[test]
    fn the_server_names_the_file_once() {
        let p = PartPaths::new(Path::new("/data/from-url.bin")).unwrap();
        assert_eq!(p.destination(), Path::new("/data/from-url.bin"));
        p.name_after_server(b"attachment; filename=\"..\"");
        p.name_after_server(b"attachment; filename=\".surefetch\"");
        assert_eq!(p.destination(), Path::new("/data/from-url.bin"));
        p.name_after_server(b"attachment; filename=\"../../etc/passwd\"");
        assert_eq!(p.destination(), Path::new("/data/passwd"));
        p.name_after_server(b"attachment; filename=\"later.bin\"");
        assert_eq!(p.destination(), Path::new("/data/passwd"));
        assert_eq!(p.part, Path::new("/data/.surefetch/from-url.bin.part"));
    }

    fn storage_message(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Err(e @ Error::Storage { .. }) => e.to_string(),
            other => panic!("expected a storage error, got {other:?}"),
        }
    }

    #[test]
    fn a_part_dir_that_is_not_ours_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let paths = PartPaths::new(&dir.path().join("f")).unwrap();

        // A symlink to another directory: nothing is created through it.
        std::os::unix::fs::symlink(elsewhere.path(), &paths.dir).unwrap();
        let text = storage_message(paths.lock());
        assert!(text.contains("symbolic link"), "{text}");
        assert!(text.contains(".surefetch"), "{text}");
        assert_eq!(fs::read_dir(elsewhere.path()).unwrap().count(), 0);
        fs::remove_file(&paths.dir).unwrap();

        // The user's own file of that name: a clear error, not "File exists".
        fs::write(&paths.dir, b"mine").unwrap();
        let text = storage_message(paths.lock());
        assert!(text.contains("not a directory"), "{text}");
        assert_eq!(fs::read(&paths.dir).unwrap(), b"mine");
        fs::remove_file(&paths.dir).unwrap();

        // A directory planted by another user (we run the tests as root or not).
        fs::create_dir(&paths.dir).unwrap();
        let other = 4242;
        // SAFETY: chown on a path we created; fails harmlessly when not root.
        let path = std::ffi::CString::new(paths.dir.as_os_str().as_bytes()).unwrap();
        if unsafe { libc::chown(path.as_ptr(), other, other) } == 0 {
            let text = storage_message(paths.lock());
            assert!(text.contains("another user (uid 4242)"), "{text}");
        }
        fs::remove_dir(&paths.dir).unwrap();

        // Ours: fine.
        drop(paths.lock().unwrap());
        assert!(paths.dir.is_dir());
    }

    #[test]
    fn files_of_ours_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let paths = PartPaths::new(&dir.path().join("f")).unwrap();
        paths.create_dir().unwrap();
        let target = |name: &str| elsewhere.path().join(name);

        std::os::unix::fs::symlink(target("lock"), &paths.lock).unwrap();
        let text = storage_message(paths.lock());
        assert!(text.contains("symbolic link"), "{text}");
        assert!(!target("lock").exists(), "created through the link");
        fs::remove_file(&paths.lock).unwrap();

        // A sidecar (and its temporary) that are links are not read or written through.
        fs::write(target("sidecar"), b"{}").unwrap();
        std::os::unix::fs::symlink(target("sidecar"), &paths.sidecar).unwrap();
        std::os::unix::fs::symlink(target("tmp"), Sidecar::temporary(&paths.sidecar)).unwrap();
        assert_eq!(Sidecar::load(&paths.sidecar), None);
        let sidecar = Sidecar {
            version: Sidecar::VERSION,
            url: "http://user:secret@h/x".into(),
            etag: None,
            last_modified: None,
            size: None,
            ranges_done: vec![],
        };
        sidecar.store(&paths.sidecar, true).unwrap();
        assert_eq!(fs::read(target("sidecar")).unwrap(), b"{}");
        assert!(!target("tmp").exists());
        assert_eq!(Sidecar::load(&paths.sidecar), Some(sidecar));

        // A part file that is a link is not resumed through.
        fs::write(target("part"), b"x").unwrap();
        std::os::unix::fs::symlink(target("part"), &paths.part).unwrap();
        assert!(PartFile::open_existing(&paths.part, 1, false)
            .unwrap()
            .is_none());
        PartFile::create(&paths.part, Some(1), false).unwrap();
        assert_eq!(fs::read(target("part")).unwrap(), b"x");
        assert!(!fs::symlink_metadata(&paths.part)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn the_sidecar_and_the_lock_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PartPaths::new(&dir.path().join("f")).unwrap();
        let lock = paths.lock().unwrap();
        let sidecar = Sidecar {
            version: Sidecar::VERSION,
            url: "http://user:secret@h/x".into(),
            etag: None,
            last_modified: None,
            size: None,
            ranges_done: vec![],
        };
        sidecar.store(&paths.sidecar, false).unwrap();
        for path in [&paths.lock, &paths.sidecar] {
            let mode = fs::metadata(path).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        drop(lock);
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
    fn a_busy_destination_is_named_not_its_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PartPaths::new(&dir.path().join("model.bin")).unwrap();
        let _held = paths.lock().unwrap();
        match paths.lock() {
            Err(error @ Error::Busy { .. }) => {
                let message = error.to_string();
                assert!(message.contains(&format!("{}", dir.path().join("model.bin").display())));
                assert!(!message.contains(".lock"), "{message}");
            }
            other => panic!("expected Busy, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_new_part_replaces_an_old_one_and_never_writes_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.part");
        fs::write(&path, b"left by a killed process").unwrap();
        let mut part = PartFile::create(&path, None, false).unwrap();
        part.write_at(b"new", 0).unwrap();
        part.finish(Some(0o644)).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        PartFile::create(&path, None, false).unwrap();
        assert!(!fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
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
        part.finish(Some(0o644)).unwrap();
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
        part.finish(Some(0o640)).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 30 << 20);
        assert_eq!(meta.mode() & 0o777, 0o640);
    }
}
