//! Join and renewal requests, written by nodes to etcd (so read by the signer as attacker input).
//!
//! Both are JSON objects `{node, publicKey, …, nonce, time, mac}` where `mac` is HMAC-SHA256 over
//! `domain ‖ JSON of the other fields` (in the order of the struct, re-serialized by the verifier from the
//! parsed values, so both sides compute the same bytes):
//!
//! - join (`evio-join-v1\0`): keyed by [`mac_key`](crate::mac_key)(token secret); names the token by id.
//! - renewal (`evio-renew-v1\0`): keyed by HMAC-SHA256(X25519(node private key, CA exchange key),
//!   `evio renew key v1` ‖ node public key ‖ CA exchange public key). Only the holder of the node's private
//!   key and the CA can compute it, so no renewal secret has to be handed out or stored, and a stolen
//!   certificate alone renews nothing.
//!
//! Both carry the node's public key and name under the MAC: an etcd reader who sees a request cannot turn
//! it into a certificate for another key or name. `time` must be within
//! [`CLOCK_SKEW_SECS`](crate::CLOCK_SKEW_SECS) of the signer's clock; a replay inside that window only
//! yields the certificate the genuine request asked for (bound to a key the replayer does not hold), and a
//! single-use token is spent by the first.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::cert::check_node_name;
use crate::token::valid_token_id;
use crate::{
    CLOCK_SKEW_SECS, CaKey, CaPublic, JoinToken, MAX_REQUEST_LEN, TrustError, b64, mac_key, random,
};

const JOIN_DOMAIN: &[u8] = b"evio-join-v1\0";
const RENEW_DOMAIN: &[u8] = b"evio-renew-v1\0";

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8; 32], domain: &[u8], body: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("any key length");
    m.update(domain);
    m.update(body);
    m
}

fn check_time(time: u64, now: u64) -> Result<(), TrustError> {
    if time.abs_diff(now) > CLOCK_SKEW_SECS {
        return Err(TrustError::Stale {
            time,
            now,
            skew: CLOCK_SKEW_SECS,
        });
    }
    Ok(())
}

fn parse_bounded<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, TrustError> {
    if bytes.len() > MAX_REQUEST_LEN {
        return Err(TrustError::TooLong {
            what,
            len: bytes.len(),
            max: MAX_REQUEST_LEN,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| TrustError::Malformed(format!("{what}: {e}")))
}

/// A join request (`/evio/v1/join/<node>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinRequest {
    pub node: String,
    /// Base64 of the node's X25519 public key.
    pub public_key: String,
    pub token_id: String,
    /// Base64 of 16 random bytes.
    pub nonce: String,
    /// Unix seconds.
    pub time: u64,
    /// Base64 of the HMAC-SHA256.
    pub mac: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JoinBody<'a> {
    node: &'a str,
    public_key: &'a str,
    token_id: &'a str,
    nonce: &'a str,
    time: u64,
}

impl JoinRequest {
    fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&JoinBody {
            node: &self.node,
            public_key: &self.public_key,
            token_id: &self.token_id,
            nonce: &self.nonce,
            time: self.time,
        })
        .expect("serializable")
    }

    /// The request of node `node` with key `public_key`, made with `token`.
    pub fn new(
        token: &JoinToken,
        node: &str,
        public_key: &[u8; 32],
        now: u64,
    ) -> Result<JoinRequest, TrustError> {
        check_node_name(node)?;
        let mut r = JoinRequest {
            node: node.to_string(),
            public_key: b64::std(public_key),
            token_id: token.id.clone(),
            nonce: b64::std(&random::<16>()),
            time: now,
            mac: String::new(),
        };
        let key = mac_key(&token.secret);
        r.mac = b64::std(&hmac(&key, JOIN_DOMAIN, &r.body()).finalize().into_bytes());
        Ok(r)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("serializable")
    }

    /// Parses a request read from etcd, checking its size and the shape of every field (not the MAC: the
    /// signer looks up the token named by `token_id` first, then calls [`verify`](Self::verify)).
    pub fn parse(bytes: &[u8]) -> Result<JoinRequest, TrustError> {
        let r: JoinRequest = parse_bounded(bytes, "join request")?;
        check_node_name(&r.node)?;
        r.key()?;
        if !valid_token_id(&r.token_id) {
            return Err(TrustError::InvalidField(
                "join request: token id is not 16 hex characters".into(),
            ));
        }
        b64::fixed::<16>(&r.nonce, "join request nonce")?;
        b64::fixed::<32>(&r.mac, "join request MAC")?;
        Ok(r)
    }

    /// The node's public key.
    pub fn key(&self) -> Result<[u8; 32], TrustError> {
        b64::fixed(&self.public_key, "join request public key")
    }

    /// Checks the time against `now` and the MAC (in constant time) against the token's MAC key.
    pub fn verify(&self, mac_key: &[u8; 32], now: u64) -> Result<(), TrustError> {
        check_time(self.time, now)?;
        let mac = b64::fixed::<32>(&self.mac, "join request MAC")?;
        hmac(mac_key, JOIN_DOMAIN, &self.body())
            .verify_slice(&mac)
            .map_err(|_| TrustError::BadMac("join request"))
    }
}

