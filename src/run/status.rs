//! `farm status`: what every VM of the topology is doing, from the same observation and
//! plan as `farm up` (a VM whose spec changed is `changed`, one whose qemu runs but whose
//! sshd does not answer is `unreachable`). It only reads: no lock (it answers while an
//! `up` runs), no files written, no store created.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use crate::model::config::network::site_attachments;
use crate::model::config::topology::{Topology, VmNode};
use crate::model::lab::instance::{InstanceSpec, VmState};
use crate::model::lab::up_plan::{Basis, plan_up};
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::lab::{LabError, desired};
use crate::run::observe::{Ask, observe_lab, ssh_address};
use crate::run::site::Sites;
use crate::run::state::StatePaths;
use crate::store::Store;

/// One row of `farm up`'s and `farm status`'s tables.
#[derive(Clone, Debug, Serialize)]
pub struct VmStatus {
    pub name: String,
    pub host: String,
    pub level: u32,
    pub platform: String,
    pub state: VmState,
    /// Where its sshd is: `127.0.0.1:PORT` or `IP:22`, after the host it is reached through.
    pub address: Option<String>,
    /// `TCG` or `KVM`, for VMs that exist.
    pub accel: Option<String>,
    pub ssh: String,
}

/// VMs in tree order: each under its hypervisor, siblings by name.
pub fn tree_order<'a>(topology: &'a Topology, names: &BTreeSet<String>) -> Vec<&'a VmNode> {
    let mut vms: Vec<&VmNode> = topology
        .vms
        .values()
        .filter(|vm| names.contains(&vm.name))
        .collect();
    vms.sort_by_key(|vm| {
        let mut key: Vec<String> = topology
            .chain(&vm.name)
            .iter()
            .map(|p| p.name().to_string())
            .collect();
        key.push(vm.name.clone());
        key
    });
    vms
}

fn address(topology: &Topology, vm: &VmNode, spec: &InstanceSpec) -> Option<String> {
    let attached: Vec<String> = site_attachments(topology, &vm.placement)
        .into_iter()
        .map(|(network, _)| network)
        .collect();
    let at = ssh_address(spec, &attached)?;
    Some(if topology.reached_through(&vm.placement) {
        format!("{}:{at}", vm.placement.name())
    } else {
        at.to_string()
    })
}

fn row(
    topology: &Topology,
    vm: &VmNode,
    state: VmState,
    spec: Option<&InstanceSpec>,
    ssh_config: &Path,
) -> VmStatus {
    VmStatus {
        name: vm.name.clone(),
        host: vm.placement.name().to_string(),
        level: vm.level,
        platform: format!("{}_{}", vm.platform, vm.target),
        state,
        address: spec.and_then(|s| address(topology, vm, s)),
        accel: spec.map(|s| s.hw.accel.to_string()),
        ssh: format!("ssh -F {} {}", ssh_config.display(), vm.name),
    }
}

/// The rows after a successful `up`: every VM brought up runs its spec.
pub fn rows_from_specs(
    topology: &Topology,
    selected: &BTreeSet<String>,
    specs: &BTreeMap<String, InstanceSpec>,
    state: &StatePaths,
) -> Vec<VmStatus> {
    tree_order(topology, selected)
        .into_iter()
        .map(|vm| {
            row(
                topology,
                vm,
                VmState::Running,
                specs.get(&vm.name),
                &state.ssh_config(),
            )
        })
        .collect()
}

/// `farm status`: every VM of the topology, hypervisors before the VMs inside them.
/// Warnings (a host that does not answer) go to `reporter`, the rows to the caller.
pub fn status(
    project: &Project,
    state_root: &Path,
    reporter: &Reporter,
) -> Result<Vec<VmStatus>, LabError> {
    let topology = &project.loaded.topology;
    let paths = StatePaths::new(state_root);
    let store = Store::open_existing(&project.store_dir)?;
    let all: BTreeSet<String> = topology.vms.keys().cloned().collect();
    let desired = desired(
        project,
        all.clone(),
        &BTreeMap::new(),
        store.as_ref(),
        &paths,
        None,
        &project.store_dir,
    )?;
    // `status` only reads: a lab never brought up has no ssh_config yet, and remote hosts
    // are reached through one rendered in a temporary directory.
    let (ssh_config, _scratch) = crate::run::lab::dry_run_ssh_config(project, &paths)?;
    let sites = Sites::new(topology, &ssh_config);
    let observed = observe_lab(&desired, &sites, &paths, reporter, Ask::Quickly)?;
    let plan = plan_up(&desired, &observed);
    let mut rows = Vec::new();
    for vm in tree_order(topology, &all) {
        let Some(site) = plan.site(&vm.placement) else {
            continue;
        };
        let Some(step) = site.vm(&vm.name) else {
            continue;
        };
        let state = match (site.basis, &step.previous) {
            (Basis::Unreachable, Some(_)) => VmState::Unreachable,
            _ if step.action == crate::model::lab::up_plan::VmAction::Create
                && observed
                    .get(&vm.placement)
                    .is_some_and(|o| !o.orphans_of(&vm.name).is_empty()) =>
            {
                VmState::Orphaned
            }
            _ => step.state(),
        };
        rows.push(row(
            topology,
            vm,
            state,
            step.previous.as_ref(),
            &paths.ssh_config(),
        ));
    }
    Ok(rows)
}
