//! Many downloads in one call: one runtime, a global limit on the transfers in
//! flight, the shared client's connections reused per host, each item's result
//! as soon as it is known, and a group commit.
//!
//! Group commit (as a database commits a group of transactions with one log
//! flush): a durable item is verified and left staged, unsynced; a committer
//! takes every item staged by then (waiting `COMMIT_DELAY` for more), makes
//! them durable together (one `syncfs` per filesystem for a group, `fsync` for
//! a few files), renames each into place, then fsyncs each directory once. While it works, more items stage
//! and form the next group. A file is never renamed before its data is durable.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use std::sync::mpsc::Sender;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::cancel::CancelToken;
use crate::download::{download_staged, Options, Outcome, Progress, Staged};
use crate::error::{Error, Result};

/// One download of a batch.
#[derive(Debug, Clone)]
pub struct Item {
    pub url: String,
    pub dest: PathBuf,
    pub options: Options,
}

/// Progress of a whole batch, summed over its items.
#[derive(Debug)]
pub struct BatchProgress {
    items: Vec<Arc<Progress>>,
    finished: AtomicU64,
}

/// A snapshot of `BatchProgress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub items_done: u64,
    pub items: u64,
    pub bytes_done: u64,
    /// The sum of the sizes known so far.
    pub bytes_known: u64,
}

