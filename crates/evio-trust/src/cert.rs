//! CA-signed objects: node certificates, revocations and join refusals.
//!
//! Encoding of every signed object: `base64url(body) "." base64url(signature)`, no padding, where `body` is
//! the object's JSON and the Ed25519 signature covers `domain ‖ body` with a per-type domain string
//! (`evio-cert-v1\0`, `evio-revoke-v1\0`, `evio-refuse-v1\0`), so a signature of one type never verifies as
//! another. The verifier checks the signature over the bytes it received, then parses them: no
//! canonicalisation is needed.

use std::net::Ipv4Addr;

use ed25519_dalek::Signature;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{
    CLOCK_SKEW_SECS, CaKey, CaPublic, MAX_CERT_LEN, MAX_CERT_LIFETIME_SECS, MAX_RECORD_LEN,
    MAX_SUBNETS, TrustError, b64,
};

const CERT_DOMAIN: &[u8] = b"evio-cert-v1\0";
const REVOKE_DOMAIN: &[u8] = b"evio-revoke-v1\0";
const REFUSE_DOMAIN: &[u8] = b"evio-refuse-v1\0";

/// Node names become etcd key segments and certificate subjects (one rule for every binary: `evio-api`).
pub use evio_api::valid_node_name;

pub(crate) fn check_node_name(node: &str) -> Result<(), TrustError> {
    if valid_node_name(node) {
        Ok(())
    } else {
        Err(TrustError::InvalidField(format!(
            "node name {:?}: use 1-253 characters of letters, digits, '.', '-' and '_'",
            node.chars().take(64).collect::<String>()
        )))
    }
}

fn seal(ca: &CaKey, domain: &[u8], body: &[u8]) -> String {
    let mut msg = domain.to_vec();
    msg.extend_from_slice(body);
    format!("{}.{}", b64::url(body), b64::url(&ca.sign(&msg)))
}

/// Checks the length, the encoding and the signature of a sealed object; returns the body bytes.
fn open(
    ca: &CaPublic,
    domain: &[u8],
    what: &'static str,
    max: usize,
    sealed: &str,
) -> Result<Vec<u8>, TrustError> {
    let sealed = sealed.trim();
    if sealed.len() > max {
        return Err(TrustError::TooLong {
            what,
            len: sealed.len(),
            max,
        });
    }
    let (body, sig) = sealed.split_once('.').ok_or_else(|| {
        TrustError::Malformed(format!("{what}: no '.' between body and signature"))
    })?;
    let body = b64::url_decode(body, what)?;
    let sig: [u8; 64] = b64::url_decode(sig, what)?
        .try_into()
        .map_err(|_| TrustError::Malformed(format!("{what}: the signature is not 64 bytes")))?;
    let mut msg = domain.to_vec();
    msg.extend_from_slice(&body);
    ca.signing_key
        .verify_strict(&msg, &Signature::from_bytes(&sig))
        .map_err(|_| TrustError::BadSignature(what))?;
    Ok(body)
}

/// A node's certificate: the CA's statement that `public_key` is node `node`, owning `address` and
/// `pod_subnets`, from `not_before` to `not_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    pub node: String,
    /// The node's X25519 (WireGuard) public key.
    pub public_key: [u8; 32],
    /// Host overlay address (VIP).
    pub address: Ipv4Addr,
    /// Pod subnets (may be empty).
    pub pod_subnets: Vec<Ipv4Net>,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
    /// Random, unique per certificate; names it in revocations.
    pub serial: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CertBody {
    v: u32,
    node: String,
    public_key: String,
    address: Ipv4Addr,
    pod_subnets: Vec<Ipv4Net>,
    not_before: u64,
    not_after: u64,
    serial: u64,
}

impl NodeCert {
    /// A fresh serial from the OS random source.
    pub fn new_serial() -> u64 {
        u64::from_be_bytes(crate::random())
    }