/// A renewal request (`/evio/v1/renew/<node>`): a node with a certificate asks for a fresh one for the same
/// key, name, VIP and subnets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenewRequest {
    pub node: String,
    pub public_key: String,
    /// Serial of the certificate being renewed.
    pub serial: u64,
    pub nonce: String,
    pub time: u64,
    pub mac: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RenewBody<'a> {
    node: &'a str,
    public_key: &'a str,
    serial: u64,
    nonce: &'a str,
    time: u64,
}

fn renew_key(
    shared: &[u8; 32],
    node_public: &[u8; 32],
    ca_exchange: &[u8; 32],
) -> Zeroizing<[u8; 32]> {
    let mut m = HmacSha256::new_from_slice(shared).expect("any key length");
    m.update(b"evio renew key v1");
    m.update(node_public);
    m.update(ca_exchange);
    Zeroizing::new(m.finalize().into_bytes().into())
}

impl RenewRequest {
    fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&RenewBody {
            node: &self.node,
            public_key: &self.public_key,
            serial: self.serial,
            nonce: &self.nonce,
            time: self.time,
        })
        .expect("serializable")
    }

    /// The renewal request of node `node` holding `private_key`, for its certificate `serial`.
    pub fn new(
        ca: &CaPublic,
        node: &str,
        private_key: &[u8; 32],
        serial: u64,
        now: u64,
    ) -> Result<RenewRequest, TrustError> {
        check_node_name(node)?;
        let secret = StaticSecret::from(*private_key);
        let public = XPublic::from(&secret).to_bytes();
        let shared = secret.diffie_hellman(&XPublic::from(ca.exchange_key));
        if !shared.was_contributory() {
            return Err(TrustError::InvalidField(
                "the CA exchange key is a small-order point".into(),
            ));
        }
        let key = renew_key(shared.as_bytes(), &public, &ca.exchange_key);
        let mut r = RenewRequest {
            node: node.to_string(),
            public_key: b64::std(&public),
            serial,
            nonce: b64::std(&random::<16>()),
            time: now,
            mac: String::new(),
        };
        r.mac = b64::std(&hmac(&key, RENEW_DOMAIN, &r.body()).finalize().into_bytes());
        Ok(r)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("serializable")
    }

    /// Parses a request read from etcd (size and field shapes).
    pub fn parse(bytes: &[u8]) -> Result<RenewRequest, TrustError> {
        let r: RenewRequest = parse_bounded(bytes, "renewal request")?;
        check_node_name(&r.node)?;
        r.key()?;
        b64::fixed::<16>(&r.nonce, "renewal request nonce")?;
        b64::fixed::<32>(&r.mac, "renewal request MAC")?;
        Ok(r)
    }

    pub fn key(&self) -> Result<[u8; 32], TrustError> {
        b64::fixed(&self.public_key, "renewal request public key")
    }

    /// Checks the time and the MAC, which proves the requester holds the private key of `public_key`.
    pub fn verify(&self, ca: &CaKey, now: u64) -> Result<(), TrustError> {
        check_time(self.time, now)?;
        let public = self.key()?;
        let shared = ca
            .exchange(&public)
            .ok_or(TrustError::BadMac("renewal request"))?;
        let key = renew_key(&shared, &public, &ca.public().exchange_key);
        let mac = b64::fixed::<32>(&self.mac, "renewal request MAC")?;
        hmac(&key, RENEW_DOMAIN, &self.body())
            .verify_slice(&mac)
            .map_err(|_| TrustError::BadMac("renewal request"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TokenRecord;

    const NOW: u64 = 1_800_000_000;

    fn setup() -> (CaKey, JoinToken) {
        let ca = CaKey::generate("lab");
        let t = JoinToken::new(&ca.public(), vec!["e".into()], NOW + 3600);
        (ca, t)
    }

    #[test]
    fn join_request_verifies_with_the_stored_key_only() {
        let (_, t) = setup();
        let r = JoinRequest::new(&t, "node-1", &[9; 32], NOW).unwrap();
        let parsed = JoinRequest::parse(r.to_json().as_bytes()).unwrap();
        assert_eq!(parsed, r);
        let rec = TokenRecord::of(&t, true, NOW);
        parsed.verify(&rec.mac_key().unwrap(), NOW + 10).unwrap();
        // Another token's key.
        let (_, t2) = setup();
        assert!(matches!(
            parsed.verify(&mac_key(&t2.secret), NOW),
            Err(TrustError::BadMac(_))
        ));
    }

    #[test]
    fn tampered_join_request_is_refused() {
        let (_, t) = setup();
        let key = mac_key(&t.secret);
        let r = JoinRequest::new(&t, "node-1", &[9; 32], NOW).unwrap();
        let mut other_key = r.clone();
        other_key.public_key = b64::std(&[10; 32]);
        let mut other_name = r.clone();
        other_name.node = "node-2".into();
        let mut other_time = r.clone();
        other_time.time += 1;
        let mut other_nonce = r.clone();
        other_nonce.nonce = b64::std(&[0; 16]);
        for x in [other_key, other_name, other_time, other_nonce] {
            assert!(
                matches!(x.verify(&key, NOW), Err(TrustError::BadMac(_))),
                "{x:?}"
            );
        }
    }

    #[test]
    fn stale_join_request_is_refused() {
        let (_, t) = setup();
        let key = mac_key(&t.secret);
        let r = JoinRequest::new(&t, "n", &[9; 32], NOW).unwrap();
        assert!(r.verify(&key, NOW + CLOCK_SKEW_SECS).is_ok());
        assert!(matches!(
            r.verify(&key, NOW + CLOCK_SKEW_SECS + 1),
            Err(TrustError::Stale { .. })
        ));
        assert!(matches!(
            r.verify(&key, NOW - CLOCK_SKEW_SECS - 1),
            Err(TrustError::Stale { .. })
        ));
    }

    #[test]
    fn malformed_join_requests_are_refused() {
        let (_, t) = setup();
        let r = JoinRequest::new(&t, "n", &[9; 32], NOW).unwrap();
        let j = r.to_json();
        let big = format!(
            "{},\"x\":\"{}\"}}",
            &j[..j.len() - 1],
            "a".repeat(MAX_REQUEST_LEN)
        );
        assert!(matches!(
            JoinRequest::parse(big.as_bytes()),
            Err(TrustError::TooLong { .. })
        ));
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_str(&j).unwrap();
            f(&mut v);
            JoinRequest::parse(v.to_string().as_bytes())
        };
        assert!(edit(&|v| v["node"] = "../x".into()).is_err());
        assert!(edit(&|v| v["publicKey"] = "AAAA".into()).is_err());
        assert!(edit(&|v| v["tokenId"] = "../../ca".into()).is_err());
        assert!(edit(&|v| v["mac"] = "AAAA".into()).is_err());
        assert!(edit(&|v| v["extra"] = 1.into()).is_err());
        assert!(JoinRequest::parse(b"not json").is_err());
        assert!(JoinRequest::new(&t, "a/b", &[9; 32], NOW).is_err());
    }

    #[test]
    fn renewal_proves_the_node_key() {
        let ca = CaKey::generate("lab");
        let node_priv = [21u8; 32];
        let r = RenewRequest::new(&ca.public(), "node-1", &node_priv, 42, NOW).unwrap();
        let p = RenewRequest::parse(r.to_json().as_bytes()).unwrap();
        p.verify(&ca, NOW).unwrap();
        let expected_pub = XPublic::from(&StaticSecret::from(node_priv)).to_bytes();
        assert_eq!(p.key().unwrap(), expected_pub);
        // Someone else's key claiming this node's public key.
        let mut forged = RenewRequest::new(&ca.public(), "node-1", &[22u8; 32], 42, NOW).unwrap();
        forged.public_key = p.public_key.clone();
        assert!(matches!(
            forged.verify(&ca, NOW),
            Err(TrustError::BadMac(_))
        ));
        // Any field changed.
        let mut s = p.clone();
        s.serial = 43;
        assert!(s.verify(&ca, NOW).is_err());
        let mut s = p.clone();
        s.node = "node-2".into();
        assert!(s.verify(&ca, NOW).is_err());
        // Another CA cannot check it, and an old request is stale.
        assert!(p.verify(&CaKey::generate("lab"), NOW).is_err());
        assert!(matches!(
            p.verify(&ca, NOW + CLOCK_SKEW_SECS + 1),
            Err(TrustError::Stale { .. })
        ));
        // A small-order public key is refused (the shared secret would be all zeros, known to anyone).
        let mut zero = p.clone();
        zero.public_key = b64::std(&[0; 32]);
        assert!(zero.verify(&ca, NOW).is_err());
    }
}
