//! Join tokens and the CA side's record of them.
//!
//! A token is `evio1.` followed by base64url (no padding) of a JSON object with everything a new host needs
//! (see [`JoinToken`]). It is a secret: it carries the token secret and, when given, the etcd and TURN
//! passwords. The CA directory keeps, per token, `tokens/<id>.json` (mode 0600): the id, the MAC key derived
//! from the secret ([`mac_key`]), expiry, single-use flag and use count, never the secret itself.

use std::path::Path;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::files::{read_private, write_new, write_replace};
use crate::{CaKey, CaPublic, MAX_TOKEN_LEN, TrustError, b64, pin_of, random};

/// The token string's prefix (format version 1).
pub const TOKEN_PREFIX: &str = "evio1.";

/// The key that authenticates join requests made with a token: HMAC-SHA256(secret, label). The CA keeps only
/// this; the joining host derives it from the secret in its token.
pub fn mac_key(secret: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key length");
    m.update(b"evio join mac key v1");
    Zeroizing::new(m.finalize().into_bytes().into())
}

/// Token ids: 16 lowercase hex characters (they name files in the CA directory).
pub fn valid_token_id(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Everything a new host needs to join.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub etcd_endpoints: Vec<String>,
    pub etcd_user: Option<String>,
    pub etcd_password: Option<String>,
    /// The cluster CA (its pin was checked against its keys when decoding).
    pub ca: CaPublic,
    pub stun: Vec<String>,
    pub turn: Option<String>,
    pub turn_user: Option<String>,
    pub turn_password: Option<String>,
    pub id: String,
    pub secret: [u8; 32],
    /// Unix seconds.
    pub expires: u64,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("etcd_endpoints", &self.etcd_endpoints)
            .field("ca", &self.ca)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenBody {
    etcd: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etcd_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etcd_password: Option<String>,
    ca_name: String,
    ca_key: String,
    ca_exchange_key: String,
    ca_pin: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    stun: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    turn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    turn_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    turn_password: Option<String>,
    id: String,
    secret: String,
    expires: u64,
}

impl JoinToken {
    /// A new token for `ca` with a fresh id and secret; the caller fills in the rest.
    pub fn new(ca: &CaPublic, etcd_endpoints: Vec<String>, expires: u64) -> JoinToken {
        let id: String = random::<8>().iter().map(|b| format!("{b:02x}")).collect();
        JoinToken {
            etcd_endpoints,
            etcd_user: None,
            etcd_password: None,
            ca: ca.clone(),
            stun: Vec::new(),
            turn: None,
            turn_user: None,
            turn_password: None,
            id,
            secret: random(),
            expires,
        }
    }

    /// The printable token.
    pub fn encode(&self) -> String {
        let body = TokenBody {
            etcd: self.etcd_endpoints.clone(),
            etcd_user: self.etcd_user.clone(),
            etcd_password: self.etcd_password.clone(),
            ca_name: self.ca.name.clone(),
            ca_key: b64::std(self.ca.signing_key.as_bytes()),
            ca_exchange_key: b64::std(&self.ca.exchange_key),
            ca_pin: self.ca.pin(),
            stun: self.stun.clone(),
            turn: self.turn.clone(),
            turn_user: self.turn_user.clone(),
            turn_password: self.turn_password.clone(),
            id: self.id.clone(),
            secret: b64::std(&self.secret),
            expires: self.expires,
        };
        let json = Zeroizing::new(serde_json::to_vec(&body).expect("serializable"));
        format!("{TOKEN_PREFIX}{}", b64::url(&json))
    }

    /// Parses a token, checking its length, its fields and that the pin matches the CA keys it carries.
    /// Does not check the expiry (see [`check_fresh`](Self::check_fresh)).
    pub fn decode(text: &str) -> Result<JoinToken, TrustError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_LEN {
            return Err(TrustError::TooLong {
                what: "join token",
                len: text.len(),
                max: MAX_TOKEN_LEN,
            });
        }
        let rest = text.strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            TrustError::Malformed(format!("join token: does not start with {TOKEN_PREFIX}"))
        })?;
        let json = Zeroizing::new(b64::url_decode(rest, "join token")?);
        let b: TokenBody = serde_json::from_slice(&json)
            .map_err(|e| TrustError::Malformed(format!("join token: {e}")))?;
        let signing = b64::fixed::<32>(&b.ca_key, "token CA key")?;
        let exchange = b64::fixed::<32>(&b.ca_exchange_key, "token CA exchange key")?;
        let actual = pin_of(&signing, &exchange);
        if !b.ca_pin.eq_ignore_ascii_case(&actual) {
            return Err(TrustError::PinMismatch {
                claimed: b.ca_pin,
                actual,
            });
        }
        if b.etcd.is_empty() {
            return Err(TrustError::InvalidField(
                "join token: no etcd endpoints".into(),
            ));
        }
        if !valid_token_id(&b.id) {
            return Err(TrustError::InvalidField(format!(
                "join token: id {:?}",
                b.id
            )));
        }
        Ok(JoinToken {
            etcd_endpoints: b.etcd,
            etcd_user: b.etcd_user,
            etcd_password: b.etcd_password,
            ca: CaPublic::from_parts(b.ca_name, &signing, exchange, 0)?,
            stun: b.stun,
            turn: b.turn,
            turn_user: b.turn_user,
            turn_password: b.turn_password,
            id: b.id,
            secret: b64::fixed(&b.secret, "token secret")?,
            expires: b.expires,
        })
    }

    /// Refuses an expired token (no clock skew allowance: the signer checks again).
    pub fn check_fresh(&self, now: u64) -> Result<(), TrustError> {
        if now >= self.expires {
            return Err(TrustError::TokenExpired {
                id: self.id.clone(),
                expires: self.expires,
                now,
            });
        }
        Ok(())
    }
}