impl BatchProgress {
    pub fn new(items: usize) -> Arc<Self> {
        Arc::new(Self {
            items: (0..items).map(|_| Progress::new()).collect(),
            finished: AtomicU64::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Item `index`'s bytes done and total, if known.
    pub fn item(&self, index: usize) -> (u64, Option<u64>) {
        self.items.get(index).map_or((0, None), |p| p.get())
    }

    pub fn get(&self) -> Totals {
        let (mut bytes_done, mut bytes_known) = (0, 0);
        for item in &self.items {
            let (done, total) = item.get();
            bytes_done += done;
            bytes_known += total.unwrap_or(done);
        }
        Totals {
            items_done: self.finished.load(Ordering::Relaxed),
            items: self.items.len() as u64,
            bytes_done,
            bytes_known,
        }
    }
}

/// The result of item `index`.
pub type ItemResult = (usize, Result<Outcome>);

/// Runs `items`, at most `jobs` at a time, and sends each one's result on
/// `results` as soon as it is final (after its commit when `durable`). Items
/// are independent: one failing does not stop the others; `cancel` stops all.
pub async fn download_batch(
    items: Vec<Item>,
    jobs: usize,
    durable: bool,
    cancel: CancelToken,
    progress: Arc<BatchProgress>,
    results: Sender<ItemResult>,
) {
    let (submit, submissions) = mpsc::unbounded_channel();
    for (index, item) in items.into_iter().enumerate() {
        let cancel = cancel.child();
        let _ = submit.send(Submission {
            index,
            item,
            cancel,
        });
    }
    drop(submit);
    drive(submissions, jobs, durable, results, Some(progress)).await;
}

/// One item submitted to a running batch (`download_stream`), with its own token.
pub struct Submission {
    pub index: usize,
    pub item: Item,
    pub cancel: CancelToken,
}

/// Like `download_batch`, for items that arrive while it runs (a supervisor worker's
/// jobs): each starts, in the order submitted, once fewer than `jobs` are in flight,
/// unless its token was cancelled first (an item behind one still waiting for a place
/// is looked at when its turn comes); its result is sent on `results` once final,
/// after the group commit. Ends when `submissions` closes and every item is final.
pub async fn download_stream(
    submissions: mpsc::UnboundedReceiver<Submission>,
    jobs: usize,
    durable: bool,
    results: Sender<ItemResult>,
) {
    drive(submissions, jobs, durable, results, None).await;
}

/// The batch itself: items start in the order submitted, `jobs` at a time (a place
/// first, then the item's task, so that only the running items hold a download's
/// state); one cancelled before it got a place ends at once, nothing of it on disk.
/// `progress`: a batch known in advance, whose items report progress and where no
/// two items may land on one file; None: a stream, which may download one
/// destination again later (two at once cannot both stage: the second finds the
/// first's part lock).
async fn drive(
    mut submissions: mpsc::UnboundedReceiver<Submission>,
    jobs: usize,
    durable: bool,
    results: Sender<ItemResult>,
    progress: Option<Arc<BatchProgress>>,
) {
    let limit = Arc::new(Semaphore::new(jobs.max(1)));
    let room = Arc::new(Semaphore::new(staged_room()));
    let (staged_tx, staged_rx) = mpsc::unbounded_channel::<Waiting>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let committer = tokio::spawn(commit_groups(
        staged_rx,
        results.clone(),
        progress.clone(),
        durable,
        progress.is_some(),
        Arc::clone(&in_flight),
    ));
    let mut workers = tokio::task::JoinSet::new();
    while let Some(Submission {
        index,
        item,
        cancel,
    }) = submissions.recv().await
    {
        let permits = tokio::select! {
            permits = async {
                let room = Arc::clone(&room).acquire_owned().await.ok()?;
                let permit = Arc::clone(&limit).acquire_owned().await.ok()?;
                Some((room, permit))
            } => permits,
            () = cancel.cancelled() => None,
        };
        while workers.try_join_next().is_some() {} // the finished ones, not to keep them
        let Some((room, permit)) = permits.filter(|_| !cancel.is_cancelled()) else {
            let batch = progress.as_deref();
            finish(&results, batch, index, Err(Error::CancelledBeforeStart));
            continue;
        };
        let started = Started {
            index,
            cancel,
            progress: progress
                .as_ref()
                .map_or_else(Progress::new, |p| Arc::clone(&p.items[index])),
            batch: progress.clone(),
            permit,
            room,
            in_flight: InFlight::new(&in_flight),
        };
        workers.spawn(run_item(
            item,
            started,
            durable,
            results.clone(),
            staged_tx.clone(),
        ));
    }
    drop(staged_tx);
    while workers.join_next().await.is_some() {} // a panicked item gets no result
    let _ = committer.await;
}

/// What an item that got its place in a batch runs with.
struct Started {
    index: usize,
    cancel: CancelToken,
    progress: Arc<Progress>,
    batch: Option<Arc<BatchProgress>>,
    permit: OwnedSemaphorePermit,
    /// Its place among the items staged and not yet committed (`staged_room`).
    room: OwnedSemaphorePermit,
    in_flight: InFlight,
}

/// A verified download waiting for its group commit, holding its place among them
/// until the commit is over.
struct Waiting {
    index: usize,
    outcome: Outcome,
    staged: Staged,
    room: OwnedSemaphorePermit,
}

/// How many items of a batch may be staged and waiting for their group commit at once:
/// each keeps a descriptor (its part lock) until then, and a fast server stages them
/// faster than a commit ends. A quarter of the soft limit on open files, from 16 to
/// 1,024 (the usual soft limit, 1,024, allows 256).
fn staged_room() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let soft = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 => limit.rlim_cur,
        _ => 1024,
    };
    usize::try_from(soft / 4)
        .unwrap_or(usize::MAX)
        .clamp(16, 1024)
}

/// Counts an item as downloading until dropped (the committer waits for such items).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Downloads one item and stages it for the committer (or sends its result: a
/// failure, or a `304` that leaves nothing to commit).
async fn run_item(
    item: Item,
    started: Started,
    durable: bool,
    results: Sender<ItemResult>,
    staged_tx: mpsc::UnboundedSender<Waiting>,
) {
    let Started {
        index,
        cancel,
        progress,
        batch,
        permit: _permit,
        room,
        in_flight,
    } = started;
    let Item { url, dest, options } = item;
    let options = Options { durable, ..options };
    // Staged, whether durable or not: the committer is where two items that would land
    // on one file (names from servers) are told apart.
    let downloaded = download_staged(&url, &dest, &options, cancel, progress).await;
    let downloaded = match (downloaded, &options.install_by_digest) {
        (Ok((outcome, Some(staged))), Some(store)) => by_digest(outcome, staged, store),
        (other, _) => other,
    };
    drop(in_flight); // before the committer can see it: no longer one to wait for
    match downloaded {
        Ok((outcome, Some(staged))) => {
            let _ = staged_tx.send(Waiting {
                index,
                outcome,
                staged,
                room,
            });
        }
        // Revalidated (304): nothing written, nothing to commit.
        Ok((outcome, None)) => finish(&results, batch.as_deref(), index, Ok(outcome)),
        Err(error) => finish(&results, batch.as_deref(), index, Err(error)),
    }
}

/// The verified download `staged` bound for its content address in `store`
/// (`Options::install_by_digest`) instead of its destination.
fn by_digest(
    mut outcome: Outcome,
    mut staged: Staged,
    store: &Path,
) -> Result<(Outcome, Option<Staged>)> {
    let Some(sha256) = outcome.sha256.as_deref().filter(|s| s.len() > 2) else {
        let _ = std::fs::remove_file(&staged.part);
        return Err(Error::InvalidArgument(
            "install_by_digest needs the SHA-256 of the download (compute_sha256)".into(),
        ));
    };
    staged.destination = store.join(&sha256[..2]).join(sha256);
    staged.content_addressed = true;
    outcome.path = staged.destination.clone();
    Ok((outcome, Some(staged)))
}

fn finish(
    results: &Sender<ItemResult>,
    progress: Option<&BatchProgress>,
    index: usize,
    result: Result<Outcome>,
) {
    if let Some(progress) = progress {
        progress.finished.fetch_add(1, Ordering::Relaxed);
    }
    let _ = results.send((index, result));
}

/// The committer: takes every item staged so far, commits them as one group,
/// and repeats until no more can come.
async fn commit_groups(
    mut staged: mpsc::UnboundedReceiver<Waiting>,
    results: Sender<ItemResult>,
    progress: Option<Arc<BatchProgress>>,
    durable: bool,
    refuse_repeats: bool,
    in_flight: Arc<AtomicUsize>,
) {
    let mut installed = HashSet::new();
    let mut part_dirs = BTreeSet::new();
    while let Some(first) = staged.recv().await {
        let mut group = vec![first];
        // Like a database's commit_delay: a moment for the items finishing
        // alongside to join, so that one sync serves them all; and, as its
        // commit_siblings, none when no other item is still downloading.
        let gather = tokio::time::sleep(COMMIT_DELAY);
        tokio::pin!(gather);
        loop {
            while let Ok(more) = staged.try_recv() {
                group.push(more);
            }
            if in_flight.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::select! {
                more = staged.recv() => match more {
                    Some(more) => group.push(more),
                    None => break,
                },
                () = &mut gather => break,
            }
        }
        part_dirs.extend(group.iter().map(|waiting| waiting.staged.part_dir.clone()));
        let (group, rooms): (Vec<_>, Vec<_>) = group
            .into_iter()
            .map(|w| ((w.index, w.outcome, w.staged), w.room))
            .unzip();
        let (committed, kept) = tokio::task::spawn_blocking(move || {
            let committed = commit(group, durable, &mut installed);
            drop(rooms); // their part locks are gone with the group: room for more
            if !refuse_repeats {
                installed.clear();
            }
            (committed, installed)
        })
        .await
        .unwrap_or_default();
        installed = kept;
        for (index, result) in committed {
            finish(&results, progress.as_deref(), index, result);
        }
    }
    // Tidy once the batch is over (not after each group, which would only have the
    // next items create the directory again), unless another download is under way there.
    tokio::task::spawn_blocking(move || {
        for dir in part_dirs {
            let _ = std::fs::remove_dir(dir);
        }
    })
    .await
    .unwrap_or_default();
}

/// Makes a group durable (when asked), renames each file into place unless an
/// earlier item of the batch took that path, fsyncs each directory once; returns
/// each item's result.
fn commit(
    mut group: Vec<(usize, Outcome, Staged)>,
    durable: bool,
    installed: &mut HashSet<PathBuf>,
) -> Vec<ItemResult> {
    // By directory (a stable sort: items bound for one file keep their order), so that
    // one blob directory at a time is open, however many the group fills.
    group.sort_by(|(_, _, a), (_, _, b)| a.destination.parent().cmp(&b.destination.parent()));
    let parts: Vec<&Path> = group.iter().map(|(_, _, s)| s.part.as_path()).collect();
    let mut shard = None;
    let synced = if durable {
        sync_files(&parts)
    } else {
        parts.iter().map(|_| Ok(())).collect()
    };
    let mut results = Vec::with_capacity(group.len());
    let mut renamed: Vec<(usize, Outcome, PathBuf)> = Vec::new();
    for ((index, outcome, staged), synced) in group.into_iter().zip(synced) {
        let taken = !staged.content_addressed && !installed.insert(staged.destination.clone());
        let synced = synced.and_then(|()| match taken {
            false => Ok(()),
            true => Err(Error::InvalidArgument(format!(
                "another item of this batch was already installed at {} (a name the server gave, \
                 with --content-disposition): give this one out=NAME; its download was discarded",
                staged.destination.display()
            ))),
        });
        let done = synced.and_then(|()| {
            rename_into_place(&staged, &mut shard)
                .map_err(|e| Error::storage("renaming into", &staged.destination, e))
        });
        match done {
            Ok(()) => renamed.push((index, outcome, staged.destination.clone())),
            Err(error) => {
                let _ = std::fs::remove_file(&staged.part);
                results.push((index, Err(error)));
            }
        }
        drop(staged);
    }
    // Each directory once, for every file renamed into it.
    let mut by_dir: BTreeMap<PathBuf, Vec<(usize, Outcome)>> = BTreeMap::new();
    for (index, outcome, destination) in renamed {
        let dir = parent_of(&destination);
        by_dir.entry(dir).or_default().push((index, outcome));
    }
    let dirs: Vec<&Path> = by_dir.keys().map(PathBuf::as_path).collect();
    let synced: Vec<io::Result<()>> = match durable {
        true => sync_paths(&dirs, &mut |dir| std::fs::metadata(dir).map(|m| m.dev()))
            .into_iter()
            .map(|synced| synced.map_err(|(_, e)| e))
            .collect(),
        false => dirs.iter().map(|_| Ok(())).collect(),
    };
    for ((_, items), synced) in by_dir.into_iter().zip(synced) {
        for (index, outcome) in items {
            let result = match &synced {
                Ok(()) => Ok(outcome),
                // The file is in place, whole and verified; only its durability is unknown.
                Err(e) => Err(Error::not_durable(&outcome.path, same_error(e))),
            };
            results.push((index, result));
        }
    }
    results
}

/// Renames the staged file to its destination. A content address goes into its blob
/// directory through a descriptor of that directory opened without following a
/// symlink (`open_shard`; `shard` keeps the last one open for the next item), so that
/// a symlink or another user's directory that appeared there while the batch ran is
/// never written through.
fn rename_into_place(staged: &Staged, shard: &mut Option<(PathBuf, File)>) -> io::Result<()> {
    if !staged.content_addressed {
        return std::fs::rename(&staged.part, &staged.destination);
    }
    let shard_path = parent_of(&staged.destination);
    let shard = match shard.take() {
        Some((path, dir)) if path == shard_path => shard.insert((path, dir)),
        _ => {
            let opened = open_shard(&shard_path)?;
            shard.insert((shard_path, opened))
        }
    };
    let shard = &shard.1;
    let name = staged
        .destination
        .file_name()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let from = CString::new(staged.part.as_os_str().as_bytes())?;
    let to = CString::new(name.as_bytes())?;
    // SAFETY: both strings are NUL-terminated and the directory descriptor is open.
    let renamed = unsafe {
        libc::renameat(
            libc::AT_FDCWD,
            from.as_ptr(),
            shard.as_raw_fd(),
            to.as_ptr(),
        )
    };
    match renamed {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The blob directory at `path` (made, 0755 minus the umask, when missing), opened
/// without following a symlink, if the cache may put blobs in it: by the rule of
/// `surefetch.cache.store._check_dir`, a real directory that is this user's or root's,
/// or another user's that neither group nor others may write unless it is sticky.
fn open_shard(path: &Path) -> io::Result<File> {
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
    };
    let opened = match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match std::fs::DirBuilder::new().mode(0o755).create(path) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => open(),
            }
        }
        other => other,
    };
    let refused = |problem: String| {
        io::Error::other(format!(
            "{problem}: the cache never puts a blob there; remove it (as its owner or root)"
        ))
    };
    let dir = opened.map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR) => refused(format!(
            "{} is a symbolic link or not a directory",
            path.display()
        )),
        _ => e,
    })?;
    let meta = dir.metadata()?;
    let shared_unsafely = meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0;
    if !crate::part::owned_by_me_or_root(&meta) && shared_unsafely {
        return Err(refused(format!(
            "{} belongs to another user (uid {}) and others may write it",
            path.display(),
            meta.uid()
        )));
    }
    Ok(dir)
}

