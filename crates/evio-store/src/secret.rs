//! Secrets kept in files (the etcd password, the TURN password): read with the trailing newline that
//! editors and `echo` add removed, and a warning when anyone but the owner may read the file.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Reads the secret in `path`; `what` names it in messages ("etcd password"). A file readable by group
/// or others still works (a Kubernetes Secret volume without `defaultMode` is 0644), with a warning.
pub fn read_secret_file(path: &Path, what: &str) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{mode:o}"),
            "the {what} file is readable by group or others: make it 0600 (chmod 600)"
        );
    }
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_the_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, " s3cret \r\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&p, "test").unwrap(), " s3cret ");
        assert!(read_secret_file(&dir.path().join("missing"), "test").is_err());
    }
}