impl Drop for JoinToken {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.secret.zeroize();
        if let Some(p) = &mut self.etcd_password {
            p.zeroize();
        }
        if let Some(p) = &mut self.turn_password {
            p.zeroize();
        }
    }
}

/// The CA directory's record of a token (`tokens/<id>.json`, 0600).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub id: String,
    /// Base64 of [`mac_key`] of the secret.
    mac_key: String,
    pub created: u64,
    pub expires: u64,
    pub single_use: bool,
    /// Certificates issued with this token.
    pub uses: u32,
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("id", &self.id)
            .field("expires", &self.expires)
            .field("single_use", &self.single_use)
            .field("uses", &self.uses)
            .finish_non_exhaustive()
    }
}

impl TokenRecord {
    pub fn of(token: &JoinToken, single_use: bool, created: u64) -> TokenRecord {
        TokenRecord {
            id: token.id.clone(),
            mac_key: b64::std(mac_key(&token.secret).as_slice()),
            created,
            expires: token.expires,
            single_use,
            uses: 0,
        }
    }

    /// The key join requests made with this token are authenticated with.
    pub fn mac_key(&self) -> Result<Zeroizing<[u8; 32]>, TrustError> {
        Ok(Zeroizing::new(b64::fixed(&self.mac_key, "token MAC key")?))
    }

    /// Refuses an expired or used-up token.
    pub fn check_usable(&self, now: u64) -> Result<(), TrustError> {
        if now >= self.expires {
            return Err(TrustError::TokenExpired {
                id: self.id.clone(),
                expires: self.expires,
                now,
            });
        }
        if self.single_use && self.uses > 0 {
            return Err(TrustError::TokenUsed(self.id.clone()));
        }
        Ok(())
    }

