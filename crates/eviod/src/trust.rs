//! CA mode on the agent's side: a join token adopted into the state directory, the node's certificate
//! (joined for, kept, renewed), and the pinned CA that peers' certificates are checked against.
//!
//! State directory (all mode 0600, the directory 0700):
//!
//! | file | what |
//! |---|---|
//! | `join.json` | what the token said that is not secret: etcd endpoints and user, STUN, TURN server and user |
//! | `ca.json` | the pinned cluster CA (its public keys) |
//! | `etcd-password`, `turn-password` | the token's secrets, as the password files eviod already reads |
//! | `join-token` | the token itself, kept only until the first certificate (then removed) |
//! | `node.cert` | the node's certificate (signed string) |
//!
//! So `eviod --join-token T --node-name N --state-dir D` once, and `eviod --node-name N --state-dir D`
//! afterwards: restarts need no token, and a token is never kept once it did its work.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use evio_store::Store;
use evio_trust::{CaPublic, JoinToken, NodeCert, client};
use serde::{Deserialize, Serialize};

use crate::config::Config;

const JOIN: &str = "join.json";
const CA: &str = "ca.json";
const TOKEN: &str = "join-token";
const CERT: &str = "node.cert";
const ETCD_PASSWORD: &str = "etcd-password";
const TURN_PASSWORD: &str = "turn-password";

/// How long a join or renewal waits for the signer before giving up (and retrying later for renewals).
pub const SIGNER_TIMEOUT: Duration = Duration::from_secs(30);

/// What `join.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Joined {
    etcd_endpoints: Vec<String>,
    etcd_user: Option<String>,
    #[serde(default)]
    stun: Vec<String>,
    turn: Option<String>,
    turn_user: Option<String>,
}

/// Writes `dir/name` with mode 0600 through a temporary file and a rename.
fn write_private(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))
        .with_context(|| format!("cannot write {}", dir.join(name).display()))?;
    Ok(())
}

/// Adopts a join token into the state directory (replacing an earlier join), before anything else runs.
/// Refuses a malformed or expired token, or one whose CA pin does not match its keys, writing nothing.
pub fn adopt_token(state_dir: &Path, text: &str) -> Result<()> {
    let token = JoinToken::decode(text).context("invalid join token")?;
    token
        .check_fresh(evio_trust::unix_now())
        .context("invalid join token")?;
    fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))?;
    let joined = Joined {
        etcd_endpoints: token.etcd_endpoints.clone(),
        etcd_user: token.etcd_user.clone(),
        stun: token.stun.clone(),
        turn: token.turn.clone(),
        turn_user: token.turn_user.clone(),
    };
    for (name, secret) in [
        (ETCD_PASSWORD, &token.etcd_password),
        (TURN_PASSWORD, &token.turn_password),
    ] {
        match secret {
            Some(s) => write_private(state_dir, name, s.as_bytes())?,
            None => {
                let _ = fs::remove_file(state_dir.join(name));
            }
        }
    }
    // A new CA means a new identity under it: an old certificate is dropped.
    if let Ok(old) = CaPublic::load(&state_dir.join(CA))
        && old.pin() != token.ca.pin()
    {
        let _ = fs::remove_file(state_dir.join(CERT));
    }
    write_private(state_dir, CA, token.ca.to_json().as_bytes())?;
    write_private(state_dir, TOKEN, text.trim().as_bytes())?;
    write_private(state_dir, JOIN, &serde_json::to_vec_pretty(&joined)?)?;
    Ok(())
}

/// The CA pinned in the state directory, if this node runs in CA mode.
pub fn pinned_ca(state_dir: &Path) -> Result<Option<CaPublic>> {
    let p = state_dir.join(CA);
    if !p.exists() {
        return Ok(None);
    }
    Ok(Some(
        CaPublic::load(&p).with_context(|| format!("cannot load {}", p.display()))?,
    ))
}

