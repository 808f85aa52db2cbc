//! The topology: every VM farm will run, where it runs, and how it is reached.
//!
//! Built from the configuration by `validate`, which expands the seed's permutations
//! (`deploy = { targets, platforms }`) into VMs named `<platform>_<target>` and merges in
//! the matching `[vms.NAME]` tables.

use crate::model::config::backend::Backend;
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::model::config::{Forward, Origin, Resources};
use crate::model::values::{IpCidr, MacAddr, SshAddress};

/// The name of the implicit host when farm.toml declares none: this machine.
pub const LOCAL_HOST: &str = "local";

/// Where farm keeps its store (`cache/`) and VM state (`state/`) on a host it reaches over
/// ssh, unless a remote host's `root` says otherwise.
pub const REMOTE_ROOT: &str = "/var/lib/farm";

/// The store's directory: beside farm.toml unless `--store` says otherwise, and under farm's
/// root on a host or hypervisor VM.
pub const STORE_DIR_NAME: &str = "cache";

/// Where a VM runs: on a host (level 1) or inside another VM that is a hypervisor.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Placement {
    Host(String),
    Vm(String),
}

impl Placement {
    pub fn name(&self) -> &str {
        match self {
            Placement::Host(n) | Placement::Vm(n) => n,
        }
    }
}

#[derive(Clone, Debug)]
pub struct VmNode {
    pub name: String,
    pub platform: String,
    pub target: String,
    pub placement: Placement,
    /// 1 for VMs on a host, 2 for VMs inside those, …
    pub level: u32,
    pub hostname: String,
    pub ssh_port: Option<u16>,
    pub forwards: Vec<Forward>,
    pub user_network: bool,
    pub nics: Vec<NicNode>,
    /// NICs on networks of its site's libvirtd.
    pub libvirt_nics: Vec<NicNode>,
    pub attach: Vec<(String, IpCidr)>,
    pub resources: Resources,
    /// Whether this VM runs VMs of its own.
    pub is_hypervisor: bool,
    /// How the VMs it deploys run on it (only meaningful for a hypervisor VM).
    pub guest_backend: Backend,
    /// The playbook `farm up` applies once after the VM's first boot.
    pub playbook: Option<std::path::PathBuf>,
    /// Where the VM was generated (a `deploy` entry) or declared (`[vms.NAME]`).
    pub origin: Origin,
}

#[derive(Clone, Debug)]
pub struct NicNode {
    pub network: String,
    pub ip: Option<IpCidr>,
    pub gateway: Option<std::net::IpAddr>,
    pub mac: Option<MacAddr>,
}

#[derive(Clone, Debug)]
pub struct HostNode {
    pub name: String,
    /// How to reach the host when it is not this machine.
    pub remote: Option<RemoteHostSpec>,
    pub attach: Vec<(String, IpCidr)>,
    /// How the VMs on it run.
    pub backend: Backend,
}

/// A physical hypervisor farm reaches over ssh with the user's own credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteHostSpec {
    pub address: SshAddress,
    /// As written in farm.toml: absolute, `~/…` (ssh expands it) or relative to farm.toml.
    pub identity_file: Option<String>,
    pub known_hosts: Option<String>,
    /// farm's directory on the host.
    pub root: PathBuf,
}

impl Topology {
    /// The remote host a placement is on, when it is a host and not this machine.
    pub fn remote_host(&self, placement: &Placement) -> Option<&RemoteHostSpec> {
        match placement {
            Placement::Host(name) => self.hosts.get(name).and_then(|h| h.remote.as_ref()),
            Placement::Vm(_) => None,
        }
    }

    /// How VMs placed on `placement` run: the host's or hypervisor VM's `backend`.
    pub fn backend_on(&self, placement: &Placement) -> Backend {
        match placement {
            Placement::Host(name) => self.hosts.get(name).map(|h| h.backend.clone()),
            Placement::Vm(name) => self.vms.get(name).map(|v| v.guest_backend.clone()),
        }
        .unwrap_or_default()
    }

    /// Whether VMs on `placement` are reached over ssh through it (a hypervisor VM or a
    /// remote host) rather than on this machine's own ports.
    pub fn reached_through(&self, placement: &Placement) -> bool {
        matches!(placement, Placement::Vm(_)) || self.remote_host(placement).is_some()
    }
}

#[derive(Clone, Debug, Default)]
pub struct Topology {
    pub hosts: BTreeMap<String, HostNode>,
    pub vms: BTreeMap<String, VmNode>,
}

impl Topology {
    /// VMs placed directly on `placement`, by name.
    pub fn children<'a>(&'a self, placement: &'a Placement) -> impl Iterator<Item = &'a VmNode> {
        self.vms
            .values()
            .filter(move |vm| &vm.placement == placement)
    }

    /// The (platform, target) pairs the topology runs, each once, sorted.
    pub fn platform_targets(&self) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = self
            .vms
            .values()
            .map(|vm| (vm.platform.clone(), vm.target.clone()))
            .collect();
        pairs.sort();
        pairs.dedup();
        pairs
    }

    /// The hypervisors from the host down to the VM's own parent (the jump chain).
    pub fn chain(&self, vm: &str) -> Vec<Placement> {
        let mut chain = Vec::new();
        let mut current = self.vms.get(vm).map(|v| v.placement.clone());
        while let Some(placement) = current {
            current = match &placement {
                Placement::Vm(parent) => self.vms.get(parent).map(|v| v.placement.clone()),
                Placement::Host(_) => None,
            };
            chain.push(placement);
        }
        chain.reverse();
        chain
    }
}
