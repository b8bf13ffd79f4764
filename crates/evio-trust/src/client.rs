//! The node side over etcd (feature `etcd`): join with a token, renew a certificate, read and verify
//! peers' certificates and the revocations. The lead's eviod integration calls these.
//!
//! Nothing read from etcd is trusted: a certificate counts only if it verifies against the CA and binds the
//! expected name and key; a refusal only if the CA signed it for this request's nonce. Anything else is
//! skipped (and logged), and the wait goes on until the timeout.

use std::time::Duration;

use evio_store::etcd_client::{self, Compare, CompareOp, Txn, TxnOp, WatchOptions, WatchStream};
use evio_store::{EtcdOptions, Store, keys};
use tracing::warn;

use crate::{
    CaPublic, CertRecord, JoinRequest, JoinToken, NodeCert, Refusal, RefusalRecord, RenewRequest,
    Revocation, RevocationRecord, TrustError, b64, unix_now,
};

/// Why a join or renewal did not produce a certificate.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("etcd {what} failed: {source}")]
    Etcd {
        what: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {0} timed out")]
    EtcdTimeout(&'static str),
    #[error("the cluster CA refused the request of node {node}: {reason}")]
    Refused { node: String, reason: String },
    #[error(
        "no certificate for node {node} within {timeout:?}: is the signer (`evioctl ca serve`) running and \
         watching this etcd?"
    )]
    Timeout { node: String, timeout: Duration },
}

/// How often the join and renewal clients look for the answer when etcd's watch is not available (they
/// watch the answer keys, and look anyway at least this often).
pub const POLL: Duration = Duration::from_millis(500);

/// The etcd options a token carries (endpoints, user and password); TLS files and timeouts are the
/// caller's to add.
pub fn etcd_options(token: &JoinToken) -> EtcdOptions {
    let mut o = EtcdOptions::new(token.etcd_endpoints.clone());
    o.user = token.etcd_user.clone();
    o.password = token.etcd_password.clone();
    o
}

async fn op<T>(
    store: &Store,
    what: &'static str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, JoinError> {
    match tokio::time::timeout(store.timeout(), f).await {
        Err(_) => Err(JoinError::EtcdTimeout(what)),
        Ok(Err(source)) => Err(JoinError::Etcd { what, source }),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Value and mod revision of `key`.
async fn get(
    store: &Store,
    what: &'static str,
    key: &str,
) -> Result<Option<(Vec<u8>, i64)>, JoinError> {
    let mut c = store.client();
    let r = op(store, what, c.get(key, None)).await?;
    Ok(r.kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
}

/// Reads `certs/<node>` and verifies it against `ca` at `now`. `Ok(None)` when there is none; an
/// unverifiable value is an error (the caller decides whether to wait on).
pub async fn certificate(
    store: &Store,
    ca: &CaPublic,
    node: &str,
    now: u64,
) -> Result<Option<(NodeCert, String)>, JoinError> {
    crate::cert::check_node_name(node)?;
    let Some((v, _)) = get(store, "read certificate", &keys::cert(node)).await? else {
        return Ok(None);
    };
    Ok(Some(parse_cert(&v, ca, node, now)?))
}

fn parse_cert(
    value: &[u8],
    ca: &CaPublic,
    node: &str,
    now: u64,
) -> Result<(NodeCert, String), TrustError> {
    if value.len() > crate::MAX_CERT_LEN + 64 {
        return Err(TrustError::TooLong {
            what: "certificate record",
            len: value.len(),
            max: crate::MAX_CERT_LEN + 64,
        });
    }
    let r: CertRecord = serde_json::from_slice(value)
        .map_err(|e| TrustError::Malformed(format!("certificate record: {e}")))?;
    let c = NodeCert::verify(&r.cert, ca, now)?;
    if c.node != node {
        return Err(TrustError::InvalidField(format!(
            "the certificate at certs/{node} is for node {}",
            c.node
        )));
    }
    Ok((c, r.cert))
}

/// Every revocation in etcd that the CA signed (others are skipped with a warning).
pub async fn revocations(store: &Store, ca: &CaPublic) -> Result<Vec<Revocation>, JoinError> {
    let mut c = store.client();
    let r = op(
        store,
        "list revocations",
        c.get(
            keys::REVOKED,
            Some(etcd_client::GetOptions::new().with_prefix()),
        ),
    )
    .await?;
    let mut v = Vec::new();
    for kv in r.kvs() {
        let parsed = serde_json::from_slice::<RevocationRecord>(kv.value())
            .map_err(|e| TrustError::Malformed(format!("revocation record: {e}")))
            .and_then(|rec| Revocation::verify(&rec.revocation, ca));
        match parsed {
            Ok(rev) => v.push(rev),
            Err(e) => warn!(key = %String::from_utf8_lossy(kv.key()), "ignoring revocation: {e}"),
        }
    }
    Ok(v)
}

/// Writes `request` at `key`, then waits for a certificate at `certs/<node>` written after it that verifies
/// against `ca` and binds `node` and `public_key`, or for a CA-signed refusal of `nonce`. On timeout the
/// request is withdrawn (if it is still ours).
#[allow(clippy::too_many_arguments)]
async fn request_and_wait(
    store: &Store,
    ca: &CaPublic,
    key: String,
    request: String,
    node: &str,
    nonce: &str,
    public_key: &[u8; 32],
    timeout: Duration,
) -> Result<(NodeCert, String), JoinError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut c = store.client();
    let put = op(
        store,
        "write request",
        c.put(key.clone(), request.clone(), None),
    )
    .await?;
    let written = put.header().map(|h| h.revision()).unwrap_or(0);
    let (cert_key, refused_key) = (keys::cert(node), keys::refused(node));
    // Watch both answer keys from just after the request (nothing is missed between the put and the watch).
    let watch = |k: String| {
        let mut c = c.clone();
        async move {
            let opts = WatchOptions::new().with_start_revision(written + 1);
            op(store, "watch answer", c.watch(k, Some(opts))).await.ok()
        }
    };
    let mut watches: [Option<WatchStream>; 2] = [
        watch(cert_key.clone()).await,
        watch(refused_key.clone()).await,
    ];
    let mut last_bad = String::new();
    loop {
        if let Some((v, rev)) = get(store, "read certificate", &cert_key).await?
            && rev > written
        {
            match parse_cert(&v, ca, node, unix_now()) {
                Ok((cert, s)) if cert.public_key == *public_key => return Ok((cert, s)),
                Ok(_) => last_bad = "a certificate for another key".into(),
                Err(e) => last_bad = e.to_string(),
            }
        }
        if let Some((v, rev)) = get(store, "read refusal", &refused_key).await?
            && rev > written
        {
            let r = serde_json::from_slice::<RefusalRecord>(&v)
                .map_err(|e| TrustError::Malformed(format!("refusal record: {e}")))
                .and_then(|r| Refusal::verify(&r.refusal, ca));
            match r {
                Ok(r) if r.nonce == nonce && r.node == node => {
                    return Err(JoinError::Refused {
                        node: node.to_string(),
                        reason: r.reason,
                    });
                }
                Ok(_) => {}
                Err(e) => last_bad = e.to_string(),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            if !last_bad.is_empty() {
                warn!(
                    node,
                    "ignored an unverifiable answer while waiting: {last_bad}"
                );
            }
            // Withdraw the request if it is still the one we wrote.
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, request)])
                .and_then([TxnOp::delete(key, None)]);
            let _ = op(store, "withdraw request", c.txn(txn)).await;
            return Err(JoinError::Timeout {
                node: node.to_string(),
                timeout,
            });
        }
        wait_change(&mut watches, deadline).await;
    }
}

