//! `farm down`: observes every site that may hold a VM to stop, plans the teardown
//! (`model::down_plan`: the named VMs, all when none, and every VM inside them, deepest
//! site first), then prints the plan (`--dry-run`) or carries it out: each guest powered
//! off, saying how it went, overlays removed unless `--keep`, qemu processes farm started
//! but has no state for (found by their tag, e.g. after `.farm/` was deleted) stopped too,
//! and networks nothing uses any more torn down.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::model::config::topology::Placement;
use crate::model::lab::down_plan::{
    DownPlan, DownRequest, SiteAction, SiteLook, Teardown, plan_down, sites_to_visit,
    with_descendants,
};
use crate::model::lab::instance::InstancePaths;
use crate::model::lab::up_plan::Desired;
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::apply::ssh_poweroff;
use crate::run::backend;
use crate::run::host::Host;
use crate::run::instance::{self, Stopped};
use crate::run::lab::{LabError, desired, dry_run_ssh_config, write_state_ssh_files};
use crate::run::observe::{Ask, observe_site};
use crate::run::site::{SiteError, Sites};
use crate::run::state::{StateDir, StatePaths};
use crate::store::Store;

/// What `down` did, or would do.
#[derive(Debug)]
pub enum DownOutcome {
    /// A dry run: the plan, nothing changed.
    Planned(DownPlan),
    /// The VMs it stopped or forgot.
    Stopped(Vec<String>),
}

/// Stops the VMs `names` (all when none) with every VM inside them, or only plans it.
pub fn down(
    project: &Project,
    state_root: &Path,
    names: &[String],
    keep: bool,
    timeout: Duration,
    dry_run: bool,
    reporter: &Reporter,
) -> Result<DownOutcome, LabError> {
    let topology = &project.loaded.topology;
    let paths = StatePaths::new(state_root);
    // A dry run only reads: it reaches what runs through the ssh_config that exists.
    let (state, ssh_config, _scratch) = if dry_run {
        let (config, scratch) = dry_run_ssh_config(project, &paths)?;
        (None, config, scratch)
    } else {
        let state = StateDir::open(state_root)?;
        write_state_ssh_files(project, &state, &BTreeMap::new())?;
        let config = state.own_ssh_config();
        (Some(state), config, None)
    };
    let store = Store::open_existing(&project.store_dir)?;
    let desired = desired(
        project,
        topology.vms.keys().cloned().collect(),
        &BTreeMap::new(),
        store.as_ref(),
        &paths,
        None,
        &project.store_dir,
    )?;
    let request = DownRequest {
        wanted: with_descendants(topology, names),
        everything: names.is_empty(),
        keep,
    };
    let sites = Sites::new(topology, &ssh_config);
    let visit = sites_to_visit(&desired, &request);
    let looks = crate::run::parallel::each(&visit, |(_, placement)| {
        look(&sites, &desired, &paths, placement, &request, dry_run)
            .map(|look| (placement.clone(), look))
    })
    .into_iter()
    .collect::<Result<BTreeMap<_, _>, _>>()?;
    let plan = plan_down(&desired, &request, &visit, &looks);
    let Some(state) = state else {
        return Ok(DownOutcome::Planned(plan));
    };
    let teardown = Apply {
        sites: &sites,
        project: desired.project_tag(),
        state: &state,
        keep,
        timeout,
        reporter,
    };
    let mut stopped = Vec::new();
    // Sites at one depth are independent (two hypervisor VMs, or this machine and a remote
    // host): they go down side by side, each powering its guests off at once.
    for depth in plan.sites.chunk_by(|a, b| a.depth == b.depth) {
        for site_stopped in
            crate::run::parallel::each(depth, |site| teardown.site(&site.placement, &site.action))
        {
            stopped.extend(site_stopped?);
        }
    }
    for vm in &stopped {
        state.stop_shared_connection(vm);
    }
    write_state_ssh_files(project, &state, &BTreeMap::new())?;
    Ok(DownOutcome::Stopped(stopped))
}

