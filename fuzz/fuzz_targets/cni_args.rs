#![no_main]
//! `CNI_ARGS` and the CNI environment must never panic.
use evio_cni_types::{args::CniArgs, env::Env};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(a) = CniArgs::parse(&s) {
        let _ = a.ignore_unknown();
    }
    let mut parts = s.splitn(6, '\n');
    let vals: Vec<String> = (0..6)
        .map(|_| parts.next().unwrap_or("").to_string())
        .collect();
    let _ = Env::from_lookup(|k| {
        let i = [
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_ARGS",
            "CNI_PATH",
        ]
        .iter()
        .position(|x| *x == k)?;
        Some(vals[i].clone())
    });
});
