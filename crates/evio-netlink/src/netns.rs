//! Entering network namespaces on a helper thread.

use std::fs::File;
use std::path::Path;

use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, PROC_SUPER_MAGIC, fstatfs};

use crate::{Error, Result};

/// Opens a namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::io(format!("open netns {}", path.display()), e))
}

/// Moves the calling thread into the namespace `ns`.
fn enter(ns: &File, what: &Path) -> Result<()> {
    // Only the calling thread changes namespace; callers only use it on threads they spawned for that.
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
        Error::io(
            format!("enter netns {}", what.display()),
            std::io::Error::from(e),
        )
    })
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
    fstatfs(&f).is_ok_and(|st| {
        let t = st.filesystem_type();
        t == NSFS_MAGIC || t == PROC_SUPER_MAGIC
    })
}
