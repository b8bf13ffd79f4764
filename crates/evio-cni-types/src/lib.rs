//! Pure CNI types for evio's plugin: no I/O at all, so every path can be unit tested and fuzzed.
//!
//! - [`config`]: the plugin's network configuration (all keys of evio's design, legacy spellings too) and
//!   conflists.
//! - [`args`]: `CNI_ARGS` (`K=V;K=V`).
//! - [`env`]: the `CNI_*` environment variables each verb needs.
//! - [`result`]: one internal result model, read from and written to CNI versions 0.3.0, 0.3.1, 0.4.0, 1.0.0
//!   and 1.1.0.
//! - [`error`]: the spec's error object and codes.
//! - [`version`]: supported versions, the `VERSION` answer, negotiation with a delegate.
//!
//! Dependencies: `serde`/`serde_json` (the CNI protocol is JSON), `ipnet` (CIDR types with serde, the
//! de-facto standard), `thiserror` (library errors).

pub mod args;
pub mod config;
pub mod env;
pub mod error;
pub mod result;
pub mod version;

pub use error::{CniError, ErrorCode};
