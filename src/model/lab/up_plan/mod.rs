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
mod desired;
mod ports;
mod render;
mod spec;

use std::collections::{BTreeMap, BTreeSet};

use crate::model::config::network::{SiteNetwork, VdeBackend};
use crate::model::config::topology::{LOCAL_HOST, Placement};
use crate::model::lab::instance::{InstanceSpec, VmState};
use crate::model::lab::observation::{ObservedInstance, SiteFacts, SiteObservation};

pub use decide::Reason;
pub use desired::{Desired, LayerInfo, SiteLayout, qemu_binary};
pub use spec::DEFAULT_MEMORY_MIB;

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
    /// The site unpacks zstd, so the push travels compressed.
    pub push_zstd: bool,
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
        push_zstd: facts.zstd,
        networks: Vec::new(),
        vms: Vec::new(),
    };
    for vm in &vms {
        let mut spec = spec::resolve(
            desired,
            &layout,
            vm,
            &facts,
            ports.get(&vm.name).copied(),
            &networks,
        );
        if layout.remote {
            spec::use_site_entries(&mut spec, &layout, &seen);
        }
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
        if matches!(action, VmAction::Create | VmAction::Replace)
            && let Some(problem) =
                decide::disk_smaller_than_layer(&spec, desired.layer_of(vm).virtual_size)
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
                if seen.entry_for(entry).is_none() && !push.contains(entry) {
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
        .map(|t| crate::model::programs::debian_package(t))
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
