//! SIGINT/SIGTERM handling for the demo: the handler only sets a flag (async-signal-safe); every step and
//! every wait of the demo polls [`interrupted`] and unwinds into the normal, idempotent teardown.

use std::sync::atomic::{AtomicI32, Ordering};

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: i32) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM. Call before anything is created.
pub fn install() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    // SA_RESTART keeps blocking reads of child output from failing with EINTR.
    let sa = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: `on_signal` only stores into an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &sa) };
    }
}

/// The signal received so far, if any.
pub fn received() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

pub fn interrupted() -> bool {
    received().is_some()
}

/// Sleeps `d` in small steps; returns false early if a signal arrived.
pub fn sleep(d: std::time::Duration) -> bool {
    let end = std::time::Instant::now() + d;
    while std::time::Instant::now() < end {
        if interrupted() {
            return false;
        }
        std::thread::sleep(
            std::time::Duration::from_millis(50).min(end - std::time::Instant::now()),
        );
    }
    !interrupted()
}
