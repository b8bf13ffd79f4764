//! Entering network namespaces on a helper thread.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::{Error, Result};

/// Opens a namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::io(format!("open netns {}", path.display()), e))
}

/// Moves the calling thread into the namespace `ns`.
fn enter(ns: &File, what: &Path) -> Result<()> {
    // SAFETY: setns takes a valid open fd (kept alive by `ns`) and a namespace type; it only changes the
    // calling thread's namespace, and callers only use it on threads they spawned for that purpose.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(Error::io(
            format!("enter netns {}", what.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Runs `f` on a new thread inside the network namespace at `path` and returns its result. Sockets that
/// `f` opens stay in that namespace after the thread ends, so `f` may return them.
pub fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = open(path)?;
    run_in_file(&ns, path, f)
}

/// Like [`run_in`] with an already opened namespace file.
pub fn run_in_file<T: Send>(ns: &File, what: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            enter(ns, what)?;
            Ok(f())
        });
        h.join()
            .map_err(|_| Error::other(format!("thread in netns {}", what.display()), "panicked"))?
    })
}

/// True when `path` names a network namespace (a nsfs file), false when it does not exist.
pub fn exists(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    // SAFETY: fstatfs on a valid fd with a zeroed out-parameter of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `f` is open for the duration of the call and `st` is a valid, writable statfs.
    let rc = unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) };
    const NSFS_MAGIC: i64 = 0x6e736673;
    const PROC_SUPER_MAGIC: i64 = 0x9fa0;
    rc == 0 && (st.f_type as i64 == NSFS_MAGIC || st.f_type as i64 == PROC_SUPER_MAGIC)
}