/// True on an event; false when the watch failed or ended; never returns without a watch.
async fn next_change(w: Option<&mut WatchStream>) -> bool {
    match w {
        Some(w) => matches!(w.message().await, Ok(Some(_))),
        None => std::future::pending().await,
    }
}

/// Returns when a watched key changes, after [`POLL`], or at the deadline. A watch that fails is dropped
/// (polling goes on).
async fn wait_change(watches: &mut [Option<WatchStream>; 2], deadline: tokio::time::Instant) {
    let until = deadline.min(tokio::time::Instant::now() + POLL);
    let [a, b] = watches;
    tokio::select! {
        ok = next_change(a.as_mut()) => if !ok { *a = None },
        ok = next_change(b.as_mut()) => if !ok { *b = None },
        _ = tokio::time::sleep_until(until) => {}
    }
}

/// Joins with `token`: writes a join request for `node` with X25519 public key `public_key` and waits up to
/// `timeout` for its certificate. Returns the verified certificate and its signed string (to publish in the
/// node record). Checks the token's expiry first, so an expired token writes nothing.
pub async fn join(
    store: &Store,
    token: &JoinToken,
    node: &str,
    public_key: &[u8; 32],
    timeout: Duration,
) -> Result<(NodeCert, String), JoinError> {
    let now = unix_now();
    token.check_fresh(now)?;
    let req = JoinRequest::new(token, node, public_key, now)?;
    request_and_wait(
        store,
        &token.ca,
        keys::join(node),
        req.to_json(),
        node,
        &req.nonce,
        public_key,
        timeout,
    )
    .await
}

/// Renews `current` (the node's certificate) without a token: the request is authenticated with the node's
/// private key (see [`RenewRequest`]). The new certificate has the same name, key, VIP and subnets.
pub async fn renew(
    store: &Store,
    ca: &CaPublic,
    private_key: &[u8; 32],
    current: &NodeCert,
    timeout: Duration,
) -> Result<(NodeCert, String), JoinError> {
    let req = RenewRequest::new(ca, &current.node, private_key, current.serial, unix_now())?;
    if req.public_key != b64::std(&current.public_key) {
        return Err(TrustError::InvalidField(
            "the private key does not match the certificate's public key".into(),
        )
        .into());
    }
    request_and_wait(
        store,
        ca,
        keys::renew(&current.node),
        req.to_json(),
        &current.node,
        &req.nonce,
        &current.public_key,
        timeout,
    )
    .await
}
