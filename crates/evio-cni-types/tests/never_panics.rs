//! Parsing arbitrary bytes never panics: config, conflist, CNI_ARGS, results, VERSION answers, env.

use evio_cni_types::{args::CniArgs, config, env::Env, result::CniResult, version};
use proptest::prelude::*;

fn check_all(bytes: &[u8]) {
    let _ = config::NetConf::parse(bytes);
    let _ = config::ConfList::parse(bytes);
    let _ = CniResult::from_slice(bytes);
    let _ = version::parse_version_info(bytes);
    let s = String::from_utf8_lossy(bytes);
    let _ = CniArgs::parse(&s);
    let _ = Env::from_lookup(|k| {
        if k == "CNI_COMMAND" {
            Some("ADD".into())
        } else {
            Some(s.to_string())
        }
    });
    if let Ok(c) = config::NetConf::parse(bytes) {
        let _ = c.for_delegate("1.0.0", c.prev_result.clone());
        if let Some(p) = &c.prev_result
            && let Ok(r) = CniResult::from_value(p)
        {
            for v in version::SUPPORTED {
                let _ = r.to_value(v);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_all(&bytes);
    }

    #[test]
    fn json_shaped(
        ver in prop::sample::select(vec!["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "0.2.0", "x"]),
        key in prop::sample::select(vec!["bridge", "mtu", "ipam", "bridgeType", "isGateway", "prevResult",
            "clusterCIDRs", "podCIDR", "cni.dev/valid-attachments", "ovsdbSocket", "logLevel"]),
        val in prop_oneof![
            any::<i64>().prop_map(|i| i.to_string()),
            "[a-zA-Z0-9/.:_-]{0,20}".prop_map(|s| format!("{s:?}")),
            Just("{\"type\":\"host-local\"}".to_string()),
            Just("[{\"containerID\":\"a\",\"ifname\":\"e\"}]".to_string()),
            Just("{\"ips\":[{\"address\":\"10.0.0.2/24\",\"interface\":0}],\"interfaces\":[{\"name\":\"e\"}]}".to_string()),
            Just("null".to_string()), Just("true".to_string()),
        ],
    ) {
        let doc = format!(r#"{{"cniVersion":"{ver}","name":"n","{key}":{val}}}"#);
        check_all(doc.as_bytes());
    }
}