/// Fills what flags left out from `join.json` (flags win): etcd endpoints and user, the password files
/// the token's secrets were written to, STUN and TURN.
pub fn fill_config(cfg: &mut Config) -> Result<()> {
    let p = cfg.state_dir.join(JOIN);
    let Ok(text) = fs::read(&p) else {
        return Ok(());
    };
    let j: Joined =
        serde_json::from_slice(&text).with_context(|| format!("invalid {}", p.display()))?;
    if cfg.etcd.endpoints.is_empty() {
        cfg.etcd.endpoints = j.etcd_endpoints;
        if cfg.etcd.user.is_none() {
            cfg.etcd.user = j.etcd_user;
            let pw = cfg.state_dir.join(ETCD_PASSWORD);
            if cfg.etcd.user.is_some() && pw.exists() {
                cfg.etcd.password_file = Some(pw);
            }
        }
    }
    if cfg.nat.stun.is_empty() {
        cfg.nat.stun = j.stun;
    }
    if cfg.nat.turn.is_none() && j.turn.is_some() {
        cfg.nat.turn = j.turn;
        cfg.nat.turn_user = j.turn_user;
        cfg.nat.turn_password_file = Some(cfg.state_dir.join(TURN_PASSWORD));
    }
    Ok(())
}

/// The node's certificate as kept in the state directory, if it verifies for this node and key now.
pub fn stored_certificate(
    cfg: &Config,
    ca: &CaPublic,
    public_key: &[u8; 32],
) -> Option<(NodeCert, String)> {
    let signed = fs::read_to_string(cfg.state_dir.join(CERT)).ok()?;
    let signed = signed.trim().to_string();
    match NodeCert::verify_peer(
        &signed,
        ca,
        &cfg.node_name,
        public_key,
        &[],
        evio_trust::unix_now(),
    ) {
        Ok(c) => Some((c, signed)),
        Err(e) => {
            tracing::warn!("the stored certificate is not usable: {e}");
            None
        }
    }
}

/// Keeps `signed` as the node's certificate.
pub fn store_certificate(state_dir: &Path, signed: &str) -> Result<()> {
    write_private(state_dir, CERT, signed.as_bytes())
}

/// The node's certificate: the stored one (renewed first when it is due and the signer answers), else a
/// join with the stored token. The token is removed once it brought a certificate.
pub async fn certificate(
    cfg: &Config,
    store: &Store,
    ca: &CaPublic,
    private_key: &[u8; 32],
    public_key: &[u8; 32],
) -> Result<(NodeCert, String)> {
    if let Some((cert, signed)) = stored_certificate(cfg, ca, public_key) {
        if evio_trust::unix_now() < cert.renew_at() {
            return Ok((cert, signed));
        }
        match client::renew(store, ca, private_key, &cert, SIGNER_TIMEOUT).await {
            Ok((c, s)) => {
                store_certificate(&cfg.state_dir, &s)?;
                return Ok((c, s));
            }
            Err(e) => {
                tracing::warn!("renewing the certificate failed, using the current one: {e}");
                return Ok((cert, signed));
            }
        }
    }
    let token_path = cfg.state_dir.join(TOKEN);
    let Ok(text) = fs::read_to_string(&token_path) else {
        bail!(
            "no valid certificate in {} and no join token: start once with --join-token \
             (from `evioctl token create`)",
            cfg.state_dir.display()
        );
    };
    let token = JoinToken::decode(&text).context("the stored join token")?;
    if token.ca.pin() != ca.pin() {
        bail!("the stored join token is for another CA than the pinned one");
    }
    let (c, s) = client::join(store, &token, &cfg.node_name, public_key, SIGNER_TIMEOUT)
        .await
        .context("joining the cluster")?;
    store_certificate(&cfg.state_dir, &s)?;
    let _ = fs::remove_file(&token_path);
    tracing::info!(node = %c.node, address = %c.address, subnets = ?c.pod_subnets, not_after = c.not_after, "joined: certificate issued");
    Ok((c, s))
}
