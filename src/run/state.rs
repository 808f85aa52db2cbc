//! The state directory (`.farm/` beside farm.toml): farm's own key pair, each instance's
//! files, the pinned known_hosts and the generated ssh_config. Never inside the store:
//! instances are mutable, store entries are not.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::model::ssh_config::{SshHost, known_hosts_line, render};
use crate::run::instance::InstancePaths;
use crate::sys::keys::{KeyPair, KeygenError, get_or_generate};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("Cannot use the state directory `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Keygen(#[from] KeygenError),
}

pub struct StateDir {
    root: PathBuf,
    /// Held while farm changes instances: two `farm up`s on one project take turns.
    _lock: File,
}

impl StateDir {
    /// Opens (creating, mode 0700) the state directory and takes its lock.
    pub fn open(root: &Path) -> Result<StateDir, StateError> {
        let io = |source| StateError::Io {
            path: root.to_path_buf(),
            source,
        };
        fs_err::create_dir_all(root.join("vms")).map_err(io)?;
        fs_err::set_permissions(root, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        let root = fs_err::canonicalize(root).map_err(io)?;
        let lock = fs_err::File::create(root.join("lock"))
            .map_err(io)?
            .into_parts()
            .0;
        lock.lock().map_err(io)?;
        Ok(StateDir { root, _lock: lock })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// farm's key pair, authorised in every instance; made once, private key 0600.
    pub fn farm_key(&self) -> Result<KeyPair, StateError> {
        Ok(get_or_generate(&self.identity_file(), "farm")?)
    }

    pub fn identity_file(&self) -> PathBuf {
        self.root.join("id_ed25519")
    }

    pub fn instance(&self, name: &str) -> InstancePaths {
        InstancePaths::new(&self.root, name)
    }

    /// The instance's host key, made when the instance is made and kept until it is removed.
    pub fn host_key(&self, name: &str) -> Result<KeyPair, StateError> {
        let dir = self.instance(name).dir;
        fs_err::create_dir_all(&dir).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(get_or_generate(&dir.join("host_ed25519"), name)?)
    }

    pub fn ssh_config(&self) -> PathBuf {
        self.root.join("ssh_config")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.root.join("known_hosts")
    }

    /// Writes ssh_config and known_hosts for `hosts` (with the public key farm pins for
    /// each VM; remote hosts have none).
    pub fn write_ssh_files(&self, hosts: &[(SshHost, Option<String>)]) -> Result<(), StateError> {
        let config: Vec<SshHost> = hosts.iter().map(|(h, _)| h.clone()).collect();
        let known: String = hosts
            .iter()
            .filter_map(|(h, key)| key.as_ref().map(|key| known_hosts_line(&h.alias, key)))
            .collect();
        for (path, text) in [
            (self.ssh_config(), render(&config)),
            (self.known_hosts(), known),
        ] {
            let tmp = path.with_extension("tmp");
            fs_err::write(&tmp, text)
                .and_then(|()| fs_err::rename(&tmp, &path))
                .map_err(|source| StateError::Io { path, source })?;
        }
        Ok(())
    }
}
