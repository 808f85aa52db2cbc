//! `farm up`'s plan, computed purely: from the topology, the layers its VMs run, and what
//! each site was observed to run, the plan says per site, in order, what to check, which
//! store entries to push, which networks to start, and for every VM a fully resolved
//! instance spec (machine, accelerator, disks, NICs, ports, seed, argv) with an action and
//! the reasons for it ("ssh_port 2202 → 2203", "platform changed", "qemu not running").
//!
//! `run::up` observes, calls [`plan_up`], prints the plan (`--dry-run`) or applies it, and
//! plans a site inside a hypervisor VM again once that VM is up (what runs in it could not
//! be observed before).

mod decide;
mod ports;
mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::config::Config;
use super::hash::{ContentHash, DrvHash};
use super::instance::{InstancePaths, InstanceSpec, LayerRef, UserNet, VdeNicSpec, VmState};
use super::network::{SiteNetwork, VdeBackend, site_networks, vde_nics};
use super::observation::{ObservedInstance, SiteFacts, SiteObservation};
use super::qemu::{DirectBoot, MachineSpec, ProcessTag, choose_accel, mac_for};
use super::topology::{LOCAL_HOST, Placement, REMOTE_ROOT, Topology, VmNode};
use super::values::{Accel, Arch};

pub use decide::Reason;

/// Memory of a VM whose platform and table say nothing.
pub const DEFAULT_MEMORY_MIB: u64 = 1024;

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
    /// where layers are pushed; the VDE tools its networks need.
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
            store_entries: root.join("cache").join("store"),
            remote: true,
        }
    }
}

/// What a site's plan rests on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// What the site runs was observed.
    Observed,
    /// Its hypervisor VM is created or replaced first: nothing runs there yet.
    Fresh,
    /// Its hypervisor VM restarts first: its instances will all be stopped by then.
    AfterRestart,
    /// Its hypervisor VM runs, but farm could not log in to look.
    Unreachable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum VmAction {
    /// Running as wanted.
    Keep,
    /// No instance: make an overlay and a seed, start it.
    Create,
    /// Keep the overlay; stop qemu if it runs, apply what changed, start it again.
    Restart,
    /// Stop it, remove its overlay, create it anew.
    Replace,
}

impl VmAction {
    pub fn verb(self) -> &'static str {
        match self {
            VmAction::Keep => "keep",
            VmAction::Create => "create",
            VmAction::Restart => "restart",
            VmAction::Replace => "replace",
        }
    }
}

/// One VM's part of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmStep {
    pub name: String,
    pub level: u32,
    pub action: VmAction,
    pub reasons: Vec<Reason>,
    /// What it will run.
    pub spec: InstanceSpec,
    /// The spec it was last started with, when it has a usable record.
    pub previous: Option<InstanceSpec>,
    /// The pid of its qemu, to stop before a restart or replace.
    pub running: Option<u32>,
    /// It answered ssh after its last start (a kept VM that did not is waited for).
    pub ready: bool,
}

impl VmStep {
    /// The overlay must grow to the new `disk_size` before a restart.
    pub fn grows_to(&self) -> Option<u64> {
        let previous = self.previous.as_ref()?;
        match (previous.disk_size, self.spec.disk_size) {
            (old, Some(new)) if old != Some(new) => Some(new),
            _ => None,
        }
    }

    /// The overlay's backing file must point at the layer's new place before a restart
    /// (the same bytes, checked by their blake3, in a store that moved).
    pub fn rebase(&self) -> bool {
        self.previous
            .as_ref()
            .is_some_and(|p| p.layer.disk != self.spec.layer.disk)
    }

    /// How `farm status` shows it.
    pub fn state(&self) -> VmState {
        let changed = self.reasons.iter().any(Reason::is_change);
        match (self.action, self.running.is_some()) {
            (VmAction::Create, _) => VmState::Missing,
            (_, _) if changed => VmState::Changed,
            (VmAction::Keep, _) => VmState::Running,
            (_, true) => VmState::Unreachable,
            (_, false) => VmState::Stopped,
        }
    }
}

/// A network the site runs, and what to start of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkStep {
    pub network: SiteNetwork,
    /// Start its switch (it has none running).
    pub start_switch: bool,
    /// Start the site's tap on it (it attaches, and no tap runs).
    pub start_tap: bool,
}

