//! ed25519 key pairs made with `ssh-keygen`, the tool every user already trusts.

use std::path::Path;
use std::process::Command;

#[derive(Clone, Debug)]
pub struct KeyPair {
    /// The private key, OpenSSH format.
    pub private: String,
    /// The public key line, trimmed.
    pub public: String,
}

#[derive(Debug, thiserror::Error)]
#[error("`ssh-keygen` failed for `{}`: {message}\nhint: apt-get install openssh-client", path.display())]
pub struct KeygenError {
    pub path: std::path::PathBuf,
    pub message: String,
}

/// Writes a new key pair at `path` and `path.pub` (private key mode 0600).
pub fn generate(path: &Path, comment: &str) -> Result<KeyPair, KeygenError> {
    let fail = |message: String| KeygenError {
        path: path.to_path_buf(),
        message,
    };
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    read(path).map_err(|e| fail(e.to_string()))
}

/// Reads an existing pair.
pub fn read(path: &Path) -> std::io::Result<KeyPair> {
    Ok(KeyPair {
        private: fs_err::read_to_string(path)?,
        public: fs_err::read_to_string(path.with_extension("pub"))?
            .trim()
            .to_string(),
    })
}

/// The pair at `path`, made on first use.
pub fn get_or_generate(path: &Path, comment: &str) -> Result<KeyPair, KeygenError> {
    match read(path) {
        Ok(pair) => Ok(pair),
        Err(_) => generate(path, comment),
    }
}
