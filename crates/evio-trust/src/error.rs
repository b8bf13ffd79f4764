//! The crate's error type: every message says what was refused and why.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("malformed {0}")]
    Malformed(String),
    #[error("{what} is {len} bytes, more than the {max} accepted")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("the {0} signature does not verify against the cluster CA")]
    BadSignature(&'static str),
    #[error("the certificate is not valid before {not_before} (now {now}; check the clocks)")]
    NotYetValid { not_before: u64, now: u64 },
    #[error("the certificate expired at {not_after} (now {now})")]
    Expired { not_after: u64, now: u64 },
    #[error("the key of node {node} was revoked by the cluster CA (certificate serial {serial})")]
    Revoked { node: String, serial: u64 },
    #[error("invalid field: {0}")]
    InvalidField(String),
    #[error(
        "the token's CA pin {claimed} does not match its CA key (pin {actual}): the token is corrupt or forged"
    )]
    PinMismatch { claimed: String, actual: String },
    #[error("the CA is {actual}, not the expected {expected}")]
    WrongCa { expected: String, actual: String },
    #[error(
        "join token {id} expired at {expires} (now {now}); create a new one with `evioctl token create`"
    )]
    TokenExpired { id: String, expires: u64, now: u64 },
    #[error("join token {0} is single-use and was already used")]
    TokenUsed(String),
    #[error("join token {0} is unknown to this CA (deleted, or issued by another CA)")]
    UnknownToken(String),
    #[error(
        "the {0} authentication code does not verify (wrong token secret or node key, or tampered)"
    )]
    BadMac(&'static str),
    #[error(
        "the request time {time} is more than {skew} s away from now ({now}); check the clocks"
    )]
    Stale { time: u64, now: u64, skew: u64 },
    #[error("{} already exists: refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    #[error(
        "{} is accessible by group or others (mode {mode:o}): make it 0600 (chmod 600)",
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TrustError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrustError {
        let path = path.into();
        move |source| TrustError::Io { path, source }
    }
}
