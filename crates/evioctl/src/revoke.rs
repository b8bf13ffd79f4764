//! `evioctl revoke NODE`: writes a CA-signed revocation of the node's key and certificate
//! (`/evio/v1/revoked/<node>/<serial>`), then deletes its certificate, its registration and any pending
//! request, and frees its VIP and pod subnet claims. Peers refuse a revoked key; the signer refuses it at
//! join and renewal.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use evio_store::{Store, keys};
use evio_trust::{CaKey, CertRecord, NodeCert, Revocation, RevocationRecord, unix_now};

use crate::cni_config::{EtcdArgs, runtime};

#[derive(clap::Args)]
pub struct Args {
    /// The node to revoke.
    pub node: String,
    /// The CA directory (`evioctl ca init --dir`).
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Revoke this X25519 public key (base64) when the node has no certificate in etcd any more.
    #[arg(long)]
    pub public_key: Option<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

pub fn run(args: Args) -> Result<()> {
    if !keys::valid_node_name(&args.node) {
        bail!("invalid node name {:?}", args.node);
    }
    let ca = CaKey::load_dir(&args.ca_dir)
        .with_context(|| format!("loading the CA in {}", args.ca_dir.display()))?;
    let public = ca.public();
    let opts = args.etcd.options(None)?;
    runtime()?.block_on(async {
        let store = Store::connect(&opts).await?;
        let mut c = store.client();
        // Every certificate that binds the node: the ledger's last one and the one in etcd (they differ
        // only if etcd was tampered with or the CA directory was restored from an older backup).
        let mut certs: Vec<NodeCert> =
            evio_trust::ledger::last_issued(&args.ca_dir, &public, &args.node)?
                .into_iter()
                .collect();
        let r = c.get(keys::cert(&args.node), None).await?;
        if let Some(cert) = r
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<CertRecord>(kv.value()).ok())
            .and_then(|rec| NodeCert::verify_ignoring_time(&rec.cert, &public).ok())
            .filter(|cert| cert.node == args.node && !certs.contains(cert))
        {
            certs.push(cert);
        }
        let now = unix_now();
        let mut revs: Vec<Revocation> = certs.iter().map(|c| Revocation::of(c, now)).collect();
        if let Some(k) = &args.public_key {
            revs.push(Revocation {
                node: args.node.clone(),
                public_key: k.trim().to_string(),
                serial: 0,
                time: now,
            });
        }
        if revs.is_empty() {
            bail!(
                "this CA issued no certificate to node {} and etcd holds none: give its key with --public-key",
                args.node
            );
        }
        for rev in &revs {
            let signed = rev.sign(&ca)?;
            evio_trust::ledger::record_revoked(&args.ca_dir, rev, &signed)?;
            c.put(
                keys::revoked(&rev.node, rev.serial),
                serde_json::to_string(&RevocationRecord { revocation: signed })?,
                None,
            )
            .await?;
            println!(
                "revoked key {} of node {} (certificate serial {})",
                rev.public_key, rev.node, rev.serial
            );
        }
        for k in [
            keys::cert(&args.node),
            keys::node(&args.node),
            keys::join(&args.node),
            keys::renew(&args.node),
        ] {
            c.delete(k, None).await?;
        }
        if let Some(s) = store.release_subnet(&args.node).await? {
            println!("released pod subnet {} of node {}", s.subnet, args.node);
        }
        if let Some(a) = store.release_address(&args.node).await? {
            println!("released host address {} of node {}", a.address, args.node);
        }
        Ok(())
    })
}