/// One site's part of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SitePlan {
    pub placement: Placement,
    pub layout: SiteLayout,
    pub basis: Basis,
    /// What makes the plan impossible; nothing is applied while there is one.
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
    /// qemu binaries to check for `-netdev vde` before anything starts (checked when
    /// applying: asking qemu costs a process start).
    pub check_vde: Vec<String>,
    /// Store entries to push, parents first.
    pub push: Vec<String>,
    pub networks: Vec<NetworkStep>,
    pub vms: Vec<VmStep>,
}

impl SitePlan {
    /// Anything to do besides keeping what runs.
    pub fn changes(&self) -> bool {
        !self.push.is_empty()
            || self.networks.iter().any(|n| n.start_switch || n.start_tap)
            || self.vms.iter().any(|v| v.action != VmAction::Keep)
    }

    pub fn vm(&self, name: &str) -> Option<&VmStep> {
        self.vms.iter().find(|v| v.name == name)
    }
}

/// The whole plan: sites in the order they are brought up (a hypervisor VM's site after the
/// site it runs on).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpPlan {
    pub sites: Vec<SitePlan>,
}

impl UpPlan {
    pub fn changes(&self) -> bool {
        self.sites.iter().any(SitePlan::changes)
    }

    pub fn problems(&self) -> Vec<&str> {
        self.sites
            .iter()
            .flat_map(|s| s.problems.iter().map(String::as_str))
            .collect()
    }

    pub fn site(&self, placement: &Placement) -> Option<&SitePlan> {
        self.sites.iter().find(|s| &s.placement == placement)
    }

    pub fn vm(&self, name: &str) -> Option<&VmStep> {
        self.sites.iter().find_map(|s| s.vm(name))
    }
}

/// Plans every site with selected VMs, top-level hosts first, then the site inside each
/// hypervisor VM after the site it runs on. `observed` holds what could be observed; a
/// site inside a hypervisor VM that is created, replaced or restarted is planned from
/// what is known of it (see [`Basis`]) and must be planned again once its VM is up.
pub fn plan_up(desired: &Desired, observed: &BTreeMap<Placement, SiteObservation>) -> UpPlan {
    let mut plan = UpPlan::default();
    let mut queue: Vec<(Placement, Basis)> = desired
        .top_sites()
        .into_iter()
        .map(|p| (p, Basis::Observed))
        .collect();
    queue.reverse();
    while let Some((placement, basis)) = queue.pop() {
        let empty = SiteObservation::default();
        let observation = observed.get(&placement).unwrap_or(&empty);
        let site = plan_site(desired, &placement, observation, basis);
        let mut children = Vec::new();
        for vm in &site.vms {
            if let Some(inside) = desired.site_inside(&vm.name) {
                let reached = observed.get(&inside).is_some_and(|o| o.reached);
                let child_basis = match vm.action {
                    VmAction::Keep if reached => Basis::Observed,
                    VmAction::Keep => Basis::Unreachable,
                    VmAction::Restart => Basis::AfterRestart,
                    VmAction::Create | VmAction::Replace => Basis::Fresh,
                };
                children.push((inside, child_basis));
            }
        }
        plan.sites.push(site);
        queue.extend(children.into_iter().rev());
    }
    plan
}