/// fsyncs a lone file; for a group, one `syncfs` per filesystem, which writes
/// back every file of the group on it in one call.
fn sync_files(parts: &[&Path]) -> Vec<Result<()>> {
    // A file of ours is on its directory's filesystem (it is no mount point): one stat
    // per directory tells them apart, not one per file.
    let mut devices: BTreeMap<PathBuf, u64> = BTreeMap::new();
    let mut device_of = |part: &Path| -> io::Result<u64> {
        let dir = part.parent().unwrap_or(Path::new("."));
        if let Some(&device) = devices.get(dir) {
            return Ok(device);
        }
        let device = std::fs::metadata(dir)?.dev();
        devices.insert(dir.to_path_buf(), device);
        Ok(device)
    };
    sync_paths(parts, &mut device_of)
        .into_iter()
        .zip(parts)
        .map(|(synced, part)| synced.map_err(|(what, e)| Error::storage(what, *part, e)))
        .collect()
}

/// What failed in `sync_paths`: the path's own sync, or its filesystem's.
type SyncFailure = (&'static str, io::Error);

/// fsyncs each of `paths` (files or directories); from `GROUP_SYNCFS_MIN` of them on,
/// one `syncfs` per filesystem (told apart by `device_of`) instead.
fn sync_paths(
    paths: &[&Path],
    device_of: &mut dyn FnMut(&Path) -> io::Result<u64>,
) -> Vec<std::result::Result<(), SyncFailure>> {
    if paths.len() < GROUP_SYNCFS_MIN {
        return paths
            .iter()
            .map(|path| {
                File::open(path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| ("syncing", e))
            })
            .collect();
    }
    let mut by_device: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    let mut results: Vec<std::result::Result<(), SyncFailure>> = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        match device_of(path) {
            Ok(device) => {
                by_device.entry(device).or_default().push(i);
                results.push(Ok(()));
            }
            Err(e) => results.push(Err(("syncing", e))),
        }
    }
    for members in by_device.values() {
        if let Err(error) = syncfs(paths[members[0]]) {
            for &i in members {
                results[i] = Err(("syncing the filesystem of", same_error(&error)));
            }
        }
    }
    results
}

