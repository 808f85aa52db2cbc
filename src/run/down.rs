//! `farm down`: stops the named VMs (all when none) and every VM inside them, deepest site
//! first, powering each guest off and saying how it went; removes their overlays unless
//! `--keep`. qemu processes farm started but has no state for (found by their tag, e.g.
//! after `.farm/` was deleted) are stopped too, and networks nothing uses any more go.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::model::observation::SiteObservation;
use crate::model::topology::{Placement, Topology};
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::apply::ssh_poweroff;
use crate::run::host::Host;
use crate::run::instance::{self, Stopped};
use crate::run::lab::{LabError, desired, write_state_ssh_files};
use crate::run::observe::{Ask, observe_site};
use crate::run::site::{SiteError, Sites};
use crate::run::state::StateDir;
use crate::store::Store;

/// The named VMs (all when none) and every VM running inside them, at any depth.
pub fn with_descendants(topology: &Topology, names: &[String]) -> BTreeSet<String> {
    topology
        .vms
        .values()
        .filter(|vm| {
            names.is_empty()
                || names.contains(&vm.name)
                || topology
                    .chain(&vm.name)
                    .iter()
                    .any(|p| matches!(p, Placement::Vm(parent) if names.contains(parent)))
        })
        .map(|vm| vm.name.clone())
        .collect()
}

/// Stops VMs; returns the names of those it stopped or removed.
pub fn down(
    project: &Project,
    state_root: &Path,
    names: &[String],
    keep: bool,
    timeout: Duration,
    reporter: &Reporter,
) -> Result<Vec<String>, LabError> {
    let topology = &project.loaded.topology;
    let state = StateDir::open(state_root)?;
    let all: BTreeSet<String> = topology.vms.keys().cloned().collect();
    let store = Store::open_existing(&project.store_dir)?;
    let desired = desired(
        project,
        all,
        &BTreeMap::new(),
        store.as_ref(),
        &state,
        None,
        &project.store_dir,
    )?;
    write_state_ssh_files(project, &state, &BTreeMap::new())?;
    let wanted = with_descendants(topology, names);
    let everything = names.is_empty();
    let sites = Sites::new(topology, &state.own_ssh_config());

    // Every site that may hold a wanted VM, deepest first: the hosts (a VM that left
    // farm.toml may still run there), the hypervisor VMs wanted VMs run in, and the sites
    // inside wanted hypervisor VMs.
    let mut placements: Vec<(u32, Placement)> =
        desired.top_sites().into_iter().map(|p| (0, p)).collect();
    for vm in topology.vms.values() {
        if !(wanted.contains(&vm.name) || everything) {
            continue;
        }
        if desired.site_inside(&vm.name).is_some() {
            placements.push((vm.level, Placement::Vm(vm.name.clone())));
        }
        if matches!(vm.placement, Placement::Vm(_)) {
            placements.push((vm.level - 1, vm.placement.clone()));
        }
    }
    placements.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    placements.dedup();

    let teardown = Teardown {
        sites: &sites,
        state: &state,
        desired: &desired,
        wanted: &wanted,
        everything,
        keep,
        timeout,
        reporter,
    };
    let mut stopped = Vec::new();
    let mut down_hypervisors: BTreeSet<String> = BTreeSet::new();
    // Sites at one depth are independent (two hypervisor VMs, or this machine and a remote
    // host): they go down side by side, each powering its guests off at once.
    for depth in placements.chunk_by(|a, b| a.0 == b.0) {
        let here: Vec<&Placement> = depth
            .iter()
            .map(|(_, placement)| placement)
            .filter(|placement| !matches!(placement, Placement::Vm(hv) if down_hypervisors.contains(hv)))
            .collect();
        let before = stopped.clone();
        for site_stopped in
            crate::run::parallel::each(here, |placement| teardown.site(placement, &before))
        {
            for name in site_stopped? {
                if desired.site_inside(&name).is_some() {
                    down_hypervisors.insert(name.clone());
                }
                stopped.push(name);
            }
        }
    }
    write_state_ssh_files(project, &state, &BTreeMap::new())?;
    Ok(stopped)
}

