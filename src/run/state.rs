//! The state directory (`.farm/` beside farm.toml): farm's own key pair, each instance's
//! files (for VMs on this machine) or a copy of its record and its host key (for VMs on
//! other sites), the pinned known_hosts and the generated ssh_config. Never inside the
//! store: instances are mutable, store entries are not.
//!
//! Two views: [`StatePaths`] only reads (`status`, `logs`, `ssh`, `--dry-run` never write and
//! never wait), [`StateDir`] is opened for changes, creating the directory and taking its
//! lock so two `farm up`s on one project take turns.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::model::lab::instance::{InstancePaths, InstanceRecord};
use crate::model::lab::ssh_config::{Sharing, SshHost, render, render_known_hosts};
use crate::sys::keys::{KeyPair, KeygenError, get_or_generate};

/// How long a user's shared connection to a VM outlives its last session: long enough for a
/// sitting of commands, scp and Ansible runs; a master whose VM stops goes at once.
const SHARED_FOR_SECS: u64 = 300;

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

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Names of the directories in `dir`, sorted; none when it does not exist.
pub fn subdirectories(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs_err::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The state directory's paths. Reading through it changes nothing.
#[derive(Clone, Debug)]
pub struct StatePaths {
    root: PathBuf,
}

impl StatePaths {
    /// `root` made absolute without requiring it to exist (it names the project in the
    /// tags of farm's processes, which must be the same before and after it is created).
    pub fn new(root: &Path) -> StatePaths {
        let root = fs_err::canonicalize(root).unwrap_or_else(|_| {
            let parent = root.parent().filter(|p| !p.as_os_str().is_empty());
            let parent = parent
                .and_then(|p| fs_err::canonicalize(p).ok())
                .or_else(|| std::path::absolute(parent.unwrap_or(Path::new("."))).ok())
                .unwrap_or_default();
            parent.join(root.file_name().unwrap_or(root.as_os_str()))
        });
        StatePaths { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }

    pub fn identity_file(&self) -> PathBuf {
        self.root.join("id_ed25519")
    }

    /// The ssh_config users, Ansible, `farm ssh` and `farm logs` use: connections shared
    /// through ControlMasters in [`StatePaths::control_dir`] (see `model::ssh_config`).
    pub fn ssh_config(&self) -> PathBuf {
        self.root.join("ssh_config")
    }

    /// The same hosts unshared, for farm's own connections: each through a ControlMaster farm
    /// holds as its child, so that none outlives it. A state directory an earlier farm wrote
    /// has only `ssh_config`, unshared then: that one, until the next `up` writes both.
    pub fn own_ssh_config(&self) -> PathBuf {
        let own = self.unshared_ssh_config();
        let users = self.ssh_config();
        if !own.exists() && users.exists() {
            return users;
        }
        own
    }

    fn unshared_ssh_config(&self) -> PathBuf {
        self.root.join("ssh_config.farm")
    }

    /// The users' ControlMaster sockets (a short name: socket paths are short).
    pub fn control_dir(&self) -> PathBuf {
        self.root.join("mux")
    }

    /// Ends the users' shared ssh connection to `vm` (see `sys::ssh::stop_master`): called
    /// for every VM farm stops, replaces or restores, so the next `ssh` logs into the VM
    /// that runs now.
    pub fn stop_shared_connection(&self, vm: &str) {
        crate::sys::ssh::stop_master(&self.control_dir().join(vm));
    }

    /// The records of running `farm capture`s.
    pub fn captures_dir(&self) -> PathBuf {
        self.root.join("captures")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.root.join("known_hosts")
    }

    /// The lab's static Ansible inventory (`ansible -i .farm/inventory.yml`).
    pub fn inventory(&self) -> PathBuf {
        self.root.join("inventory.yml")
    }

    /// Writes the lab's inventory, whole or not at all (an `ansible` reading it meanwhile
    /// never sees half a file).
    pub fn write_inventory(&self, yaml: &str) -> Result<(), StateError> {
        write_atomic(&self.inventory(), yaml.as_bytes())
    }

    /// The VM's local directory: its whole instance when it runs here, its record copy and
    /// host key when it runs elsewhere.
    pub fn instance(&self, name: &str) -> InstancePaths {
        InstancePaths::new(&self.root, name)
    }

    /// farm's public key, when a previous `up` made it.
    pub fn farm_public_key(&self) -> Option<String> {
        fs_err::read_to_string(self.identity_file().with_extension("pub"))
            .ok()
            .map(|k| k.trim().to_string())
    }

    /// The VM's pinned public host key, when it has one.
    pub fn host_public_key(&self, name: &str) -> Option<String> {
        fs_err::read_to_string(self.instance(name).dir.join("host_ed25519.pub"))
            .ok()
            .map(|k| k.trim().to_string())
    }

    /// Names of the VMs with a local directory.
    pub fn instance_names(&self) -> Vec<String> {
        subdirectories(&self.root.join("vms"))
    }

    /// The records kept here, by VM (usable ones only).
    pub fn records(&self) -> BTreeMap<String, InstanceRecord> {
        self.instance_names()
            .into_iter()
            .filter_map(|name| {
                let bytes = fs_err::read(self.instance(&name).record()).ok()?;
                Some((name, InstanceRecord::parse(&bytes).ok()?))
            })
            .collect()
    }
}

/// The state directory opened for changes: created (mode 0700) and locked.
pub struct StateDir {
    paths: StatePaths,
    /// Held while farm changes instances: two `farm up`s on one project take turns.
    _lock: File,
    /// ssh_config and known_hosts are rewritten from several threads.
    ssh_files: Mutex<()>,
}

impl std::ops::Deref for StateDir {
    type Target = StatePaths;
    fn deref(&self) -> &StatePaths {
        &self.paths
    }
}

impl StateDir {
    /// Opens (creating, mode 0700) the state directory and takes its lock.
    pub fn open(root: &Path) -> Result<StateDir, StateError> {
        fs_err::create_dir_all(root.join("vms")).map_err(io_error(root))?;
        fs_err::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error(root))?;
        let paths = StatePaths::new(root);
        let lock = fs_err::File::create(paths.root.join("lock"))
            .map_err(io_error(root))?
            .into_parts()
            .0;
        lock.lock().map_err(io_error(root))?;
        Ok(StateDir {
            paths,
            _lock: lock,
            ssh_files: Mutex::new(()),
        })
    }

    /// farm's key pair, authorised in every instance; made once, private key 0600.
    pub fn farm_key(&self) -> Result<KeyPair, StateError> {
        Ok(get_or_generate(&self.identity_file(), "farm")?)
    }

    /// The instance's host key, made when the instance is made and kept until it is removed.
    pub fn host_key(&self, name: &str) -> Result<KeyPair, StateError> {
        let dir = self.instance(name).dir;
        fs_err::create_dir_all(&dir).map_err(io_error(&dir))?;
        Ok(get_or_generate(&dir.join("host_ed25519"), name)?)
    }

    /// Keeps a copy of a record of an instance on another site (status and ssh_config read it).
    pub fn save_record(&self, record: &InstanceRecord) -> Result<(), StateError> {
        let path = self.instance(&record.spec.name).record();
        write_atomic(&path, &record.to_json())
    }

    /// Forgets a VM: its local directory (overlay, logs, host key) goes.
    pub fn remove_instance(&self, name: &str) -> Result<(), StateError> {
        let dir = self.instance(name).dir;
        match fs_err::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// Writes ssh_config and known_hosts for `hosts` (with the public key farm pins for
    /// each VM; remote hosts have none).
    pub fn write_ssh_files(&self, hosts: &[(SshHost, Option<String>)]) -> Result<(), StateError> {
        let _turn = self.ssh_files.lock().unwrap_or_else(|e| e.into_inner());
        let config: Vec<SshHost> = hosts.iter().map(|(h, _)| h.clone()).collect();
        let sharing = Sharing {
            dir: self.control_dir(),
            persist_secs: SHARED_FOR_SECS,
        };
        let control_dir = sharing.dir.as_path();
        fs_err::create_dir_all(control_dir)
            .and_then(|()| {
                fs_err::set_permissions(control_dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(io_error(control_dir))?;
        write_atomic(
            &self.ssh_config(),
            render(&config, Some(&sharing)).as_bytes(),
        )?;
        write_atomic(
            &self.unshared_ssh_config(),
            render(&config, None).as_bytes(),
        )?;
        write_atomic(&self.known_hosts(), render_known_hosts(hosts).as_bytes())
    }
}

/// Replaced whole (`sys::files`): a reader (a `farm status` or an `ssh -F` running
/// meanwhile) never sees half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    crate::sys::files::replace_file(path, bytes, 0o600).map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_absolute_before_the_directory_exists_and_the_same_after() {
        let dir = tempfile::tempdir().unwrap();
        let before = StatePaths::new(&dir.path().join(".farm"));
        assert!(before.root().is_absolute());
        assert!(!before.exists(), "reading creates nothing");
        let opened = StateDir::open(&dir.path().join(".farm")).unwrap();
        assert_eq!(opened.root(), before.root());
        assert!(opened.records().is_empty());
    }
}
