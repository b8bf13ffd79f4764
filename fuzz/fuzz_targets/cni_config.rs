#![no_main]
//! Network config, conflist and result parsing must never panic, and a parsed prevResult must convert to
//! every supported version.
use evio_cni_types::{config, result::CniResult, version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = config::ConfList::parse(data);
    let _ = CniResult::from_slice(data);
    if let Ok(c) = config::NetConf::parse(data) {
        let _ = c.for_delegate("1.0.0", None);
        if let Some(p) = &c.prev_result
            && let Ok(r) = CniResult::from_value(p)
        {
            for v in version::SUPPORTED {
                let out = r.to_value(v).expect("supported version");
                CniResult::from_value(&out).expect("our own output reads back");
            }
        }
    }
});
