//! Writing the CA's files: secrets are created 0600 in a temporary file next to the target, synced, then
//! moved into place, so a crash never leaves a partial or world-readable key.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{TrustError, random};

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix: [u8; 6] = random();
    let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    path.with_file_name(format!(".{name}.{hex}.tmp"))
}

fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf, TrustError> {
    let tmp = temp_path(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(TrustError::io(&tmp))?;
    // The umask may have cleared bits of `mode` but never adds any; set it exactly.
    let done = f
        .set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|_| f.write_all(bytes))
        .and_then(|_| f.sync_all());
    if let Err(e) = done {
        let _ = fs::remove_file(&tmp);
        return Err(TrustError::io(&tmp)(e));
    }
    Ok(tmp)
}

/// Writes `bytes` to `path` with `mode`, replacing any existing file atomically.
pub(crate) fn write_replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TrustError> {
    let tmp = write_temp(path, bytes, mode)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        TrustError::io(path)(e)
    })
}

/// Writes `bytes` to a new file `path` with `mode`; [`TrustError::Exists`] if `path` exists (a hard link
/// fails on an existing name, so two concurrent writers cannot both succeed).
pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TrustError> {
    let tmp = write_temp(path, bytes, mode)?;
    let r = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(TrustError::Exists(path.to_path_buf()))
        }
        Err(e) => Err(TrustError::io(path)(e)),
    }
}

/// Reads a secret file, refusing it when group or others have any permission on it.
pub(crate) fn read_private(path: &Path, max: usize) -> Result<Vec<u8>, TrustError> {
    let meta = fs::metadata(path).map_err(TrustError::io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TrustError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    read_bounded(path, max)
}

/// Reads a file of at most `max` bytes.
pub(crate) fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, TrustError> {
    let meta = fs::metadata(path).map_err(TrustError::io(path))?;
    if meta.len() > max as u64 {
        return Err(TrustError::TooLong {
            what: "file",
            len: meta.len() as usize,
            max,
        });
    }
    fs::read(path).map_err(TrustError::io(path))
}
