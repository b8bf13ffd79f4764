//! The node's X25519 identity and the optional cluster pre-shared key, kept in files of mode 0600.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use evio_tunnel::{PublicKey, StaticSecret};

/// File name of the private key inside the state directory.
pub const KEY_FILE: &str = "private.key";

/// Loads `<state_dir>/private.key` (base64 of 32 bytes, like `wg genkey`), creating it on first start.
pub fn load_or_create(state_dir: &Path) -> Result<StaticSecret> {
    let path = state_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "private key readable by others: fixing to 0600");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
            let bytes = decode32(s.trim())
                .with_context(|| format!("invalid private key in {}", path.display()))?;
            Ok(StaticSecret::from(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes: [u8; 32] = rand::random();
            let secret = StaticSecret::from(bytes);
            // Write to a temporary file created 0600, then rename: never a half-written or world-readable key.
            let tmp = state_dir.join(format!(".{KEY_FILE}.tmp"));
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            writeln!(f, "{}", B64.encode(secret.to_bytes()))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            tracing::info!(path = %path.display(), "generated a new node key");
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Reads a pre-shared key file (base64 of 32 bytes, like `wg genpsk`). Refuses a file readable by group or
/// others.
pub fn read_psk(path: &Path) -> Result<[u8; 32]> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read the PSK file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "the PSK file {} has mode {mode:o}: make it 0600 (chmod 600)",
            path.display()
        );
    }
    let s = std::fs::read_to_string(path)?;
    decode32(s.trim()).with_context(|| format!("invalid PSK in {}", path.display()))
}

pub fn decode32(s: &str) -> Result<[u8; 32]> {
    let v = B64.decode(s).context("not base64")?;
    v.try_into()
        .map_err(|v: Vec<u8>| anyhow::anyhow!("{} bytes instead of 32", v.len()))
}

pub fn encode(b: &[u8]) -> String {
    B64.encode(b)
}

pub fn public_of(secret: &StaticSecret) -> [u8; 32] {
    *PublicKey::from(secret).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_with_mode_0600_and_reused() {
        let d = tempfile_dir();
        let a = load_or_create(&d).unwrap();
        let mode = std::fs::metadata(d.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create(&d).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn psk_must_be_private() {
        let d = tempfile_dir();
        let p = d.join("psk");
        std::fs::write(&p, format!("{}\n", encode(&[7u8; 32]))).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_psk(&p).is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_psk(&p).unwrap(), [7u8; 32]);
        std::fs::write(&p, "short").unwrap();
        assert!(read_psk(&p).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "eviod-keys-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&d).unwrap();
        d
    }
}