/// What one site holds, before anything stops. farm's libvirt domains are listed only when
/// the overlays go (lost domains are undefined then), and a dry run does not start a
/// libvirtd that is not running to list them.
fn look(
    sites: &Sites,
    desired: &Desired,
    paths: &StatePaths,
    placement: &Placement,
    request: &DownRequest,
    dry_run: bool,
) -> Result<SiteLook, LabError> {
    let host = match sites.connect(placement) {
        Ok(host) => host,
        Err(SiteError::VmUnreachable { vm, .. }) => {
            let known = desired
                .topology
                .children(placement)
                .filter(|child| paths.instance(&child.name).dir.is_dir())
                .map(|child| child.name.clone())
                .collect();
            return Ok(SiteLook::HypervisorDown {
                hypervisor: vm,
                known,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let observation = observe_site(host.as_ref(), desired, placement, Ask::No, &BTreeMap::new())?;
    let backend = desired.topology.backend_on(placement);
    let uri = backend.libvirt_uri().filter(|_| !request.keep);
    let daemon_stopped = |uri: &str| {
        let socket = crate::model::config::backend::Backend::libvirt_socket_shell(uri);
        dry_run
            && !host.is_local()
            && !host
                .run(&format!("[ -S {socket} ]"))
                .is_ok_and(|o| o.success())
    };
    let domains = match uri {
        Some(uri) if !daemon_stopped(uri) => {
            let project = desired.project_tag();
            crate::run::backend::libvirt::with_libvirt(host.as_ref(), uri, |lv| {
                Ok(lv
                    .farm_domains()?
                    .into_iter()
                    .filter(|domain| domain.meta.project == project)
                    .map(|domain| domain.name)
                    .collect())
            })?
        }
        _ => Vec::new(),
    };
    Ok(SiteLook::Observed {
        observation,
        domains,
    })
}

/// How `down` carries out its plan.
struct Apply<'a> {
    sites: &'a Sites<'a>,
    /// The project's tag: only its libvirt domains are touched.
    project: String,
    state: &'a StateDir,
    keep: bool,
    timeout: Duration,
    reporter: &'a Reporter,
}

impl Apply<'_> {
    /// Carries out one site's part of the plan; returns the VMs it stopped or forgot.
    fn site(&self, placement: &Placement, action: &SiteAction) -> Result<Vec<String>, LabError> {
        let teardown = match action {
            SiteAction::Gone { hypervisor, forget } => {
                // Its VMs stopped with it; farm forgets them unless asked to keep them.
                for vm in forget {
                    if !self.keep {
                        self.state.remove_instance(vm)?;
                    }
                    self.reporter.status(
                        "stopped",
                        format!("{vm} (its hypervisor {hypervisor} is not running)"),
                    );
                }
                return Ok(forget.clone());
            }
            SiteAction::Teardown(teardown) => teardown,
        };
        let host = self.sites.connect(placement)?;
        let mut stopped = self.stop_all(host.as_ref(), teardown)?;
        stopped.extend(stop_orphans(
            host.as_ref(),
            teardown,
            placement,
            self.reporter,
        )?);
        undefine_lost_domains(host.as_ref(), teardown, self)?;
        for network in &teardown.networks {
            crate::run::vde::tear_down(host.as_ref(), &teardown.state_dir, network)?;
        }
        instance::stop_pids(
            host.as_ref(),
            &teardown.lost_network_pids,
            Duration::from_secs(5),
        )?;
        Ok(stopped)
    }

    /// Stops a site's VMs in parallel; removes them unless `keep` (then marks them kept).
    fn stop_all(&self, host: &dyn Host, teardown: &Teardown) -> Result<Vec<String>, LabError> {
        crate::run::parallel::each(&teardown.stop, |vm| -> Result<String, LabError> {
            let name = &vm.name;
            let paths = InstancePaths::new(&teardown.state_dir, name);
            let config = self.sites.ssh_config().to_path_buf();
            let poweroff = || ssh_poweroff(&config, name);
            let how = match &vm.record {
                Some(record) => {
                    let timeout =
                        crate::run::recover::power_off_timeout(host, &record.spec, self.timeout);
                    backend::stop_spec(host, &record.spec, timeout, Some(&poweroff))?
                }
                None => backend::qemu::stop(host, &paths, name, self.timeout, Some(&poweroff))?,
            };
            if self.keep {
                if let Some(record) = &vm.record {
                    let mut record = record.clone();
                    record.kept = true;
                    instance::save(host, &record)?;
                }
            } else {
                if let Some(record) = &vm.record {
                    backend::retire_domain(host, &record.spec, None)?;
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

/// Stops tagged qemu processes farm has no state for (those the plan names).
fn stop_orphans(
    host: &dyn Host,
    teardown: &Teardown,
    placement: &Placement,
    reporter: &Reporter,
) -> Result<Vec<String>, LabError> {
    let mut stopped = Vec::new();
    for (vm, pids) in &teardown.orphans {
        instance::stop_pids(host, pids, Duration::from_secs(10))?;
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        reporter.status(
            "stopped",
            format!(
                "{vm} (qemu pid {} on {}, which farm had no state for)",
                pids.join(", "),
                placement.name()
            ),
        );
        stopped.push(vm.clone());
    }
    Ok(stopped)
}

/// farm's domains of this project on a libvirt site that no instance record accounts for
/// (its state was removed, or the VM left farm.toml), as the plan names them: destroyed and
/// undefined. Other domains are never looked at twice.
fn undefine_lost_domains(
    host: &dyn Host,
    teardown: &Teardown,
    apply: &Apply,
) -> Result<(), LabError> {
    if teardown.lost_domains.is_empty() {
        return Ok(());
    }
    let Some(uri) = &teardown.libvirt_uri else {
        return Ok(());
    };
    let lost = crate::run::backend::libvirt::with_libvirt(host, uri, |lv| {
        let mut lost = Vec::new();
        for domain in lv.farm_domains()? {
            if domain.meta.project == apply.project && teardown.lost_domains.contains(&domain.name)
            {
                lv.destroy(&domain.name, &domain.meta)?;
                lv.undefine(&domain.name, &domain.meta)?;
                lost.push(domain.name);
            }
        }
        Ok(lost)
    })?;
    for name in lost {
        apply.reporter.status(
            "undefined",
            format!(
                "{name} (a libvirt domain of this project on {} farm had no state for)",
                host.name()
            ),
        );
    }
    Ok(())
}
