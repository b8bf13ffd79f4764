//! The CNI error object (`{"cniVersion","code","msg","details"}`) and the spec's well-known codes.

use serde::Serialize;

/// Error codes of the CNI spec (1.1.0, "Error" section). Codes 100+ are plugin specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// Incompatible CNI version.
    IncompatibleVersion = 1,
    /// Unsupported field in network configuration.
    UnsupportedField = 2,
    /// Container unknown or does not exist.
    UnknownContainer = 3,
    /// Invalid necessary environment variables.
    InvalidEnv = 4,
    /// I/O failure.
    Io = 5,
    /// Failed to decode content.
    Decode = 6,
    /// Invalid network config.
    InvalidConfig = 7,
    /// Try again later.
    TryAgainLater = 11,
    /// STATUS: the plugin is not available.
    NotAvailable = 50,
    /// STATUS: limited connectivity.
    LimitedConnectivity = 51,
    /// evio-specific: the interface named by `CNI_IFNAME` already exists in the container.
    InterfaceExists = 100,
    /// evio-specific: a delegated plugin (IPAM) failed; its message is kept.
    Delegate = 101,
    /// evio-specific: CHECK found the attachment not as ADD left it.
    CheckFailed = 102,
}

impl ErrorCode {
    pub fn as_u32(self) -> u32 {
        self as u32
    }
}

/// A CNI error: what the plugin prints as its only stdout output when it fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> CniError {
        CniError {
            code: code.as_u32(),
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(
        code: ErrorCode,
        msg: impl Into<String>,
        details: impl Into<String>,
    ) -> CniError {
        CniError {
            code: code.as_u32(),
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// An error with a raw code (e.g. passed through from a delegate).
    pub fn raw(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON object printed on stdout, for `cni_version` (the config's version, or the newest we speak
    /// when the config could not be read).
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Out {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| {
            format!(
                "{{\"cniVersion\":\"1.1.0\",\"code\":{},\"msg\":\"error\"}}",
                self.code
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_spec_fields() {
        let e = CniError::with_details(ErrorCode::InvalidConfig, "bad mtu", "mtu 12 < 68");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad mtu");
        assert_eq!(v["details"], "mtu 12 < 68");
        let e = CniError::new(ErrorCode::TryAgainLater, "busy");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("0.4.0")).unwrap();
        assert_eq!(v["code"], 11);
        assert!(v.get("details").is_none());
    }
}