/// How `down` stops VMs.
struct Teardown<'a> {
    sites: &'a Sites<'a>,
    state: &'a StateDir,
    desired: &'a crate::model::up_plan::Desired<'a>,
    /// The VMs to stop, with every VM inside them.
    wanted: &'a BTreeSet<String>,
    /// Everything goes down (no VM was named): VMs farm.toml no longer has go too.
    everything: bool,
    keep: bool,
    timeout: Duration,
    reporter: &'a Reporter,
}

impl Teardown<'_> {
    /// Stops the wanted VMs of one site, its orphans and lost domains, and the networks
    /// nothing there uses any more (`stopped_before`: the VMs deeper sites stopped); returns
    /// the VMs it stopped. A hypervisor VM that is not running stopped its VMs with it.
    fn site(
        &self,
        placement: &Placement,
        stopped_before: &[String],
    ) -> Result<Vec<String>, LabError> {
        let (desired, wanted, everything) = (self.desired, self.wanted, self.everything);
        let topology = desired.topology;
        let mut stopped = Vec::new();
        let host = match self.sites.connect(placement) {
            Ok(host) => host,
            Err(SiteError::VmUnreachable { vm, .. }) => {
                // Its VMs stopped with it; farm forgets them unless asked to keep them.
                for child in topology.children(placement) {
                    if wanted.contains(&child.name) && self.state.instance(&child.name).dir.is_dir()
                    {
                        if !self.keep {
                            self.state.remove_instance(&child.name)?;
                        }
                        self.reporter.status(
                            "stopped",
                            format!("{} (its hypervisor {vm} is not running)", child.name),
                        );
                        stopped.push(child.name.clone());
                    }
                }
                return Ok(stopped);
            }
            Err(e) => return Err(e.into()),
        };
        let observation =
            observe_site(host.as_ref(), desired, placement, Ask::No, &BTreeMap::new())?;
        let site_state = desired.layout(placement).state_dir;
        let on_site: Vec<String> = observation
            .instances
            .iter()
            .filter(|(name, instance)| {
                (wanted.contains(*name) || (everything && !topology.vms.contains_key(*name)))
                    && !instance.is_copy_from_elsewhere(&site_state, name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        stopped.extend(self.stop_all(host.as_ref(), &site_state, &on_site)?);
        stopped.extend(stop_orphans(
            host.as_ref(),
            &observation,
            wanted,
            everything,
            placement,
            self.reporter,
        )?);
        if !self.keep {
            undefine_lost_domains(
                host.as_ref(),
                topology.backend_on(placement).libvirt_uri(),
                &desired.project_tag(),
                wanted,
                everything,
                self.reporter,
            )?;
        }
        let gone: Vec<String> = stopped_before.iter().chain(&stopped).cloned().collect();
        tear_down_networks(
            host.as_ref(),
            desired,
            placement,
            &observation,
            &gone,
            everything,
        )?;
        Ok(stopped)
    }

    /// Stops VMs of one site in parallel; removes them unless `keep` (then marks them kept).
    fn stop_all(
        &self,
        host: &dyn Host,
        site_state: &Path,
        names: &[String],
    ) -> Result<Vec<String>, LabError> {
        crate::run::parallel::each(names, |name| -> Result<String, LabError> {
            let paths = crate::model::instance::InstancePaths::new(site_state, name);
            let config = self.sites.ssh_config().to_path_buf();
            let poweroff = || ssh_poweroff(&config, name);
            let record = host
                .get(&paths.record())?
                .and_then(|b| crate::model::instance::InstanceRecord::parse(&b).ok());
            let how = match &record {
                Some(record) => {
                    let timeout =
                        crate::run::recover::power_off_timeout(host, &record.spec, self.timeout);
                    instance::stop_spec(host, &record.spec, timeout, Some(&poweroff))?
                }
                None => instance::stop(host, &paths, name, self.timeout, Some(&poweroff))?,
            };
            if self.keep {
                if let Some(mut record) = record {
                    record.kept = true;
                    instance::save(host, &record)?;
                }
            } else {
                if let Some(record) = &record {
                    instance::retire_domain(host, &record.spec, None)?;
                }
                instance::remove(host, &paths, name)?;
                self.state.remove_instance(name)?;
            }
            let kept = if self.keep { ", overlay kept" } else { "" };
            let verb = match how {
                Stopped::Killed(_) | Stopped::Quit(_) | Stopped::Destroyed(_) => "killed",
                _ => "stopped",
            };
            self.reporter.status(verb, format!("{name} ({how}{kept})"));
            Ok(name.clone())
        })
        .into_iter()
        .collect()
    }
}

/// Stops tagged qemu processes farm has no state for: those of wanted VMs, or every one
/// when everything goes down.
fn stop_orphans(
    host: &dyn Host,
    observation: &SiteObservation,
    wanted: &BTreeSet<String>,
    everything: bool,
    placement: &Placement,
    reporter: &Reporter,
) -> Result<Vec<String>, LabError> {
    let mut stopped = Vec::new();
    for (vm, pids) in observation.orphans() {
        if !everything && !wanted.contains(&vm) {
            continue;
        }
        instance::stop_pids(host, &pids, Duration::from_secs(10))?;
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        reporter.status(
            "stopped",
            format!(
                "{vm} (qemu pid {} on {}, which farm had no state for)",
                pids.join(", "),
                placement.name()
            ),
        );
        stopped.push(vm);
    }
    Ok(stopped)
}

/// farm's domains of this project on a libvirt site that no instance record accounts for
/// (its state was removed, or the VM left farm.toml): destroyed and undefined, those of
/// wanted VMs or, when everything goes down, all. Other domains are never looked at twice.
fn undefine_lost_domains(
    host: &dyn Host,
    uri: Option<&str>,
    project: &str,
    wanted: &BTreeSet<String>,
    everything: bool,
    reporter: &Reporter,
) -> Result<(), LabError> {
    let Some(uri) = uri else {
        return Ok(());
    };
    let lost = crate::run::domain::with_libvirt(host, uri, |lv| {
        let mut lost = Vec::new();
        for domain in lv.farm_domains()? {
            if domain.meta.project != project || !(everything || wanted.contains(&domain.name)) {
                continue;
            }
            lv.destroy(&domain.name, &domain.meta)?;
            lv.undefine(&domain.name, &domain.meta)?;
            lost.push(domain.name);
        }
        Ok(lost)
    })?;
    for name in lost {
        reporter.status(
            "undefined",
            format!(
                "{name} (a libvirt domain of this project on {} farm had no state for)",
                host.name()
            ),
        );
    }
    Ok(())
}

/// A site's network goes when none of its VMs runs any more (and, when everything goes
/// down, tagged network daemons farm lost track of).
fn tear_down_networks(
    host: &dyn Host,
    desired: &crate::model::up_plan::Desired,
    placement: &Placement,
    observation: &SiteObservation,
    stopped: &[String],
    everything: bool,
) -> Result<(), LabError> {
    let state_dir = desired.layout(placement).state_dir;
    for network in crate::model::network::site_networks(desired.config, desired.topology, placement)
    {
        let in_use = network.users.iter().any(|user| {
            !stopped.contains(user) && observation.instances.get(user).is_some_and(|i| i.running())
        });
        if !in_use {
            crate::run::vde::tear_down(host, &state_dir, &network)?;
        }
    }
    if everything {
        let lost: Vec<u32> = observation
            .tagged
            .iter()
            .filter(|p| p.what.starts_with("net:"))
            .map(|p| p.pid)
            .collect();
        instance::stop_pids(host, &lost, Duration::from_secs(5))?;
    }
    Ok(())
}
