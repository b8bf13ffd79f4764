//! Parsing arbitrary bytes never panics: config, conflist, CNI_ARGS, results, VERSION answers, env; and a
//! parsed prevResult converts to every supported version and reads back (the properties the `cni_config`
//! and `cni_args` fuzz targets check, here on stable with proptest, the committed fuzz seeds and mutations
//! of them; docs/fuzz.md).

use evio_cni_types::{args::CniArgs, config, env::Env, result::CniResult, version};
use proptest::prelude::*;
use proptest::test_runner::TestRng;

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
                let out = r.to_value(v).expect("supported version");
                CniResult::from_value(&out).expect("our own output reads back");
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

/// The committed seeds of the two CNI fuzz targets, and mutations of them (byte flips, insertions,
/// deletions, cuts), from a fixed seed.
#[test]
fn fuzz_seeds_and_mutations() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    let mut seeds = Vec::new();
    for target in ["cni_config", "cni_args"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(target))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        seeds.extend(files.iter().map(|p| std::fs::read(p).unwrap()));
    }
    assert!(seeds.len() >= 5, "seeds found: {}", seeds.len());
    let mut rng = TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha);
    for s in &seeds {
        check_all(s);
        for _ in 0..200 {
            let mut v = s.clone();
            for _ in 0..1 + rng.random_range(0..4) {
                let at = rng.random_range(0..=v.len());
                match rng.random_range(0..4) {
                    0 if at < v.len() => v[at] ^= 1 << rng.random_range(0..8),
                    1 => {
                        let tokens = b"{}[]\":,0aZ";
                        v.insert(at, tokens[rng.random_range(0..tokens.len())])
                    }
                    2 if at < v.len() => {
                        v.remove(at);
                    }
                    _ => v.truncate(at),
                }
            }
            check_all(&v);
        }
    }
}