    /// Field sanity, independent of time: a valid node name, a usable VIP, pod subnets that are networks of
    /// /8 to /32 (never a default route), at most [`MAX_SUBNETS`], and a window of at most
    /// [`MAX_CERT_LIFETIME_SECS`].
    pub fn check_fields(&self) -> Result<(), TrustError> {
        check_node_name(&self.node)?;
        let a = self.address;
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
            return Err(TrustError::InvalidField(format!(
                "address {a} is not a usable host address"
            )));
        }
        if self.pod_subnets.len() > MAX_SUBNETS {
            return Err(TrustError::InvalidField(format!(
                "{} pod subnets, at most {MAX_SUBNETS}",
                self.pod_subnets.len()
            )));
        }
        for n in &self.pod_subnets {
            if n.trunc() != *n || n.prefix_len() < 8 || n.network().is_unspecified() {
                return Err(TrustError::InvalidField(format!(
                    "pod subnet {n}: not a network of prefix /8 to /32"
                )));
            }
        }
        if self.not_after <= self.not_before
            || self.not_after - self.not_before > MAX_CERT_LIFETIME_SECS
        {
            return Err(TrustError::InvalidField(format!(
                "validity {}..{}: empty or longer than {MAX_CERT_LIFETIME_SECS} s",
                self.not_before, self.not_after
            )));
        }
        Ok(())
    }

    /// Signs the certificate (after [`check_fields`](Self::check_fields)).
    pub fn sign(&self, ca: &CaKey) -> Result<String, TrustError> {
        self.check_fields()?;
        let body = CertBody {
            v: 1,
            node: self.node.clone(),
            public_key: b64::std(&self.public_key),
            address: self.address,
            pod_subnets: self.pod_subnets.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
            serial: self.serial,
        };
        let s = seal(
            ca,
            CERT_DOMAIN,
            &serde_json::to_vec(&body).expect("serializable"),
        );
        if s.len() > MAX_CERT_LEN {
            return Err(TrustError::TooLong {
                what: "certificate",
                len: s.len(),
                max: MAX_CERT_LEN,
            });
        }
        Ok(s)
    }

    /// Verifies a signed certificate: length, signature by `ca`, fields, and that `now` lies in the window
    /// (with [`CLOCK_SKEW_SECS`] either side).
    pub fn verify(signed: &str, ca: &CaPublic, now: u64) -> Result<NodeCert, TrustError> {
        let c = NodeCert::verify_ignoring_time(signed, ca)?;
        if now.saturating_add(CLOCK_SKEW_SECS) < c.not_before {
            return Err(TrustError::NotYetValid {
                not_before: c.not_before,
                now,
            });
        }
        if now > c.not_after.saturating_add(CLOCK_SKEW_SECS) {
            return Err(TrustError::Expired {
                not_after: c.not_after,
                now,
            });
        }
        Ok(c)
    }

    /// Like [`verify`](Self::verify) without the validity window: for revoking an expired certificate and for
    /// deciding whether a name is still taken.
    pub fn verify_ignoring_time(signed: &str, ca: &CaPublic) -> Result<NodeCert, TrustError> {
        let body = open(ca, CERT_DOMAIN, "certificate", MAX_CERT_LEN, signed)?;
        let b: CertBody = serde_json::from_slice(&body)
            .map_err(|e| TrustError::Malformed(format!("certificate body: {e}")))?;
        if b.v != 1 {
            return Err(TrustError::Malformed(format!(
                "certificate version {}",
                b.v
            )));
        }
        let c = NodeCert {
            node: b.node,
            public_key: b64::fixed(&b.public_key, "certificate public key")?,
            address: b.address,
            pod_subnets: b.pod_subnets,
            not_before: b.not_before,
            not_after: b.not_after,
            serial: b.serial,
        };
        c.check_fields()?;
        Ok(c)
    }

    /// What a node checks before accepting a peer: `signed` verifies against `ca` at `now`, names `node` and
    /// `public_key` (as the peer's record announces them), and no revocation in `revoked` (verified ones,
    /// e.g. from [`client::revocations`](crate::client)) names the key. Returns what the peer owns.
    pub fn verify_peer(
        signed: &str,
        ca: &CaPublic,
        node: &str,
        public_key: &[u8; 32],
        revoked: &[Revocation],
        now: u64,
    ) -> Result<NodeCert, TrustError> {
        let c = NodeCert::verify(signed, ca, now)?;
        if c.node != node {
            return Err(TrustError::InvalidField(format!(
                "the certificate is for node {}, not {node}",
                c.node
            )));
        }
        if c.public_key != *public_key {
            return Err(TrustError::InvalidField(format!(
                "the certificate of node {node} is for another key"
            )));
        }
        if let Some(r) = revoked
            .iter()
            .find(|r| r.key().is_ok_and(|k| k == c.public_key))
        {
            return Err(TrustError::Revoked {
                node: r.node.clone(),
                serial: r.serial,
            });
        }
        Ok(c)
    }

    /// When the node should ask for a renewal: two thirds into the window, leaving a third of the lifetime
    /// (8 h of a 24 h certificate) for the signer to answer.
    pub fn renew_at(&self) -> u64 {
        self.not_before + (self.not_after - self.not_before) / 3 * 2
    }

    /// True when `now` is inside the window (with the skew allowance).
    pub fn is_current(&self, now: u64) -> bool {
        now.saturating_add(CLOCK_SKEW_SECS) >= self.not_before
            && now <= self.not_after.saturating_add(CLOCK_SKEW_SECS)
    }
}

