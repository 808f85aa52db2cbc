//! The files of the keys that sign a binary cache's records: `farm store keygen NAME`
//! writes NAME.secret (readable by its owner only) and NAME.public, and `farm store push
//! --key` reads the secret one back. The keys themselves are `model::signing`'s.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fs_err::os::unix::fs::OpenOptionsExt;

use crate::model::signing::{KeyParseError, SecretKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "`{name}` cannot name a key\nhint: use letters, digits, `.`, `_` and `-`, such as `ci-1`"
    )]
    BadName { name: String },
    #[error(
        "`{}` already exists; farm does not overwrite keys\nhint: choose another name, or move \
         the old key away first",
        path.display()
    )]
    Exists { path: PathBuf },
    #[error("Cannot read the signing key `{}`", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{}` is not a secret key: {reason}\nhint: give the `.secret` file `farm store keygen \
         NAME` wrote",
        path.display()
    )]
    NotASecretKey {
        path: PathBuf,
        reason: KeyParseError,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl KeyError {
    /// What the command line said is wrong (exit code 2), not the machine.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            KeyError::BadName { .. } | KeyError::NotASecretKey { .. }
        )
    }
}

/// A key pair `generate` wrote.
#[derive(Debug)]
pub struct KeyPairFiles {
    pub secret: PathBuf,
    pub public: PathBuf,
    /// The public key as farm.toml's `trusted-public-keys` takes it (`NAME:BASE64`).
    pub public_key: String,
}

/// Makes a new ed25519 key pair `name` and writes it into `dir` as `name.secret` (mode
/// 0600) and `name.public`; refused when either file exists.
pub fn generate(name: &str, dir: &Path) -> Result<KeyPairFiles, KeyError> {
    let mut seed = [0u8; 32];
    fs_err::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    let secret = SecretKey::from_seed(name, seed).ok_or_else(|| KeyError::BadName {
        name: name.to_string(),
    })?;
    let secret_path = dir.join(format!("{name}.secret"));
    let public_path = dir.join(format!("{name}.public"));
    for path in [&secret_path, &public_path] {
        if path.exists() {
            return Err(KeyError::Exists { path: path.clone() });
        }
    }
    fs_err::create_dir_all(dir)?;
    let mut file = fs_err::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret_path)?;
    writeln!(file, "{}", secret.to_text())?;
    drop(file);
    let public_key = secret.public().to_string();
    fs_err::write(&public_path, format!("{public_key}\n"))?;
    Ok(KeyPairFiles {
        secret: secret_path,
        public: public_path,
        public_key,
    })
}

/// The secret key in `path`, as `generate` wrote it.
pub fn read_secret(path: &Path) -> Result<SecretKey, KeyError> {
    let text = fs_err::read_to_string(path).map_err(|source| KeyError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    text.parse().map_err(|reason| KeyError::NotASecretKey {
        path: path.to_path_buf(),
        reason,
    })
}