/// Plans one site from what was observed there, seen through `basis`.
pub fn plan_site(
    desired: &Desired,
    placement: &Placement,
    observation: &SiteObservation,
    basis: Basis,
) -> SitePlan {
    let layout = desired.layout(placement);
    let seen = seen_through(observation, basis);
    let facts = facts_for(desired, placement, &seen.facts, basis);
    let vms = desired.vms_on(placement);
    let networks = desired.networks(placement);
    let ports = ports::choose(desired, &layout, &vms, &seen);
    let mut site = SitePlan {
        placement: placement.clone(),
        layout: layout.clone(),
        basis,
        problems: Vec::new(),
        warnings: Vec::new(),
        check_vde: Vec::new(),
        push: Vec::new(),
        networks: Vec::new(),
        vms: Vec::new(),
    };
    for vm in &vms {
        let spec = resolve_spec(
            desired,
            &layout,
            vm,
            &facts,
            ports.get(&vm.name).copied(),
            &networks,
        );
        let found = seen.instances.get(&vm.name);
        let (action, reasons) = decide::decide(&spec, found, basis);
        let previous = found
            .and_then(|f| f.record.as_ref().ok())
            .map(|r| r.spec.clone());
        if action != VmAction::Keep
            && let Some(problem) = decide::refusal(&spec, found)
        {
            site.problems.push(problem);
        }
        site.vms.push(VmStep {
            name: vm.name.clone(),
            level: vm.level,
            action,
            reasons,
            spec,
            previous,
            running: found.and_then(|f| f.pid),
            ready: found
                .and_then(|f| f.record.as_ref().ok())
                .is_some_and(|r| r.ready),
        });
    }
    site.problems.extend(ports::conflicts(
        placement_label(desired, placement),
        &site.vms,
        &seen,
    ));
    site.problems
        .extend(missing_tools(desired, placement, &facts));
    if networks.iter().any(|n| n.attach.is_some()) && facts.no_tap_rights {
        site.problems.push(format!(
            "Host `{}` cannot make the tap an `attach` needs: only root (or CAP_NET_ADMIN) may\nhint: run farm as root there, or remove the `attach`",
            placement.name()
        ));
    }
    for (vm, pids) in seen.orphans() {
        let pids = list(&pids);
        match site.vm(&vm) {
            Some(step) if step.action != VmAction::Keep => site.problems.push(format!(
                "VM `{vm}` already runs on `{}` (qemu pid {pids}), but farm has no state for that copy (was `.farm/` deleted?)\nhint: `farm down {vm}` stops it, then `farm up`",
                placement.name()
            )),
            Some(_) => {}
            None => site.warnings.push(format!(
                "qemu pid {pids} on `{}` is farm's VM `{vm}`, which farm has no state for\nhint: `farm down` stops it",
                placement.name()
            )),
        }
    }
    for name in seen.instances.keys() {
        if !desired.topology.vms.contains_key(name) {
            site.warnings.push(format!(
                "`{name}` on `{}` is not in farm.toml any more; it is left as it is\nhint: `farm down {name}` stops it and removes its disk",
                placement.name()
            ));
        }
    }
    let starting = site.vms.iter().any(|v| v.action != VmAction::Keep);
    if starting && !networks.is_empty() {
        let arches: BTreeSet<&str> = vms
            .iter()
            .filter_map(|vm| desired.config.targets.get(&vm.target))
            .map(|t| qemu_binary(t.arch))
            .collect();
        site.check_vde = arches.into_iter().map(str::to_string).collect();
    }
    if layout.remote {
        let mut push: Vec<String> = Vec::new();
        for step in site.vms.iter().filter(|v| v.action != VmAction::Keep) {
            let vm = desired
                .topology
                .vms
                .get(&step.name)
                .expect("planned VMs exist");
            let key = (vm.platform.clone(), vm.target.clone());
            for entry in desired
                .layers
                .get(&key)
                .map(|l| l.closure.as_slice())
                .unwrap_or(&[])
            {
                if !seen.entries.contains(entry) && !push.contains(entry) {
                    push.push(entry.clone());
                }
            }
        }
        site.push = push;
    }
    for network in networks {
        let state = seen
            .networks
            .get(&network.name)
            .copied()
            .unwrap_or_default();
        site.networks.push(NetworkStep {
            start_switch: network.backend == VdeBackend::Switch && !state.switch,
            start_tap: network.attach.is_some() && !state.tap,
            network,
        });
    }
    site
}

/// What the plan may count on, given the basis: after a restart nothing runs; on a fresh
/// hypervisor nothing exists.
fn seen_through(observation: &SiteObservation, basis: Basis) -> SiteObservation {
    match basis {
        Basis::Observed => observation.clone(),
        Basis::Fresh => SiteObservation::default(),
        Basis::AfterRestart | Basis::Unreachable => SiteObservation {
            reached: false,
            facts: observation.facts.clone(),
            listening: BTreeSet::new(),
            instances: observation
                .instances
                .iter()
                .map(|(name, i)| {
                    (
                        name.clone(),
                        ObservedInstance {
                            record: i.record.clone(),
                            pid: None,
                            answers: None,
                        },
                    )
                })
                .collect(),
            tagged: Vec::new(),
            entries: observation.entries.clone(),
            networks: BTreeMap::new(),
        },
    }
}

/// The site's facts; a hypervisor VM not observed yet is taken to be its target's arch,
/// without KVM, until it is.
fn facts_for(
    desired: &Desired,
    placement: &Placement,
    seen: &SiteFacts,
    basis: Basis,
) -> SiteFacts {
    if basis == Basis::Observed || seen.arch.is_some() {
        return seen.clone();
    }
    let arch = match placement {
        Placement::Vm(vm) => desired
            .topology
            .vms
            .get(vm)
            .and_then(|v| desired.config.targets.get(&v.target))
            .map(|t| t.arch),
        Placement::Host(_) => None,
    };
    SiteFacts {
        arch,
        ..SiteFacts::default()
    }
}