/// The CA's statement that a node's key (and the certificate with `serial`) must no longer be accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Revocation {
    pub node: String,
    /// Base64 of the revoked X25519 public key.
    pub public_key: String,
    pub serial: u64,
    /// When it was revoked (Unix seconds).
    pub time: u64,
}

impl Revocation {
    pub fn of(cert: &NodeCert, time: u64) -> Revocation {
        Revocation {
            node: cert.node.clone(),
            public_key: b64::std(&cert.public_key),
            serial: cert.serial,
            time,
        }
    }

    /// The revoked key's bytes.
    pub fn key(&self) -> Result<[u8; 32], TrustError> {
        b64::fixed(&self.public_key, "revoked public key")
    }

    pub fn sign(&self, ca: &CaKey) -> Result<String, TrustError> {
        check_node_name(&self.node)?;
        self.key()?;
        Ok(seal(
            ca,
            REVOKE_DOMAIN,
            &serde_json::to_vec(self).expect("serializable"),
        ))
    }

    pub fn verify(signed: &str, ca: &CaPublic) -> Result<Revocation, TrustError> {
        let body = open(ca, REVOKE_DOMAIN, "revocation", MAX_RECORD_LEN, signed)?;
        let r: Revocation = serde_json::from_slice(&body)
            .map_err(|e| TrustError::Malformed(format!("revocation body: {e}")))?;
        check_node_name(&r.node)?;
        r.key()?;
        Ok(r)
    }
}

/// The signer's answer to a join or renewal request it will not grant, signed so that an etcd writer cannot
/// make a joining host give up with a forged refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Refusal {
    pub node: String,
    /// The refused request's nonce (base64), so a refusal of an older request is not taken for this one.
    pub nonce: String,
    pub reason: String,
    pub time: u64,
}

impl Refusal {
    pub fn sign(&self, ca: &CaKey) -> String {
        let mut r = self.clone();
        // Keep the record under its bound whatever the reason says.
        r.reason = r.reason.chars().take(512).collect();
        seal(
            ca,
            REFUSE_DOMAIN,
            &serde_json::to_vec(&r).expect("serializable"),
        )
    }

    pub fn verify(signed: &str, ca: &CaPublic) -> Result<Refusal, TrustError> {
        let body = open(ca, REFUSE_DOMAIN, "refusal", MAX_RECORD_LEN, signed)?;
        serde_json::from_slice(&body)
            .map_err(|e| TrustError::Malformed(format!("refusal body: {e}")))
    }
}