    fn path(ca_dir: &Path, id: &str) -> Result<std::path::PathBuf, TrustError> {
        if !valid_token_id(id) {
            return Err(TrustError::InvalidField(format!(
                "token id {:?}: 16 hex characters expected",
                id.chars().take(64).collect::<String>()
            )));
        }
        Ok(CaKey::tokens_dir(ca_dir).join(format!("{id}.json")))
    }

    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("serializable")
    }

    /// Writes a new record (the tokens directory is created 0700); refuses an existing id.
    pub fn create(&self, ca_dir: &Path) -> Result<(), TrustError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = CaKey::tokens_dir(ca_dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(TrustError::io(&dir))?;
        write_new(&TokenRecord::path(ca_dir, &self.id)?, &self.bytes(), 0o600)
    }

    /// Rewrites the record (after a use), atomically.
    pub fn save(&self, ca_dir: &Path) -> Result<(), TrustError> {
        write_replace(&TokenRecord::path(ca_dir, &self.id)?, &self.bytes(), 0o600)
    }

    /// The record of token `id`; [`TrustError::UnknownToken`] when there is none.
    pub fn load(ca_dir: &Path, id: &str) -> Result<TokenRecord, TrustError> {
        let path = TokenRecord::path(ca_dir, id)?;
        if !path.exists() {
            return Err(TrustError::UnknownToken(id.to_string()));
        }
        let text = read_private(&path, 64 * 1024)?;
        let r: TokenRecord = serde_json::from_slice(&text)
            .map_err(|e| TrustError::Malformed(format!("{}: {e}", path.display())))?;
        if r.id != id {
            return Err(TrustError::Malformed(format!(
                "{}: holds token {}",
                path.display(),
                r.id
            )));
        }
        Ok(r)
    }

    /// All records, by id; records that do not parse are skipped.
    pub fn list(ca_dir: &Path) -> Result<Vec<TokenRecord>, TrustError> {
        let dir = CaKey::tokens_dir(ca_dir);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(TrustError::io(&dir)(e)),
        };
        let mut v = Vec::new();
        for e in rd {
            let e = e.map_err(TrustError::io(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json")
                && let Ok(r) = TokenRecord::load(ca_dir, id)
            {
                v.push(r);
            }
        }
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    /// Deletes token `id`'s record; [`TrustError::UnknownToken`] when there is none.
    pub fn delete(ca_dir: &Path, id: &str) -> Result<(), TrustError> {
        let path = TokenRecord::path(ca_dir, id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(TrustError::UnknownToken(id.to_string()))
            }
            Err(e) => Err(TrustError::io(&path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn token(ca: &CaPublic) -> JoinToken {
        let mut t = JoinToken::new(ca, vec!["http://10.0.0.1:2379".into()], 2_000_000_000);
        t.etcd_user = Some("evio".into());
        t.etcd_password = Some("pw".into());
        t.stun = vec!["stun.example:3478".into()];
        t.turn = Some("turn.example:3478".into());
        t.turn_user = Some("u".into());
        t.turn_password = Some("tp".into());
        t
    }

    #[test]
    fn round_trip_and_printable() {
        let ca = CaKey::generate("lab").public();
        let t = token(&ca);
        let s = t.encode();
        assert!(s.starts_with("evio1."));
        assert!(s.bytes().all(|b| b.is_ascii_graphic()));
        let d = JoinToken::decode(&format!("  {s}\n")).unwrap();
        assert_eq!(d.secret, t.secret);
        assert_eq!(d.ca.pin(), ca.pin());
        assert_eq!(d.etcd_password.as_deref(), Some("pw"));
        assert_eq!(d.turn_password.as_deref(), Some("tp"));
        assert_eq!(d.stun, t.stun);
        assert!(!format!("{d:?}").contains("pw"));
    }

    fn rewrite(s: &str, f: impl Fn(&mut serde_json::Value)) -> String {
        let json = b64::url_decode(s.strip_prefix(TOKEN_PREFIX).unwrap(), "t").unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        f(&mut v);
        format!(
            "{TOKEN_PREFIX}{}",
            b64::url(&serde_json::to_vec(&v).unwrap())
        )
    }

    #[test]
    fn wrong_pin_is_refused() {
        let ca = CaKey::generate("lab").public();
        let other = CaKey::generate("lab").public();
        let s = token(&ca).encode();
        // Another CA's pin with this CA's key, and this CA's pin with another key.
        let p = other.pin();
        let t = rewrite(&s, |v| v["caPin"] = p.clone().into());
        assert!(matches!(
            JoinToken::decode(&t),
            Err(TrustError::PinMismatch { .. })
        ));
        let k = b64::std(other.signing_key.as_bytes());
        let t = rewrite(&s, |v| v["caKey"] = k.clone().into());
        assert!(matches!(
            JoinToken::decode(&t),
            Err(TrustError::PinMismatch { .. })
        ));
        let k = b64::std(&other.exchange_key);
        let t = rewrite(&s, |v| v["caExchangeKey"] = k.clone().into());
        assert!(matches!(
            JoinToken::decode(&t),
            Err(TrustError::PinMismatch { .. })
        ));
    }

    #[test]
    fn malformed_and_oversized_tokens_are_refused() {
        let ca = CaKey::generate("lab").public();
        let s = token(&ca).encode();
        let long = format!("{s}{}", "A".repeat(MAX_TOKEN_LEN));
        assert!(matches!(
            JoinToken::decode(&long),
            Err(TrustError::TooLong { .. })
        ));
        assert!(JoinToken::decode(&s.replacen("evio1.", "evio2.", 1)).is_err());
        assert!(JoinToken::decode("evio1.!!!").is_err());
        assert!(JoinToken::decode(&rewrite(&s, |v| v["id"] = "../../x".into())).is_err());
        assert!(JoinToken::decode(&rewrite(&s, |v| v["etcd"] = serde_json::json!([]))).is_err());
        assert!(JoinToken::decode(&rewrite(&s, |v| v["secret"] = "AAAA".into())).is_err());
        assert!(JoinToken::decode(&rewrite(&s, |v| v["extra"] = 1.into())).is_err());
    }

    #[test]
    fn expiry() {
        let ca = CaKey::generate("lab").public();
        let t = JoinToken::new(&ca, vec!["e".into()], 1000);
        assert!(t.check_fresh(999).is_ok());
        assert!(matches!(
            t.check_fresh(1000),
            Err(TrustError::TokenExpired { .. })
        ));
    }

    #[test]
    fn records_keep_no_secret_and_count_uses() {
        let d = tempfile::tempdir().unwrap();
        let ca = CaKey::init_dir(d.path(), "lab").unwrap().public();
        let t = token(&ca);
        let r = TokenRecord::of(&t, true, 100);
        r.create(d.path()).unwrap();
        assert!(matches!(r.create(d.path()), Err(TrustError::Exists(_))));
        let path = d.path().join("tokens").join(format!("{}.json", t.id));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&b64::std(&t.secret)));
        assert!(!text.contains(&b64::url(&t.secret)));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(d.path().join("tokens"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let mut l = TokenRecord::load(d.path(), &t.id).unwrap();
        assert_eq!(*l.mac_key().unwrap(), *mac_key(&t.secret));
        l.check_usable(200).unwrap();
        l.uses += 1;
        l.save(d.path()).unwrap();
        let l = TokenRecord::load(d.path(), &t.id).unwrap();
        assert!(matches!(l.check_usable(200), Err(TrustError::TokenUsed(_))));
        assert!(matches!(
            l.check_usable(t.expires),
            Err(TrustError::TokenExpired { .. })
        ));
        assert_eq!(TokenRecord::list(d.path()).unwrap().len(), 1);
        TokenRecord::delete(d.path(), &t.id).unwrap();
        assert!(matches!(
            TokenRecord::load(d.path(), &t.id),
            Err(TrustError::UnknownToken(_))
        ));
        assert!(matches!(
            TokenRecord::delete(d.path(), &t.id),
            Err(TrustError::UnknownToken(_))
        ));
        assert!(TokenRecord::load(d.path(), "../ca").is_err());
        let mut reusable = TokenRecord::of(&t, false, 100);
        reusable.uses = 5;
        reusable.check_usable(200).unwrap();
    }
}