fn missing_tools(desired: &Desired, placement: &Placement, facts: &SiteFacts) -> Option<String> {
    if facts.missing.is_empty() {
        return None;
    }
    let packages: BTreeSet<&str> = facts
        .missing
        .iter()
        .map(|t| super::programs::debian_package(t))
        .collect();
    let packages: Vec<&str> = packages.into_iter().collect();
    let hint = match placement {
        Placement::Vm(vm) => format!(
            "add `packages = [\"{}\"]` to the platform of `{vm}`",
            packages.join("\", \"")
        ),
        Placement::Host(_) if desired.topology.remote_host(placement).is_some() => format!(
            "install them on `{}`: `apt-get install {}`",
            placement.name(),
            packages.join(" ")
        ),
        Placement::Host(_) => format!(
            "run ./scripts/setup.sh, or `apt-get install {}`",
            packages.join(" ")
        ),
    };
    Some(format!(
        "Host `{}` cannot run its VMs: it lacks {}\nhint: {hint}",
        placement_label(desired, placement),
        facts.missing.join(", ")
    ))
}

/// The site's name as the user knows it.
pub fn placement_label(desired: &Desired, placement: &Placement) -> String {
    match placement {
        Placement::Host(name) if name == LOCAL_HOST && desired.topology.hosts.is_empty() => {
            LOCAL_HOST.to_string()
        }
        other => other.name().to_string(),
    }
}

fn list(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The spec of `vm` on a site laid out as `layout` with `facts`.
fn resolve_spec(
    desired: &Desired,
    layout: &SiteLayout,
    vm: &VmNode,
    facts: &SiteFacts,
    ssh_port: Option<u16>,
    networks: &[SiteNetwork],
) -> InstanceSpec {
    let target = &desired.config.targets[&vm.target];
    let layer = desired
        .layers
        .get(&(vm.platform.clone(), vm.target.clone()))
        .expect("every selected VM's layer is resolved");
    let on_site = |relative: &Path| layout.store_entries.join(relative);
    let accel = choose_accel(
        desired.accel.unwrap_or(target.accel),
        facts.kvm,
        facts.arch.unwrap_or(target.arch),
        target.arch,
    );
    InstanceSpec {
        name: vm.name.clone(),
        hostname: vm.hostname.clone(),
        platform: layer.name.clone(),
        drv_hash: layer.drv_hash,
        layer: LayerRef {
            entry: layer.entry.clone(),
            disk: on_site(&Path::new(&layer.entry).join("disk.qcow2")),
            blake3: layer.blake3,
        },
        boot: layer.boot.as_ref().map(|b| DirectBoot {
            kernel: on_site(&b.kernel),
            initrd: b.initrd.as_deref().map(on_site),
            cmdline: b.cmdline.clone(),
        }),
        hw: MachineSpec {
            arch: target.arch,
            machine: target.machine.clone(),
            cpu: target.cpu.clone(),
            accel,
            memory_mib: vm
                .resources
                .memory
                .map(|m| m.mib())
                .unwrap_or(DEFAULT_MEMORY_MIB),
            cpus: vm.resources.cpus.unwrap_or(1),
        },
        disk_size: vm.resources.disk_size.map(|s| s.0),
        user_net: match (vm.user_network, ssh_port) {
            (true, Some(port)) => Some(UserNet {
                mac: mac_for(&vm.name, 0),
                ssh_port: port,
                forwards: vm.forwards.iter().map(|f| (f.host, f.guest)).collect(),
            }),
            _ => None,
        },
        vde_nics: vde_nics(vm)
            .into_iter()
            .map(|nic| {
                let plug = networks
                    .iter()
                    .find(|n| n.name == nic.network)
                    .map(|n| n.plug(&layout.state_dir))
                    .unwrap_or_default();
                VdeNicSpec {
                    network: nic.network,
                    mac: nic.mac,
                    address: nic.address,
                    gateway: nic.gateway,
                    plug,
                }
            })
            .collect(),
        authorized_keys: desired.farm_key.iter().cloned().collect(),
        paths: InstancePaths::new(&layout.state_dir, &vm.name),
        tag: ProcessTag::vm(&desired.project_tag(), &vm.name),
    }
}