/// The etcd value at `/evio/v1/certs/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub cert: String,
}

/// The etcd value at `/evio/v1/revoked/<node>/<serial>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRecord {
    pub revocation: String,
}

/// The etcd value at `/evio/v1/refused/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalRecord {
    pub refusal: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn cert() -> NodeCert {
        NodeCert {
            node: "node-1".into(),
            public_key: [7; 32],
            address: "10.10.0.5".parse().unwrap(),
            pod_subnets: vec!["10.244.3.0/24".parse().unwrap()],
            not_before: NOW - 10,
            not_after: NOW + 86_400,
            serial: NodeCert::new_serial(),
        }
    }

    /// Re-encodes `signed` with the body changed by `f` and the original signature.
    fn tamper(signed: &str, f: impl Fn(&mut serde_json::Value)) -> String {
        let (body, sig) = signed.split_once('.').unwrap();
        let mut v: serde_json::Value =
            serde_json::from_slice(&b64::url_decode(body, "t").unwrap()).unwrap();
        f(&mut v);
        format!("{}.{sig}", b64::url(&serde_json::to_vec(&v).unwrap()))
    }

    #[test]
    fn round_trip() {
        let ca = CaKey::generate("lab");
        let c = cert();
        let s = c.sign(&ca).unwrap();
        assert!(s.is_ascii() && !s.contains(char::is_whitespace));
        assert_eq!(NodeCert::verify(&s, &ca.public(), NOW).unwrap(), c);
        let mut empty = cert();
        empty.pod_subnets.clear();
        let s = empty.sign(&ca).unwrap();
        assert_eq!(NodeCert::verify(&s, &ca.public(), NOW).unwrap(), empty);
    }

    #[test]
    fn tampered_body_is_refused() {
        let ca = CaKey::generate("lab");
        let s = cert().sign(&ca).unwrap();
        for f in [
            |v: &mut serde_json::Value| v["address"] = "10.10.0.6".into(),
            |v: &mut serde_json::Value| v["podSubnets"] = serde_json::json!(["10.0.0.0/8"]),
            |v: &mut serde_json::Value| v["node"] = "node-2".into(),
            |v: &mut serde_json::Value| v["notAfter"] = (NOW + 10 * 86_400).into(),
            |v: &mut serde_json::Value| v["publicKey"] = b64::std(&[8; 32]).into(),
        ] {
            let t = tamper(&s, f);
            assert!(
                matches!(
                    NodeCert::verify(&t, &ca.public(), NOW),
                    Err(TrustError::BadSignature("certificate"))
                ),
                "{t}"
            );
        }
        // A flipped signature byte.
        let (body, sig) = s.split_once('.').unwrap();
        let mut sig = b64::url_decode(sig, "t").unwrap();
        sig[10] ^= 1;
        let t = format!("{body}.{}", b64::url(&sig));
        assert!(NodeCert::verify(&t, &ca.public(), NOW).is_err());
        // Garbage.
        for g in ["", ".", "abc", "a.b", "!!.!!", &format!("{body}.")] {
            assert!(NodeCert::verify(g, &ca.public(), NOW).is_err(), "{g}");
        }
    }

    #[test]
    fn wrong_ca_is_refused() {
        let ca = CaKey::generate("lab");
        let other = CaKey::generate("lab");
        let s = cert().sign(&other).unwrap();
        assert!(matches!(
            NodeCert::verify(&s, &ca.public(), NOW),
            Err(TrustError::BadSignature(_))
        ));
    }

    #[test]
    fn validity_window_with_skew() {
        let ca = CaKey::generate("lab");
        let c = cert();
        let s = c.sign(&ca).unwrap();
        let p = ca.public();
        assert!(NodeCert::verify(&s, &p, c.not_before - CLOCK_SKEW_SECS).is_ok());
        assert!(matches!(
            NodeCert::verify(&s, &p, c.not_before - CLOCK_SKEW_SECS - 1),
            Err(TrustError::NotYetValid { .. })
        ));
        assert!(NodeCert::verify(&s, &p, c.not_after + CLOCK_SKEW_SECS).is_ok());
        assert!(matches!(
            NodeCert::verify(&s, &p, c.not_after + CLOCK_SKEW_SECS + 1),
            Err(TrustError::Expired { .. })
        ));
        assert!(NodeCert::verify_ignoring_time(&s, &p).is_ok());
        assert!(!c.is_current(c.not_after + CLOCK_SKEW_SECS + 1));
    }

    #[test]
    fn insane_fields_are_neither_signed_nor_accepted() {
        let ca = CaKey::generate("lab");
        type Edit = Box<dyn Fn(&mut NodeCert)>;
        let bad: Vec<Edit> = vec![
            Box::new(|c| c.node = "".into()),
            Box::new(|c| c.node = "..".into()),
            Box::new(|c| c.node = "a/b".into()),
            Box::new(|c| c.node = "x".repeat(254)),
            Box::new(|c| c.address = Ipv4Addr::UNSPECIFIED),
            Box::new(|c| c.address = Ipv4Addr::BROADCAST),
            Box::new(|c| c.pod_subnets = vec!["0.0.0.0/0".parse().unwrap()]),
            Box::new(|c| c.pod_subnets = vec!["10.244.3.1/24".parse().unwrap()]),
            Box::new(|c| c.pod_subnets = vec!["10.0.0.0/7".parse().unwrap()]),
            Box::new(|c| c.pod_subnets = vec!["10.244.0.0/24".parse().unwrap(); MAX_SUBNETS + 1]),
            Box::new(|c| c.not_after = c.not_before),
            Box::new(|c| c.not_after = c.not_before + MAX_CERT_LIFETIME_SECS + 1),
        ];
        for f in bad {
            let mut c = cert();
            f(&mut c);
            assert!(
                matches!(c.sign(&ca), Err(TrustError::InvalidField(_))),
                "{c:?}"
            );
            // Signed anyway (by a CA that skipped the checks): the verifier refuses it too.
            let body = CertBody {
                v: 1,
                node: c.node.clone(),
                public_key: b64::std(&c.public_key),
                address: c.address,
                pod_subnets: c.pod_subnets.clone(),
                not_before: c.not_before,
                not_after: c.not_after,
                serial: c.serial,
            };
            let s = seal(&ca, CERT_DOMAIN, &serde_json::to_vec(&body).unwrap());
            assert!(NodeCert::verify(&s, &ca.public(), NOW).is_err(), "{c:?}");
        }
    }

    #[test]
    fn the_largest_legal_certificate_fits() {
        let ca = CaKey::generate("lab");
        let mut c = cert();
        c.node = "n".repeat(253);
        c.address = "255.255.255.254".parse().unwrap();
        c.pod_subnets = vec!["255.255.255.255/32".parse().unwrap(); MAX_SUBNETS];
        c.serial = u64::MAX;
        let s = c.sign(&ca).unwrap();
        assert!(s.len() < MAX_CERT_LEN / 2, "{}", s.len());
        assert_eq!(NodeCert::verify(&s, &ca.public(), NOW).unwrap(), c);
        assert!(c.renew_at() > c.not_before && c.renew_at() < c.not_after);
    }

    #[test]
    fn oversized_and_unknown_fields_are_refused() {
        let ca = CaKey::generate("lab");
        let s = cert().sign(&ca).unwrap();
        let big = format!("{s}{}", "A".repeat(MAX_CERT_LEN));
        assert!(matches!(
            NodeCert::verify(&big, &ca.public(), NOW),
            Err(TrustError::TooLong { .. })
        ));
        // An extra field, correctly signed, is still refused (the body is strict).
        let (body, _) = s.split_once('.').unwrap();
        let mut v: serde_json::Value =
            serde_json::from_slice(&b64::url_decode(body, "t").unwrap()).unwrap();
        v["admin"] = true.into();
        let s2 = seal(&ca, CERT_DOMAIN, &serde_json::to_vec(&v).unwrap());
        assert!(matches!(
            NodeCert::verify(&s2, &ca.public(), NOW),
            Err(TrustError::Malformed(_))
        ));
    }

    #[test]
    fn peer_check_binds_name_key_and_revocations() {
        let ca = CaKey::generate("lab");
        let c = cert();
        let s = c.sign(&ca).unwrap();
        let p = ca.public();
        assert_eq!(
            NodeCert::verify_peer(&s, &p, "node-1", &[7; 32], &[], NOW).unwrap(),
            c
        );
        assert!(NodeCert::verify_peer(&s, &p, "node-2", &[7; 32], &[], NOW).is_err());
        assert!(NodeCert::verify_peer(&s, &p, "node-1", &[8; 32], &[], NOW).is_err());
        let mut other = c.clone();
        other.public_key = [9; 32];
        let unrelated = Revocation::of(&other, NOW);
        assert!(
            NodeCert::verify_peer(
                &s,
                &p,
                "node-1",
                &[7; 32],
                std::slice::from_ref(&unrelated),
                NOW
            )
            .is_ok()
        );
        // A revocation of the key (whatever the serial: renewals change it) ends the peer.
        let mut rev = Revocation::of(&c, NOW);
        rev.serial ^= 1;
        assert!(matches!(
            NodeCert::verify_peer(&s, &p, "node-1", &[7; 32], &[unrelated, rev], NOW),
            Err(TrustError::Revoked { .. })
        ));
        assert!(
            NodeCert::verify_peer(&s, &p, "node-1", &[7; 32], &[], c.not_after + 10_000).is_err()
        );
    }

    #[test]
    fn signatures_do_not_cross_types() {
        let ca = CaKey::generate("lab");
        let c = cert();
        let r = Revocation::of(&c, NOW).sign(&ca).unwrap();
        assert_eq!(
            Revocation::verify(&r, &ca.public()).unwrap(),
            Revocation::of(&c, NOW)
        );
        assert!(NodeCert::verify(&r, &ca.public(), NOW).is_err());
        let s = c.sign(&ca).unwrap();
        assert!(Revocation::verify(&s, &ca.public()).is_err());
        assert!(Refusal::verify(&s, &ca.public()).is_err());
    }

    #[test]
    fn revocation_needs_the_ca() {
        let ca = CaKey::generate("lab");
        let other = CaKey::generate("lab");
        let rev = Revocation::of(&cert(), NOW);
        let r = rev.sign(&other).unwrap();
        assert!(matches!(
            Revocation::verify(&r, &ca.public()),
            Err(TrustError::BadSignature("revocation"))
        ));
        let r = rev.sign(&ca).unwrap();
        let t = tamper(&r, |v| v["node"] = "node-2".into());
        assert!(Revocation::verify(&t, &ca.public()).is_err());
        let big = "A".repeat(MAX_RECORD_LEN + 1);
        assert!(matches!(
            Revocation::verify(&big, &ca.public()),
            Err(TrustError::TooLong { .. })
        ));
    }

    #[test]
    fn refusal_round_trip_and_forgery() {
        let ca = CaKey::generate("lab");
        let r = Refusal {
            node: "n".into(),
            nonce: "AAAA".into(),
            reason: "x".repeat(5000),
            time: NOW,
        };
        let s = r.sign(&ca);
        assert!(s.len() <= MAX_RECORD_LEN);
        assert_eq!(Refusal::verify(&s, &ca.public()).unwrap().reason.len(), 512);
        let other = CaKey::generate("lab");
        assert!(Refusal::verify(&r.sign(&other), &ca.public()).is_err());
    }
}
