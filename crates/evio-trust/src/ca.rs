//! The cluster CA: an Ed25519 signing key (certificates, revocations, refusals) and an X25519 exchange
//! key (renewal requests are authenticated with X25519(node key, CA exchange key)).
//!
//! In the CA directory: `ca.key` (mode 0600, both private keys) and `ca.json` (public: name, both public
//! keys, creation time, pin). The pin is `sha256:<hex>` of the 64 bytes `signing public key ‖ exchange
//! public key`; operators compare it out of band, and a join token carries it next to the keys.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::files::{read_bounded, read_private, write_new};
use crate::{TrustError, b64, random, unix_now};

/// File name of the CA's private keys in the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the CA's public description in the CA directory.
pub const CA_PUBLIC_FILE: &str = "ca.json";

/// The pin of a CA: `sha256:` and the hex SHA-256 of its signing and exchange public keys.
pub fn pin_of(signing: &[u8; 32], exchange: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(signing);
    h.update(exchange);
    let d = h.finalize();
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// What everyone may know of the CA: enough to verify its signatures and to authenticate renewals to it.
#[derive(Clone, PartialEq, Eq)]
pub struct CaPublic {
    pub name: String,
    pub signing_key: VerifyingKey,
    pub exchange_key: [u8; 32],
    /// Creation time (Unix seconds).
    pub created: u64,
}

impl std::fmt::Debug for CaPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPublic")
            .field("name", &self.name)
            .field("pin", &self.pin())
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CaPublicFile {
    v: u32,
    name: String,
    public_key: String,
    exchange_key: String,
    created: u64,
    pin: String,
}

impl CaPublic {
    pub fn pin(&self) -> String {
        pin_of(self.signing_key.as_bytes(), &self.exchange_key)
    }

    /// Builds the public description from its parts, refusing a signing key that is not a valid point.
    pub fn from_parts(
        name: String,
        signing: &[u8; 32],
        exchange: [u8; 32],
        created: u64,
    ) -> Result<CaPublic, TrustError> {
        let signing_key = VerifyingKey::from_bytes(signing)
            .map_err(|_| TrustError::Malformed("CA public key: not an Ed25519 point".into()))?;
        if signing_key.is_weak() {
            return Err(TrustError::Malformed(
                "CA public key: a weak (small-order) point".into(),
            ));
        }
        Ok(CaPublic {
            name,
            signing_key,
            exchange_key: exchange,
            created,
        })
    }

    /// `ca.json`'s content.
    pub fn to_json(&self) -> String {
        let f = CaPublicFile {
            v: 1,
            name: self.name.clone(),
            public_key: b64::std(self.signing_key.as_bytes()),
            exchange_key: b64::std(&self.exchange_key),
            created: self.created,
            pin: self.pin(),
        };
        serde_json::to_string_pretty(&f).expect("serializable") + "\n"
    }

    /// Parses `ca.json`, checking that its pin matches its keys.
    pub fn from_json(text: &[u8]) -> Result<CaPublic, TrustError> {
        let f: CaPublicFile = serde_json::from_slice(text)
            .map_err(|e| TrustError::Malformed(format!("CA public file: {e}")))?;
        if f.v != 1 {
            return Err(TrustError::Malformed(format!(
                "CA public file: version {}",
                f.v
            )));
        }
        let ca = CaPublic::from_parts(
            f.name,
            &b64::fixed(&f.public_key, "CA public key")?,
            b64::fixed(&f.exchange_key, "CA exchange key")?,
            f.created,
        )?;
        if ca.pin() != f.pin {
            return Err(TrustError::PinMismatch {
                claimed: f.pin,
                actual: ca.pin(),
            });
        }
        Ok(ca)
    }

    /// Loads `ca.json` from a file.
    pub fn load(path: &Path) -> Result<CaPublic, TrustError> {
        CaPublic::from_json(&read_bounded(path, 64 * 1024)?)
    }

    /// Writes `ca.json` content to `path` (0644, atomically): a joined node keeps the CA it trusts.
    pub fn save(&self, path: &Path) -> Result<(), TrustError> {
        crate::files::write_replace(path, self.to_json().as_bytes(), 0o644)
    }

    /// Checks a pin given by an operator (`sha256:<hex>`, case-insensitive hex) against this CA.
    pub fn check_pin(&self, expected: &str) -> Result<(), TrustError> {
        let actual = self.pin();
        if expected.trim().eq_ignore_ascii_case(&actual) {
            Ok(())
        } else {
            Err(TrustError::WrongCa {
                expected: expected.trim().to_string(),
                actual,
            })
        }
    }
}

/// The CA's private keys. Only `evioctl ca …` and `evioctl revoke` load it.
pub struct CaKey {
    name: String,
    created: u64,
    signing: SigningKey,
    exchange: StaticSecret,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CaKeyFile {
    v: u32,
    name: String,
    created: u64,
    signing_key: String,
    exchange_key: String,
}

impl CaKey {
    /// A fresh CA with keys from the operating system's random source.
    pub fn generate(name: &str) -> CaKey {
        let seed = Zeroizing::new(random::<32>());
        let x = Zeroizing::new(random::<32>());
        CaKey {
            name: name.to_string(),
            created: unix_now(),
            signing: SigningKey::from_bytes(&seed),
            exchange: StaticSecret::from(*x),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public(&self) -> CaPublic {
        CaPublic {
            name: self.name.clone(),
            signing_key: self.signing.verifying_key(),
            exchange_key: XPublic::from(&self.exchange).to_bytes(),
            created: self.created,
        }
    }

    /// Ed25519 signature over `msg`.
    pub(crate) fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    /// X25519(CA exchange key, `peer`); None when the result is all zeros (a small-order `peer`).
    pub(crate) fn exchange(&self, peer: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        let s = self.exchange.diffie_hellman(&XPublic::from(*peer));
        s.was_contributory().then(|| Zeroizing::new(*s.as_bytes()))
    }

    fn to_file(&self) -> Zeroizing<String> {
        let f = CaKeyFile {
            v: 1,
            name: self.name.clone(),
            created: self.created,
            signing_key: b64::std(self.signing.as_bytes()),
            exchange_key: b64::std(self.exchange.as_bytes()),
        };
        Zeroizing::new(serde_json::to_string_pretty(&f).expect("serializable") + "\n")
    }

    /// Creates a CA in `dir` (created 0700 if missing): `ca.key` (0600) and `ca.json` (0644). Refuses when
    /// either file already exists, touching nothing.
    pub fn init_dir(dir: &Path, name: &str) -> Result<CaKey, TrustError> {
        use std::os::unix::fs::DirBuilderExt;
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(TrustError::io(dir))?;
        }
        let (key_path, pub_path) = (dir.join(CA_KEY_FILE), dir.join(CA_PUBLIC_FILE));
        for p in [&key_path, &pub_path] {
            if p.exists() {
                return Err(TrustError::Exists(p.clone()));
            }
        }
        let ca = CaKey::generate(name);
        write_new(&key_path, ca.to_file().as_bytes(), 0o600)?;
        if let Err(e) = write_new(&pub_path, ca.public().to_json().as_bytes(), 0o644) {
            let _ = std::fs::remove_file(&key_path);
            return Err(e);
        }
        Ok(ca)
    }

    /// Loads the CA of `dir`, checking that `ca.key` is 0600 and that `ca.json` describes the same keys.
    pub fn load_dir(dir: &Path) -> Result<CaKey, TrustError> {
        let key_path = dir.join(CA_KEY_FILE);
        let text = Zeroizing::new(read_private(&key_path, 64 * 1024)?);
        let f: CaKeyFile = serde_json::from_slice(&text)
            .map_err(|e| TrustError::Malformed(format!("{}: {e}", key_path.display())))?;
        let seed = Zeroizing::new(b64::fixed::<32>(&f.signing_key, "CA signing key")?);
        let x = Zeroizing::new(b64::fixed::<32>(&f.exchange_key, "CA exchange key")?);
        let ca = CaKey {
            name: f.name,
            created: f.created,
            signing: SigningKey::from_bytes(&seed),
            exchange: StaticSecret::from(*x),
        };
        let pub_path = dir.join(CA_PUBLIC_FILE);
        let public = CaPublic::load(&pub_path)?;
        if public != ca.public() {
            return Err(TrustError::Malformed(format!(
                "{} does not describe the keys in {}",
                pub_path.display(),
                key_path.display()
            )));
        }
        Ok(ca)
    }

    /// The CA directory's token store (`<dir>/tokens`).
    pub fn tokens_dir(dir: &Path) -> PathBuf {
        dir.join("tokens")
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn init_writes_0600_key_and_refuses_to_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ca");
        let ca = CaKey::init_dir(&dir, "lab").unwrap();
        let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(CA_PUBLIC_FILE), 0o644);
        let key_before = std::fs::read(dir.join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            CaKey::init_dir(&dir, "other"),
            Err(TrustError::Exists(_))
        ));
        assert_eq!(std::fs::read(dir.join(CA_KEY_FILE)).unwrap(), key_before);
        let loaded = CaKey::load_dir(&dir).unwrap();
        assert_eq!(loaded.public(), ca.public());
        assert_eq!(loaded.public().pin(), ca.public().pin());
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn load_refuses_a_readable_key_and_a_mismatched_public_file() {
        let d = tempfile::tempdir().unwrap();
        CaKey::init_dir(d.path(), "lab").unwrap();
        let key = d.path().join(CA_KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            CaKey::load_dir(d.path()),
            Err(TrustError::Permissions { .. })
        ));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let other = tempfile::tempdir().unwrap();
        CaKey::init_dir(other.path(), "other").unwrap();
        std::fs::copy(
            other.path().join(CA_PUBLIC_FILE),
            d.path().join(CA_PUBLIC_FILE),
        )
        .unwrap();
        assert!(CaKey::load_dir(d.path()).is_err());
    }

    #[test]
    fn public_file_round_trips_and_detects_a_wrong_pin() {
        let ca = CaKey::generate("lab").public();
        let text = ca.to_json();
        assert_eq!(CaPublic::from_json(text.as_bytes()).unwrap(), ca);
        let d = tempfile::tempdir().unwrap();
        ca.save(&d.path().join("ca.json")).unwrap();
        assert_eq!(CaPublic::load(&d.path().join("ca.json")).unwrap(), ca);
        ca.check_pin(&ca.pin().to_uppercase().replace("SHA256", "sha256"))
            .unwrap();
        let other = CaKey::generate("lab").public();
        assert!(matches!(
            ca.check_pin(&other.pin()),
            Err(TrustError::WrongCa { .. })
        ));
        let forged = text.replace(&ca.pin(), &other.pin());
        assert!(matches!(
            CaPublic::from_json(forged.as_bytes()),
            Err(TrustError::PinMismatch { .. })
        ));
        assert!(ca.pin().starts_with("sha256:") && ca.pin().len() == 7 + 64);
    }
}
