//! Sites: where VMs run. This machine, a remote host, or the inside of a hypervisor VM,
//! each a `Host` reached through the generated ssh_config (one ControlMaster per site, kept
//! for the whole command and dropped when its VM restarts).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::model::config::topology::{LOCAL_HOST, Placement, Topology};
use crate::run::host::remote::RemoteHost;
use crate::run::host::{Host, LocalHost};

/// How long connecting to a site may take (a hypervisor VM is already up: generous).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error(
        "Cannot reach host `{host}` ({address}) over ssh: {reason}\nhint: check that `ssh -F {} {host} true` works; farm logs in with the `address`, `identity_file` and `known_hosts` of `[hosts.{host}]`",
        ssh_config.display()
    )]
    HostUnreachable {
        host: String,
        address: String,
        reason: String,
        ssh_config: PathBuf,
    },
    #[error(
        "Cannot log in to hypervisor VM `{vm}` over ssh: {reason}\nhint: `farm logs {vm}` shows its console; `farm up {vm}` restarts it if it is down"
    )]
    VmUnreachable { vm: String, reason: String },
}

/// One site's connection, made once: threads asking for it at the same time wait for
/// the first to connect instead of logging in twice.
type Slot = Arc<Mutex<Option<Arc<dyn Host>>>>;

/// The connections of one farm command, by site.
pub struct Sites<'a> {
    topology: &'a Topology,
    ssh_config: PathBuf,
    open: Mutex<BTreeMap<Placement, Slot>>,
}

impl<'a> Sites<'a> {
    pub fn new(topology: &'a Topology, ssh_config: &Path) -> Self {
        Self {
            topology,
            ssh_config: ssh_config.to_path_buf(),
            open: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn ssh_config(&self) -> &Path {
        &self.ssh_config
    }

    /// The site's host, connecting on first use.
    pub fn connect(&self, placement: &Placement) -> Result<Arc<dyn Host>, SiteError> {
        let slot = self.lock().entry(placement.clone()).or_default().clone();
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(host) = slot.as_ref() {
            return Ok(host.clone());
        }
        let host: Arc<dyn Host> = match placement {
            Placement::Host(name) => match self.topology.remote_host(placement) {
                None => Arc::new(LocalHost { name: name.clone() }),
                Some(remote) => Arc::new(
                    RemoteHost::connect(name, &self.ssh_config, name, CONNECT_TIMEOUT).map_err(
                        |e| SiteError::HostUnreachable {
                            host: name.clone(),
                            address: remote.address.to_string(),
                            reason: crate::model::text::error_chain(&e),
                            ssh_config: self.ssh_config.clone(),
                        },
                    )?,
                ),
            },
            Placement::Vm(vm) => Arc::new(
                RemoteHost::connect(vm, &self.ssh_config, vm, CONNECT_TIMEOUT).map_err(|e| {
                    SiteError::VmUnreachable {
                        vm: vm.clone(),
                        reason: crate::model::text::error_chain(&e),
                    }
                })?,
            ),
        };
        *slot = Some(host.clone());
        Ok(host)
    }

    /// Drops the site's connection: its hypervisor VM restarted, so the master to it is
    /// stale (the next `connect` logs in again).
    pub fn forget(&self, placement: &Placement) {
        self.lock().remove(placement);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Placement, Slot>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// This machine, as a host.
pub fn local_host() -> LocalHost {
    LocalHost {
        name: LOCAL_HOST.to_string(),
    }
}
