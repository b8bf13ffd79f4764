//! CNI versions: the ones evio speaks, the `VERSION` answer, and negotiation with a delegate plugin.

use crate::error::{CniError, ErrorCode};

/// Versions evio's plugin speaks, oldest first. 0.1.0/0.2.0 results (`ip4`/`ip6`) are not supported.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version we speak.
pub const LATEST: &str = "1.1.0";

/// A parsed semantic version `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let mut it = s.split('.');
        let a = it.next()?.parse().ok()?;
        let b = it.next()?.parse().ok()?;
        let c = it.next().unwrap_or("0").parse().ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(Version(a, b, c))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Checks that `v` is a version we speak; code 1 otherwise.
pub fn check_supported(v: &str) -> Result<(), CniError> {
    if SUPPORTED.contains(&v) {
        Ok(())
    } else {
        Err(CniError::with_details(
            ErrorCode::IncompatibleVersion,
            "incompatible CNI versions",
            format!("config is \"{v}\", plugin supports {SUPPORTED:?}"),
        ))
    }
}

/// The JSON printed for the `VERSION` verb.
pub fn version_info(cni_version: &str) -> String {
    serde_json::json!({ "cniVersion": cni_version, "supportedVersions": SUPPORTED }).to_string()
}

/// Parses a delegate's `VERSION` answer into its supported versions.
pub fn parse_version_info(out: &[u8]) -> Result<Vec<String>, CniError> {
    let v: serde_json::Value = serde_json::from_slice(out).map_err(|e| {
        CniError::with_details(
            ErrorCode::Decode,
            "cannot decode a plugin's VERSION answer",
            e.to_string(),
        )
    })?;
    let list = v
        .get("supportedVersions")
        .and_then(|s| s.as_array())
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::Decode,
                "a plugin's VERSION answer has no supportedVersions",
            )
        })?;
    Ok(list
        .iter()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect())
}

/// The version to talk to a delegate with: `wanted` if it speaks it, else the newest version both sides
/// speak that is not newer than `wanted`. Error code 1 when there is none.
pub fn negotiate(wanted: &str, theirs: &[String]) -> Result<String, CniError> {
    if theirs.iter().any(|t| t == wanted) {
        return Ok(wanted.to_string());
    }
    let want = Version::parse(wanted).ok_or_else(|| {
        CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("bad version {wanted:?}"),
        )
    })?;
    let mut best: Option<(Version, &str)> = None;
    for ours in SUPPORTED {
        let Some(v) = Version::parse(ours) else {
            continue;
        };
        if v > want || !theirs.iter().any(|t| t == ours) {
            continue;
        }
        if best.is_none_or(|(b, _)| v > b) {
            best = Some((v, ours));
        }
    }
    best.map(|(_, s)| s.to_string()).ok_or_else(|| {
        CniError::with_details(
            ErrorCode::IncompatibleVersion,
            "no CNI version in common with the delegate plugin",
            format!("wanted {wanted}, delegate supports {theirs:?}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn negotiates_down_to_host_local() {
        let hl = s(&["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]);
        assert_eq!(negotiate("1.1.0", &hl).unwrap(), "1.0.0");
        assert_eq!(negotiate("0.4.0", &hl).unwrap(), "0.4.0");
        assert_eq!(negotiate("0.3.1", &hl).unwrap(), "0.3.1");
        assert_eq!(negotiate("1.1.0", &s(&["0.3.1"])).unwrap(), "0.3.1");
        assert_eq!(negotiate("0.3.1", &s(&["1.0.0"])).unwrap_err().code, 1);
        assert_eq!(negotiate("0.3.0", &s(&["0.2.0"])).unwrap_err().code, 1);
    }

    #[test]
    fn version_answer_roundtrip() {
        let out = version_info("1.1.0");
        assert_eq!(parse_version_info(out.as_bytes()).unwrap(), s(SUPPORTED));
        assert_eq!(parse_version_info(b"nope").unwrap_err().code, 6);
    }

    #[test]
    fn supported_check() {
        for v in SUPPORTED {
            check_supported(v).unwrap();
        }
        assert_eq!(check_supported("0.2.0").unwrap_err().code, 1);
        assert_eq!(check_supported("9.9.9").unwrap_err().code, 1);
        assert!(Version::parse("1.0.0") < Version::parse("1.1.0"));
        assert!(Version::parse("x").is_none());
    }
}
