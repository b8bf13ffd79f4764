//! DEL: undoes an ADD, from its state file when there is one, else from the owner tags on the host veth,
//! the bridge port and the masquerade entries. Every part runs even when another fails; the attachment's
//! state is kept until all of them succeeded, so a retried DEL finishes the job.

use evio_cni_types::config::{BridgeKind, NetConf};
use evio_cni_types::env::Env;
use evio_cni_types::{CniError, ErrorCode};
use tracing::{debug, info, warn};

use crate::common::Output;
use crate::common::{Attachment, io_err};
use crate::host::Host;
use crate::state::State;

pub fn del(env: &Env, conf: &NetConf, host: &dyn Host) -> Result<Output, CniError> {
    let att = Attachment::new(conf, &env.container_id, &env.ifname);
    let st = State::load(&conf.state_dir, &conf.name, &env.container_id, &env.ifname);
    let dlg = match &conf.ipam {
        Some(_) => Some(host.ipam(conf, env)?),
        None => None,
    };
    let ipam_conf = dlg.as_ref().map(|d| conf.for_delegate(d.version(), None));
    let needs_fw = st.as_ref().map(|s| s.masq).unwrap_or(conf.ip_masq);
    let fw = host.firewall();
    // The address is released only after its masquerade entry is gone, so a new pod that gets it next is
    // never hit by our removal; both run alongside the veth removal.
    let (fw_ipam, links) = std::thread::scope(|s| {
        let fw_ipam = s.spawn(|| -> Result<(), CniError> {
            if needs_fw {
                match &st {
                    Some(st) => fw.remove(&st.ips),
                    None => fw.remove_key(&att.key).map(|_| ()),
                }
                .map_err(|e| io_err("remove IP masquerade", e))?;
            }
            if let (Some(d), Some(c)) = (&dlg, &ipam_conf) {
                d.run("DEL", c, None)?;
                debug!("IPAM DEL done");
            }
            Ok(())
        });
        let links = (|| -> Result<(), CniError> {
            // The recorded host veth (checked by its owner tag) is the quick way; the backend's detach
            // finds ports by tag (a link dump for Linux) and removes OVS port records.
            let mut links = host.host_links()?;
            let deleted = match &st {
                Some(st) => links.delete_owned(&st.host_veth, &att.owner)?,
                None => false,
            };
            debug!(deleted, "host veth");
            if !deleted || conf.bridge_kind != BridgeKind::Linux {
                match host.bridge() {
                    Ok(b) => b
                        .detach(&att.owner)
                        .map_err(|e| io_err("detach from the bridge", e))?,
                    Err(e) => warn!("DEL without bridge backend: {e}"),
                }
            }
            if !deleted {
                links.delete_in_netns(&env.netns, &env.ifname)?;
            }
            Ok(())
        })();
        (fw_ipam.join(), links)
    });
    let fw_ipam =
        fw_ipam.unwrap_or_else(|_| Err(CniError::new(ErrorCode::Io, "DEL thread panicked")));
    fw_ipam?;
    links?;
    State::remove(&conf.state_dir, &conf.name, &env.container_id, &env.ifname);
    info!(container = %env.container_id, "DEL done");
    Ok(Output::Nothing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeHost, Recorder, World, conf, env};

    fn setup() -> (tempfile::TempDir, Recorder, World) {
        let d = tempfile::tempdir().unwrap();
        let rec = Recorder::default();
        let host = FakeHost::new(&rec);
        crate::add::add(&env("ADD", "keep"), &conf(d.path(), ""), &host).unwrap();
        let empty = rec.world(d.path(), "net");
        crate::add::add(&env("ADD", "c1"), &conf(d.path(), ""), &host).unwrap();
        (d, rec, empty)
    }

    fn del_failing(rec: &Recorder, dir: &std::path::Path, calls: &[usize]) -> Result<(), CniError> {
        rec.fail_calls(calls);
        let r = del(&env("DEL", "c1"), &conf(dir, ""), &FakeHost::new(rec)).map(|_| ());
        rec.fail_calls(&[]);
        r
    }

    #[test]
    fn del_removes_everything_and_is_idempotent() {
        let (d, rec, before) = setup();
        del_failing(&rec, d.path(), &[]).unwrap();
        assert_eq!(rec.world(d.path(), "net"), before);
        del_failing(&rec, d.path(), &[]).unwrap();
        assert_eq!(rec.world(d.path(), "net"), before);
    }

    #[test]
    fn every_failure_of_del_is_reported_the_rest_still_runs_and_a_retry_finishes() {
        let (d, rec, before) = setup();
        let start = rec.calls().len();
        del_failing(&rec, d.path(), &[]).unwrap();
        let n = rec.calls().len() - start;
        assert!(n >= 4, "{:?}", &rec.calls()[start..]);
        // Again, failing each call in turn.
        for k in 1..=n {
            let (d, rec, _) = setup();
            let start = rec.calls().len();
            let e = del_failing(&rec, d.path(), &[k]).unwrap_err();
            let calls = rec.calls()[start..].to_vec();
            let failed = &calls[k - 1];
            assert!(e.to_string().contains("injected"), "{failed}: {e}");
            let w = rec.world(d.path(), "net");
            // The state stays for the retry.
            assert!(w.state_files.contains("c1-eth0.json"), "{failed}: {w:?}");
            // Finding the IPAM plugin comes first: when that fails nothing is touched.
            if failed == "ipam.find" {
                assert_eq!(calls.len(), 1, "{calls:?}");
            // The links part runs whatever happens to the firewall and IPAM part, and vice versa.
            } else if failed.starts_with("fw.") || failed.starts_with("ipam.") {
                assert!(calls.iter().any(|c| c.starts_with("links.delete_owned")));
                assert_eq!(w.veths, before.veths, "{failed}");
            } else {
                assert!(calls.iter().any(|c| c.starts_with("fw.remove")));
                assert_eq!(w.masq, before.masq, "{failed}");
            }
            // The address is released only once its masquerade entry is gone.
            if failed.starts_with("fw.") {
                assert!(
                    !calls.iter().any(|c| c.starts_with("ipam.DEL")),
                    "{calls:?}"
                );
                assert_ne!(w.leases, before.leases);
            }
            del_failing(&rec, d.path(), &[]).unwrap();
            assert_eq!(rec.world(d.path(), "net"), before, "retry after {failed}");
        }
    }

    #[test]
    fn del_without_state_finds_the_attachment_by_its_tags() {
        let (d, rec, before) = setup();
        State::remove(d.path(), "net", "c1", "eth0");
        del_failing(&rec, d.path(), &[]).unwrap();
        let w = rec.world(d.path(), "net");
        // Masquerade entry by key, bridge port by owner; the veth goes with the pod netns (not modelled)
        // and the address with IPAM DEL.
        assert_eq!(w.masq, before.masq);
        assert_eq!(w.ports, before.ports);
        assert_eq!(w.leases, before.leases);
        let calls = rec.calls();
        assert!(calls.iter().any(|c| c == "fw.remove_key evio net c1 eth0"));
        assert!(
            calls
                .iter()
                .any(|c| c == "links.delete_in_netns /run/netns/fake eth0")
        );
    }
}
