//! Moving a finished, verified part file to its final path, atomically and durably.

use std::fs::{self, File};
use std::path::Path;

use crate::error::{Error, Result};

/// Renames `part` over `final_path` (replacing any file there in one step) and,
/// when `durable`, fsyncs the directory so the new name survives a power loss.
/// A rename across filesystems fails with `EXDEV`: there is no fallback to a copy,
/// which could leave a partial file at the final path.
///
/// When only the directory sync fails, the file *is* at `final_path`: the error
/// says so (`Left::Installed`) rather than claim the destination was untouched.
pub fn persist(part: &Path, final_path: &Path, durable: bool) -> Result<()> {
    fs::rename(part, final_path).map_err(|e| Error::storage("renaming into", final_path, e))?;
    if durable {
        sync_parent(final_path).map_err(|e| Error::not_durable(final_path, e))?;
    }
    Ok(())
}

/// fsyncs the directory holding `path`.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_final_file_in_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("a.part");
        let dest = dir.path().join("a");
        fs::write(&dest, b"old").unwrap();
        fs::write(&part, b"new").unwrap();
        persist(&part, &dest, true).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        assert!(!part.exists());
    }

    #[test]
    fn a_missing_part_leaves_the_destination_alone() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a");
        fs::write(&dest, b"old").unwrap();
        let err = persist(&dir.path().join("gone.part"), &dest, false).unwrap_err();
        assert!(matches!(err, Error::Storage { .. }));
        assert_eq!(fs::read(&dest).unwrap(), b"old");
    }
}
