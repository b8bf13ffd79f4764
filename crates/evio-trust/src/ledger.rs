//! The signer's own record, in the CA directory, of what it issued and revoked. etcd holds copies for the
//! nodes, but an etcd writer can delete keys: a deleted certificate must not free a name for another key,
//! and a deleted revocation must not let a revoked key join or renew again. So the signer decides from
//! this ledger (and from etcd's records too, which can only add refusals).
//!
//! - `issued/<node>.cert`: the last certificate issued to the node (the signed string; public, 0644).
//! - `revoked/<node>@<serial>.rev`: a signed revocation (public, 0644).
//!
//! Both are verified against the CA when read, so a file planted by someone who can write the directory
//! but not sign counts for nothing.

use std::path::{Path, PathBuf};

use crate::cert::check_node_name;
use crate::files::{read_bounded, write_replace};
use crate::{CaPublic, MAX_CERT_LEN, MAX_RECORD_LEN, NodeCert, Revocation, TrustError};

fn subdir(ca_dir: &Path, name: &str) -> Result<PathBuf, TrustError> {
    use std::os::unix::fs::DirBuilderExt;
    let d = ca_dir.join(name);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .map_err(TrustError::io(&d))?;
    Ok(d)
}

/// Records `signed` (a certificate of `cert.node`) as the node's current certificate.
pub fn record_issued(ca_dir: &Path, cert: &NodeCert, signed: &str) -> Result<(), TrustError> {
    check_node_name(&cert.node)?;
    let d = subdir(ca_dir, "issued")?;
    write_replace(
        &d.join(format!("{}.cert", cert.node)),
        signed.as_bytes(),
        0o644,
    )
}

/// The last certificate issued to `node`, if any and if it verifies against `ca` (whatever its window).
pub fn last_issued(
    ca_dir: &Path,
    ca: &CaPublic,
    node: &str,
) -> Result<Option<NodeCert>, TrustError> {
    check_node_name(node)?;
    let p = ca_dir.join("issued").join(format!("{node}.cert"));
    if !p.exists() {
        return Ok(None);
    }
    let text = read_bounded(&p, MAX_CERT_LEN)?;
    let text = String::from_utf8_lossy(&text);
    let c = NodeCert::verify_ignoring_time(&text, ca)?;
    Ok((c.node == node).then_some(c))
}

/// Records a signed revocation.
pub fn record_revoked(ca_dir: &Path, rev: &Revocation, signed: &str) -> Result<(), TrustError> {
    check_node_name(&rev.node)?;
    let d = subdir(ca_dir, "revoked")?;
    write_replace(
        &d.join(format!("{}@{}.rev", rev.node, rev.serial)),
        signed.as_bytes(),
        0o644,
    )
}

/// Every revocation in the ledger that verifies against `ca`.
pub fn revocations(ca_dir: &Path, ca: &CaPublic) -> Result<Vec<Revocation>, TrustError> {
    let d = ca_dir.join("revoked");
    let rd = match std::fs::read_dir(&d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrustError::io(&d)(e)),
    };
    let mut v = Vec::new();
    for e in rd {
        let p = e.map_err(TrustError::io(&d))?.path();
        if p.extension().is_some_and(|x| x == "rev")
            && let Ok(text) = read_bounded(&p, MAX_RECORD_LEN)
            && let Ok(r) = Revocation::verify(&String::from_utf8_lossy(&text), ca)
        {
            v.push(r);
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CaKey, unix_now};

    #[test]
    fn ledger_round_trip_and_forgeries_count_for_nothing() {
        let d = tempfile::tempdir().unwrap();
        let ca = CaKey::init_dir(d.path(), "lab").unwrap();
        let now = unix_now();
        let cert = NodeCert {
            node: "n1".into(),
            public_key: [1; 32],
            address: "10.10.0.1".parse().unwrap(),
            pod_subnets: vec![],
            not_before: now,
            not_after: now + 10,
            serial: 7,
        };
        assert_eq!(last_issued(d.path(), &ca.public(), "n1").unwrap(), None);
        record_issued(d.path(), &cert, &cert.sign(&ca).unwrap()).unwrap();
        assert_eq!(
            last_issued(d.path(), &ca.public(), "n1").unwrap(),
            Some(cert.clone())
        );
        let rev = Revocation::of(&cert, now);
        record_revoked(d.path(), &rev, &rev.sign(&ca).unwrap()).unwrap();
        assert_eq!(
            revocations(d.path(), &ca.public()).unwrap(),
            vec![rev.clone()]
        );
        // Files signed by another CA are ignored (revocations) or refused (issued).
        let other = CaKey::generate("x");
        let mut c2 = cert.clone();
        c2.node = "n2".into();
        record_issued(d.path(), &c2, &c2.sign(&other).unwrap()).unwrap();
        assert!(last_issued(d.path(), &ca.public(), "n2").is_err());
        let r2 = Revocation::of(&c2, now);
        record_revoked(d.path(), &r2, &r2.sign(&other).unwrap()).unwrap();
        assert_eq!(revocations(d.path(), &ca.public()).unwrap(), vec![rev]);
        assert!(last_issued(d.path(), &ca.public(), "../ca").is_err());
    }
}