/// How long a group waits for more items before it is committed.
const COMMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(10);

/// From this many files on, a group is made durable with `syncfs`.
const GROUP_SYNCFS_MIN: usize = 4;

/// Writes back everything on the filesystem holding `path` (`syncfs(2)`).
pub fn syncfs(path: &Path) -> std::io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(file.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An `io::Error` that says the same (errno included), for each item it concerns.
fn same_error(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(errno) => std::io::Error::from_raw_os_error(errno),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_sync_covers_every_file_and_reports_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = (0..6).map(|i| dir.path().join(format!("f{i}"))).collect();
        for f in &files {
            std::fs::write(f, b"x").unwrap();
        }
        let mut paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        assert!(sync_files(&paths).iter().all(Result::is_ok));
        // One stat per directory: a file missing from a directory that exists is the
        // rename's to report; a directory that is missing fails its files here.
        let missing = dir.path().join("gone").join("f");
        paths.push(&missing);
        let results = sync_files(&paths);
        assert!(results[..6].iter().all(Result::is_ok));
        assert!(matches!(results[6], Err(Error::Storage { .. })));
        assert!(sync_files(&paths[..2]).iter().all(Result::is_ok));
        // Fewer than GROUP_SYNCFS_MIN: each is fsynced, and a missing one reported.
        let lone = [paths[0], paths[6]];
        let results = sync_files(&lone);
        assert!(results[0].is_ok() && matches!(results[1], Err(Error::Storage { .. })));
    }

    #[test]
    fn progress_sums_the_items() {
        let progress = BatchProgress::new(2);
        assert_eq!(
            progress.get(),
            Totals {
                items_done: 0,
                items: 2,
                bytes_done: 0,
                bytes_known: 0
            }
        );
        assert_eq!(parent_of(Path::new("f")), PathBuf::from("."));
        assert_eq!(parent_of(Path::new("/a/f")), PathBuf::from("/a"));
    }
}
