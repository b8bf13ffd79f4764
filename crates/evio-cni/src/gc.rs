//! GC: removes what stale attachments left (veths, bridge ports, masquerade entries, addresses, state),
//! going on past every failure and reporting them all at the end.

use std::collections::HashSet;

use evio_cni_types::config::NetConf;
use evio_cni_types::env::Env;
use evio_cni_types::{CniError, ErrorCode};
use tracing::info;

use crate::common::Output;
use crate::common::{Attachment, io_err};
use crate::host::Host;
use crate::state::State;

pub fn gc(env: &Env, conf: &NetConf, host: &dyn Host) -> Result<Output, CniError> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "invalid network config: GC needs cni.dev/valid-attachments",
        )
    })?;
    let valid: Vec<Attachment> = valid
        .iter()
        .map(|a| Attachment::new(conf, &a.container_id, &a.ifname))
        .collect();
    let keep: HashSet<&Attachment> = valid.iter().collect();
    let dlg = match &conf.ipam {
        Some(_) => Some(host.ipam(conf, env)?),
        None => None,
    };
    let mut links = host.host_links()?;
    let mut errors = Vec::new();
    for st in State::all(&conf.state_dir, &conf.name) {
        let att = Attachment::new(conf, &st.container_id, &st.ifname);
        if keep.contains(&att) {
            continue;
        }
        info!(container = %st.container_id, ifname = %st.ifname, "GC: stale attachment");
        if st.masq
            && let Err(e) = host.firewall().remove(&st.ips)
        {
            errors.push(format!("masquerade of {}: {e}", st.container_id));
            continue;
        }
        if let Err(e) = links.delete_owned(&st.host_veth, &att.owner).and_then(|_| {
            host.bridge()?
                .detach(&att.owner)
                .map_err(|e| io_err("detach from the bridge", e))
        }) {
            errors.push(e.to_string());
        }
        if let Some(d) = &dlg
            && let Err(e) = d.run(
                "DEL",
                &conf.for_delegate(d.version(), None),
                Some((&st.container_id, &st.ifname)),
            )
        {
            errors.push(format!("IPAM DEL of {}: {e}", st.container_id));
            continue;
        }
        State::remove(&conf.state_dir, &conf.name, &st.container_id, &st.ifname);
    }
    let keys: HashSet<String> = valid.iter().map(|a| a.key.clone()).collect();
    if let Err(e) = host.firewall().gc(&conf.name, &keys) {
        errors.push(format!("masquerade GC: {e}"));
    }
    let owners: Vec<_> = valid.into_iter().map(|a| a.owner).collect();
    match host.bridge() {
        Ok(b) => {
            if let Err(e) = b.gc(&owners) {
                errors.push(format!("bridge GC: {e}"));
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
    if let Some(d) = &dlg
        && d.speaks_at_least("1.1.0")
        && let Err(e) = d.run("GC", &conf.for_delegate(d.version(), None), None)
    {
        errors.push(format!("IPAM GC: {e}"));
    }
    if !errors.is_empty() {
        return Err(CniError::with_details(
            ErrorCode::Io,
            "GC could not remove everything",
            errors.join("; "),
        ));
    }
    Ok(Output::Nothing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeHost, Recorder, conf, env};

    const VALID: &str = r#","cni.dev/valid-attachments":[{"containerID":"keep","ifname":"eth0"}]"#;

    fn gc_failing(rec: &Recorder, dir: &std::path::Path, calls: &[usize]) -> Result<(), CniError> {
        rec.fail_calls(calls);
        let r = gc(&env("GC", ""), &conf(dir, VALID), &FakeHost::new(rec)).map(|_| ());
        rec.fail_calls(&[]);
        r
    }

    #[test]
    fn gc_removes_stale_attachments_and_goes_on_past_failures() {
        let d = tempfile::tempdir().unwrap();
        let rec = Recorder::default();
        let host = FakeHost::new(&rec);
        crate::add::add(&env("ADD", "keep"), &conf(d.path(), ""), &host).unwrap();
        let kept = rec.world(d.path(), "net");
        for c in ["a", "b"] {
            crate::add::add(&env("ADD", c), &conf(d.path(), ""), &host).unwrap();
        }
        // The first stale attachment's masquerade removal fails: the other one is still collected, and so
        // are the table, bridge and IPAM GCs; the failed one keeps its state for the next GC.
        let start = rec.calls().len();
        let e = gc_failing(&rec, d.path(), &[2]).unwrap_err();
        let calls = rec.calls()[start..].to_vec();
        assert!(calls[1].starts_with("fw.remove"), "{calls:?}");
        assert!(e.details.contains("masquerade of"), "{e}");
        for c in ["fw.gc", "bridge.gc", "ipam.GC"] {
            assert!(calls.iter().any(|x| x.starts_with(c)), "{c}: {calls:?}");
        }
        let w = rec.world(d.path(), "net");
        assert_eq!(w.state_files.len(), 2, "{w:?}");
        assert_eq!(w.leases.len(), 2, "{w:?}");
        // Every error is reported, not only the first: the remaining stale attachment's masquerade
        // removal (call 2) and then the table GC (call 3, as the attachment is skipped) both fail.
        let start = rec.calls().len();
        let e = gc_failing(&rec, d.path(), &[2, 3]).unwrap_err();
        assert!(rec.calls()[start + 2].starts_with("fw.gc"));
        assert!(
            e.details.contains("masquerade of") && e.details.contains("masquerade GC"),
            "{e}"
        );
        gc_failing(&rec, d.path(), &[]).unwrap();
        assert_eq!(rec.world(d.path(), "net"), kept);
    }
}
