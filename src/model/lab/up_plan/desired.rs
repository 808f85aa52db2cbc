//! What the plan is made from besides observations: the topology, the layers its VMs run,
//! farm's key and where this machine keeps things; and where each site keeps farm's files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::model::build::qemu::DirectBoot;
use crate::model::config::Config;
use crate::model::config::network::{SiteNetwork, VdeBackend, site_networks};
use crate::model::config::topology::{Placement, REMOTE_ROOT, STORE_DIR_NAME, Topology, VmNode};
use crate::model::hash::{ContentHash, DrvHash};
use crate::model::values::{Accel, Arch};

/// The store entry a VM's platform is realised as, and what a site needs of the store for
/// it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    pub drv_hash: DrvHash,
    /// `<platform>_<target>`.
    pub name: String,
    /// The entry's directory name.
    pub entry: String,
    /// The blake3 of its disk, from its metadata; `None` before it is built (dry run).
    pub blake3: Option<ContentHash>,
    /// The size of the disk the layer gives a guest; `None` before it is built.
    pub virtual_size: Option<u64>,
    /// Direct-boot files, with paths relative to a store's `store/` directory (the
    /// nearest ancestor entry's `boot/`), or `None` to boot through firmware.
    pub boot: Option<DirectBoot>,
    /// The entries a site's store needs to boot it: its ancestors, then itself.
    pub closure: Vec<String>,
}

/// Everything the plan needs besides observations.
#[derive(Clone, Debug)]
pub struct Desired<'a> {
    pub config: &'a Config,
    pub topology: &'a Topology,
    /// The VMs to bring up: those asked for and every hypervisor above them.
    pub selected: BTreeSet<String>,
    /// Layers by `(platform, target)`.
    pub layers: BTreeMap<(String, String), LayerInfo>,
    /// `--accel`, overriding every target's.
    pub accel: Option<Accel>,
    /// farm's public key, authorised in every VM; `None` before the first `up` made it.
    pub farm_key: Option<String>,
    /// The local state directory, absolute: instances of this machine live there, and it
    /// names the project in every process tag.
    pub local_state: PathBuf,
    /// The local store's `store/` directory.
    pub local_store: PathBuf,
}

impl<'a> Desired<'a> {
    pub fn project_tag(&self) -> String {
        self.local_state.display().to_string()
    }

    /// Selected VMs placed directly on `placement`, by name.
    /// The layer `vm` boots; every selected VM has one.
    pub fn layer_of(&self, vm: &VmNode) -> &LayerInfo {
        self.layers
            .get(&(vm.platform.clone(), vm.target.clone()))
            .expect("every selected VM's layer is resolved")
    }

    pub fn vms_on(&self, placement: &Placement) -> Vec<&'a VmNode> {
        self.topology
            .vms
            .values()
            .filter(|vm| &vm.placement == placement && self.selected.contains(&vm.name))
            .collect()
    }

    /// The site inside `vm`, when it runs selected VMs of its own.
    pub fn site_inside(&self, vm: &str) -> Option<Placement> {
        let placement = Placement::Vm(vm.to_string());
        (!self.vms_on(&placement).is_empty()).then_some(placement)
    }

    /// The hosts with selected VMs, by name: where planning starts.
    pub fn top_sites(&self) -> Vec<Placement> {
        let hosts: BTreeSet<Placement> = self
            .topology
            .vms
            .values()
            .filter(|vm| self.selected.contains(&vm.name))
            .filter_map(|vm| match &vm.placement {
                p @ Placement::Host(_) => Some(p.clone()),
                Placement::Vm(_) => None,
            })
            .collect();
        hosts.into_iter().collect()
    }

    /// Where `placement` keeps farm's state and store.
    pub fn layout(&self, placement: &Placement) -> SiteLayout {
        SiteLayout::of(
            self.topology,
            placement,
            &self.local_state,
            &self.local_store,
        )
    }

    /// The networks `placement` runs for its selected VMs.
    pub fn networks(&self, placement: &Placement) -> Vec<SiteNetwork> {
        site_networks(self.config, self.topology, placement)
            .into_iter()
            .filter(|n| n.users.iter().any(|u| self.selected.contains(u)))
            .collect()
    }

    /// The programs a site must have: qemu for its VMs' architectures and qemu-img; b3sum
    /// where layers are pushed; the VDE tools its networks need (`wirefilter` for its VMs' wires).
    pub fn site_tools(&self, placement: &Placement) -> Vec<String> {
        let arches: BTreeSet<Arch> = self
            .vms_on(placement)
            .iter()
            .filter_map(|vm| self.config.targets.get(&vm.target))
            .map(|t| t.arch)
            .collect();
        let mut tools: Vec<String> = arches.iter().map(|a| qemu_binary(*a).to_string()).collect();
        tools.push("qemu-img".into());
        if self.layout(placement).remote {
            tools.push("b3sum".into());
        }
        let networks = self.networks(placement);
        if networks.iter().any(|n| n.backend == VdeBackend::Switch) {
            tools.push("vde_switch".into());
        }
        if networks.iter().any(|n| n.attach.is_some()) {
            tools.extend(["vde_plug".into(), "ip".into()]);
        }
        if !networks.is_empty() {
            // Every VDE NIC is plugged through its wire (`model::lab::wire`).
            tools.push("wirefilter".into());
        }
        tools
    }
}

pub fn qemu_binary(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "qemu-system-x86_64",
        Arch::Aarch64 => "qemu-system-aarch64",
    }
}

/// Where a site keeps farm's files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteLayout {
    /// Instances (`vms/`) and networks (`networks/`).
    pub state_dir: PathBuf,
    /// The site store's `store/` directory.
    pub store_entries: PathBuf,
    /// Reached over ssh, with its own store that layers are pushed into.
    pub remote: bool,
}

impl SiteLayout {
    /// Where `placement` keeps farm's files: this machine's state directory and store, or
    /// farm's directory on a remote host (its `root`) or in a hypervisor VM.
    pub fn of(
        topology: &Topology,
        placement: &Placement,
        local_state: &Path,
        local_store: &Path,
    ) -> SiteLayout {
        match placement {
            Placement::Host(_) => match topology.remote_host(placement) {
                None => SiteLayout {
                    state_dir: local_state.to_path_buf(),
                    store_entries: local_store.to_path_buf(),
                    remote: false,
                },
                Some(remote) => SiteLayout::remote(&remote.root),
            },
            Placement::Vm(_) => SiteLayout::remote(Path::new(REMOTE_ROOT)),
        }
    }

    fn remote(root: &Path) -> Self {
        Self {
            state_dir: root.join("state"),
            store_entries: root.join(STORE_DIR_NAME).join("store"),
            remote: true,
        }
    }
}
