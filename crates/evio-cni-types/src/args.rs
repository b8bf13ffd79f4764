//! `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.

use crate::error::{CniError, ErrorCode};

/// Parsed `CNI_ARGS`, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pairs: Vec<(String, String)>,
}

impl CniArgs {
    /// Parses `s`. An empty string gives no pairs; a pair without `=` or with an empty key is an error
    /// (code 4, the variable is invalid).
    pub fn parse(s: &str) -> Result<CniArgs, CniError> {
        let mut pairs = Vec::new();
        for part in s.split(';') {
            if part.is_empty() {
                continue;
            }
            let Some((k, v)) = part.split_once('=') else {
                return Err(CniError::with_details(
                    ErrorCode::InvalidEnv,
                    "invalid CNI_ARGS",
                    format!("pair {part:?} has no '='"),
                ));
            };
            if k.is_empty() {
                return Err(CniError::with_details(
                    ErrorCode::InvalidEnv,
                    "invalid CNI_ARGS",
                    format!("pair {part:?} has an empty key"),
                ));
            }
            pairs.push((k.to_string(), v.to_string()));
        }
        Ok(CniArgs { pairs })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// True when the runtime asked plugins to ignore keys they do not know (`IgnoreUnknown=1|true`).
    pub fn ignore_unknown(&self) -> bool {
        matches!(
            self.get("IgnoreUnknown")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("1" | "true")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs() {
        let a =
            CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=default;X=a=b")
                .unwrap();
        assert_eq!(a.get("K8S_POD_NAME"), Some("web-0"));
        assert_eq!(a.get("X"), Some("a=b"));
        assert!(a.ignore_unknown());
        assert_eq!(CniArgs::parse("").unwrap().pairs.len(), 0);
        assert_eq!(CniArgs::parse(";;A=;").unwrap().get("A"), Some(""));
        assert!(!CniArgs::parse("A=1").unwrap().ignore_unknown());
    }

    #[test]
    fn rejects_bad_pairs() {
        assert_eq!(CniArgs::parse("novalue").unwrap_err().code, 4);
        assert_eq!(CniArgs::parse("A=1;=2").unwrap_err().code, 4);
    }
}
