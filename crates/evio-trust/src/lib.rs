//! evio's cluster CA: who may join the overlay and what each node owns.
//!
//! A cluster CA (an Ed25519 signing key and an X25519 exchange key, [`CaKey`]) signs one [`NodeCert`] per
//! node: the node's name, its X25519 WireGuard public key, its host VIP and pod subnets, a validity window
//! and a serial. Peers accept a node only with a certificate that verifies against the CA, so someone who
//! can write etcd but does not hold the CA key cannot add a peer, move another node's VIP or subnet to a key
//! of their own, or revoke others ([`Revocation`] records are CA-signed too).
//!
//! A host joins with one printable [`JoinToken`] (`evio1.…`): etcd endpoints (and credentials), the CA's
//! public keys and pin, STUN/TURN settings, a token id and a 32-byte secret. The joining host writes a
//! [`JoinRequest`] to etcd, authenticated with an HMAC keyed by the token secret; the signer
//! (`evioctl ca serve`) checks it against its [`TokenRecord`], claims the node's VIP and subnet, and
//! publishes the certificate. Certificates are renewed without the token: a [`RenewRequest`] is
//! authenticated with a key derived from X25519(node key, CA exchange key), which only the node and the
//! CA can compute. No secret ever goes through etcd. The formats and the reasoning are in docs/security.md.
//!
//! Everything parsed here may come from etcd, i.e. from an attacker: every decoder bounds the input length
//! first ([`MAX_CERT_LEN`] and friends) and checks every field.
//!
//! # For eviod (the integration still to do)
//!
//! - first start with `--join-token`: [`JoinToken::decode`] (checks the pin), connect with
//!   [`client::etcd_options`] (plus any TLS flags), then [`client::join`]`(store, &token, node, &public_key,
//!   timeout)` → `(NodeCert, signed)`. Keep `token.ca` ([`CaPublic::save`] as `<state-dir>/ca.json`) and the
//!   signed certificate in the state directory; publish `signed` in the node record.
//! - renewal: at [`NodeCert::renew_at`], [`client::renew`]`(store, &ca, &private_key, &cert, timeout)`.
//! - accepting a peer: [`NodeCert::verify_peer`]`(signed, &ca, peer_name, &peer_key, &revocations, now)` →
//!   what the peer owns (VIP, subnets) or why not; `revocations` from [`client::revocations`] (refresh on
//!   watch events under `/evio/v1/revoked/`). Re-check on expiry.
//!
//! Dependencies, all well-kept and widely used: `ed25519-dalek` and `x25519-dalek` (the dalek-cryptography
//! implementations also behind boringtun's X25519), `sha2` and `hmac` (RustCrypto; `hmac`'s `verify_slice`
//! compares in constant time), `getrandom` (the OS random source, no userspace RNG to seed), `base64`,
//! `serde`/`serde_json` (the signed bodies are JSON so operators can read them), `ipnet`, `thiserror`,
//! `zeroize` (wipes key material held in memory). The optional `etcd` feature adds the join and renewal
//! clients over `evio-store` and `tokio`.

mod ca;
mod cert;
mod error;
mod files;
pub mod ledger;
mod request;
mod token;

#[cfg(feature = "etcd")]
pub mod client;

pub use ca::{CaKey, CaPublic, pin_of};
pub use cert::{
    CertRecord, NodeCert, Refusal, RefusalRecord, Revocation, RevocationRecord, valid_node_name,
};
pub use error::TrustError;
pub use request::{JoinRequest, RenewRequest};
pub use token::{JoinToken, TokenRecord, mac_key};

/// Allowed difference between the clocks of the signer, the joining node and the verifying peers, in
/// seconds: a certificate is accepted from `not_before - CLOCK_SKEW_SECS` to `not_after + CLOCK_SKEW_SECS`,
/// and a request whose `time` is further than this from the signer's clock is refused (bounds replays).
pub const CLOCK_SKEW_SECS: u64 = 300;
/// Longest signed certificate accepted (bytes of the encoded string). A certificate with the maximum number of
/// subnets and a 253-character name is about 1.1 KiB.
pub const MAX_CERT_LEN: usize = 4096;
/// Most pod subnets one certificate may grant.
pub const MAX_SUBNETS: usize = 16;
/// Longest join token accepted.
pub const MAX_TOKEN_LEN: usize = 8192;
/// Longest join or renewal request accepted (bytes of JSON).
pub const MAX_REQUEST_LEN: usize = 2048;
/// Longest signed revocation or refusal accepted.
pub const MAX_RECORD_LEN: usize = 2048;
/// Longest certificate lifetime the signer hands out and a verifier accepts (one year).
pub const MAX_CERT_LIFETIME_SECS: u64 = 366 * 86_400;

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The X25519 public key of a node's private key (as eviod's `<state-dir>/private.key` holds it, decoded).
pub fn public_key_of(private_key: &[u8; 32]) -> [u8; 32] {
    let s = x25519_dalek::StaticSecret::from(*private_key);
    x25519_dalek::PublicKey::from(&s).to_bytes()
}

/// `n` random bytes from the operating system.
pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    b
}

pub(crate) mod b64 {
    //! Base64 helpers: standard alphabet for keys inside JSON (like `wg` and the node records), URL-safe
    //! without padding for the outer encodings (tokens, signed strings).
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    use crate::TrustError;

    pub fn std(b: &[u8]) -> String {
        STANDARD.encode(b)
    }
    pub fn url(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }
    pub fn url_decode(s: &str, what: &str) -> Result<Vec<u8>, TrustError> {
        URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|e| TrustError::Malformed(format!("{what}: not base64url: {e}")))
    }
    /// Exactly `N` bytes of standard base64.
    pub fn fixed<const N: usize>(s: &str, what: &str) -> Result<[u8; N], TrustError> {
        let v = STANDARD
            .decode(s)
            .map_err(|e| TrustError::Malformed(format!("{what}: not base64: {e}")))?;
        v.try_into().map_err(|v: Vec<u8>| {
            TrustError::Malformed(format!("{what}: {} bytes, expected {N}", v.len()))
        })
    }
}
