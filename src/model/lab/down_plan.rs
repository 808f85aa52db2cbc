//! `farm down` as a plan: which sites are visited, deepest first, and on each which VMs
//! stop, which tagged qemu processes farm has no state for are stopped, which libvirt
//! domains it lost are undefined, and which networks go. `farm down --dry-run` prints it;
//! `run::down` carries it out.
//!
//! Pure: made from what was observed on each site (`SiteLook`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::model::config::network::{SiteNetwork, site_networks};
use crate::model::config::topology::{Placement, Topology};
use crate::model::lab::instance::InstanceRecord;
use crate::model::lab::observation::SiteObservation;
use crate::model::lab::up_plan::Desired;

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

/// What `down` is asked to do.
#[derive(Clone, Debug)]
pub struct DownRequest {
    /// The VMs to stop, with every VM inside them.
    pub wanted: BTreeSet<String>,
    /// No VM was named: VMs that left farm.toml go too, and lost network daemons.
    pub everything: bool,
    /// Overlays are kept (the VMs' records are marked kept).
    pub keep: bool,
}

/// Every site that may hold a wanted VM, deepest first, with its depth: the hosts (a VM
/// that left farm.toml may still run there), the hypervisor VMs wanted VMs run in, and the
/// sites inside wanted hypervisor VMs.
pub fn sites_to_visit(desired: &Desired, request: &DownRequest) -> Vec<(u32, Placement)> {
    let mut placements: Vec<(u32, Placement)> =
        desired.top_sites().into_iter().map(|p| (0, p)).collect();
    for vm in desired.topology.vms.values() {
        if !(request.wanted.contains(&vm.name) || request.everything) {
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
    placements
}

/// What was seen of one site before anything stopped.
#[derive(Clone, Debug)]
pub enum SiteLook {
    /// farm reached it.
    Observed {
        observation: SiteObservation,
        /// farm's libvirt domains of this project there (none on a qemu site).
        domains: Vec<String>,
    },
    /// Its hypervisor VM is not running; `known` are the VMs inside it farm has state for
    /// here.
    HypervisorDown {
        hypervisor: String,
        known: Vec<String>,
    },
}

/// The whole teardown, deepest site first.
#[derive(Clone, Debug)]
pub struct DownPlan {
    pub keep: bool,
    pub sites: Vec<SiteDown>,
}

#[derive(Clone, Debug)]
pub struct SiteDown {
    /// Sites of one depth are independent: they go down side by side.
    pub depth: u32,
    pub placement: Placement,
    pub action: SiteAction,
}

#[derive(Clone, Debug)]
pub enum SiteAction {
    /// Its hypervisor VM is not running: its VMs stopped with it, and farm forgets them
    /// (unless `keep`).
    Gone {
        hypervisor: String,
        forget: Vec<String>,
    },
    Teardown(Teardown),
}

/// What goes down on a site farm reached.
#[derive(Clone, Debug)]
pub struct Teardown {
    /// The site's state directory (instances, networks).
    pub state_dir: PathBuf,
    /// The libvirt daemon the site runs its VMs under, if it does.
    pub libvirt_uri: Option<String>,
    /// Instances farm has state for, in name order (running or not: their state goes).
    pub stop: Vec<VmStop>,
    /// Tagged qemu processes of VMs farm has no state for, by VM.
    pub orphans: BTreeMap<String, Vec<u32>>,
    /// farm's libvirt domains of this project that no stopped instance accounts for.
    pub lost_domains: Vec<String>,
    /// Networks none of whose VMs runs once the plan is carried out.
    pub networks: Vec<SiteNetwork>,
    /// Tagged network daemons farm lost track of (only when everything goes down).
    pub lost_network_pids: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct VmStop {
    pub name: String,
    /// Its record (how it runs), when it could be read.
    pub record: Option<InstanceRecord>,
    pub running: bool,
}

/// Plans `down` from what `looks` (by site, every site of [`sites_to_visit`]) saw.
pub fn plan_down(
    desired: &Desired,
    request: &DownRequest,
    visit: &[(u32, Placement)],
    looks: &BTreeMap<Placement, SiteLook>,
) -> DownPlan {
    let topology = desired.topology;
    let goes = |name: &str| {
        request.wanted.contains(name) || (request.everything && !topology.vms.contains_key(name))
    };
    let mut sites = Vec::new();
    for (depth, placement) in visit {
        let Some(look) = looks.get(placement) else {
            continue;
        };
        let action = match look {
            SiteLook::HypervisorDown { hypervisor, known } => SiteAction::Gone {
                hypervisor: hypervisor.clone(),
                forget: known
                    .iter()
                    .filter(|name| request.wanted.contains(*name))
                    .cloned()
                    .collect(),
            },
            SiteLook::Observed {
                observation,
                domains,
            } => {
                let state_dir = desired.layout(placement).state_dir;
                let stop: Vec<VmStop> = observation
                    .instances
                    .iter()
                    .filter(|(name, instance)| {
                        goes(name) && !instance.is_copy_from_elsewhere(&state_dir, name)
                    })
                    .map(|(name, instance)| VmStop {
                        name: name.clone(),
                        record: instance.record.as_ref().ok().cloned(),
                        running: instance.running(),
                    })
                    .collect();
                let retired_with_their_instance = |domain: &String| {
                    stop.iter().any(|vm| {
                        &vm.name == domain
                            && vm
                                .record
                                .as_ref()
                                .is_some_and(|r| r.spec.backend.libvirt_uri().is_some())
                    })
                };
                let lost_domains = if request.keep {
                    Vec::new()
                } else {
                    domains
                        .iter()
                        .filter(|d| goes(d) && !retired_with_their_instance(d))
                        .cloned()
                        .collect()
                };
                let orphans = observation
                    .orphans()
                    .into_iter()
                    .filter(|(vm, _)| request.everything || request.wanted.contains(vm))
                    .collect();
                Teardown {
                    state_dir,
                    libvirt_uri: topology
                        .backend_on(placement)
                        .libvirt_uri()
                        .map(str::to_string),
                    stop,
                    orphans,
                    lost_domains,
                    networks: Vec::new(),
                    lost_network_pids: if request.everything {
                        observation
                            .tagged
                            .iter()
                            .filter(|p| p.what.starts_with("net:"))
                            .map(|p| p.pid)
                            .collect()
                    } else {
                        Vec::new()
                    },
                }
                .into()
            }
        };
        sites.push(SiteDown {
            depth: *depth,
            placement: placement.clone(),
            action,
        });
    }
    // A network goes when none of its users runs once every stop of the plan is done.
    let stopped: BTreeSet<&str> = sites.iter().flat_map(|site| site.stopped()).collect();
    let networks: Vec<Vec<SiteNetwork>> = sites
        .iter()
        .map(|site| match (&site.action, looks.get(&site.placement)) {
            (SiteAction::Teardown(_), Some(SiteLook::Observed { observation, .. })) => {
                site_networks(desired.config, topology, &site.placement)
                    .into_iter()
                    .filter(|network| {
                        !network.users.iter().any(|user| {
                            !stopped.contains(user.as_str())
                                && observation.instances.get(user).is_some_and(|i| i.running())
                        })
                    })
                    .collect()
            }
            _ => Vec::new(),
        })
        .collect();
    for (site, networks) in sites.iter_mut().zip(networks) {
        if let SiteAction::Teardown(teardown) = &mut site.action {
            teardown.networks = networks;
        }
    }
    DownPlan {
        keep: request.keep,
        sites,
    }
}

impl From<Teardown> for SiteAction {
    fn from(teardown: Teardown) -> SiteAction {
        SiteAction::Teardown(teardown)
    }
}

impl SiteDown {
    /// The VMs this site's part of the plan stops (or forgets).
    pub fn stopped(&self) -> Vec<&str> {
        match &self.action {
            SiteAction::Gone { forget, .. } => forget.iter().map(String::as_str).collect(),
            SiteAction::Teardown(t) => t
                .stop
                .iter()
                .map(|vm| vm.name.as_str())
                .chain(t.orphans.keys().map(String::as_str))
                .collect(),
        }
    }
}

impl DownPlan {
    /// Whether carrying it out changes nothing.
    pub fn is_noop(&self) -> bool {
        self.sites.iter().all(|site| match &site.action {
            SiteAction::Gone { forget, .. } => forget.is_empty(),
            SiteAction::Teardown(t) => {
                t.stop.is_empty()
                    && t.orphans.is_empty()
                    && t.lost_domains.is_empty()
                    && t.networks.is_empty()
                    && t.lost_network_pids.is_empty()
            }
        })
    }

    /// The plan as `farm down --dry-run` prints it: each site that changes, deepest first,
    /// with what stops there in the order it stops.
    pub fn render(&self) -> String {
        if self.is_noop() {
            return "nothing to stop: no VM of this lab is running or has state\n".into();
        }
        let mut out = String::new();
        let overlays = if self.keep {
            "overlays kept"
        } else {
            "overlays removed"
        };
        let _ = writeln!(out, "down, deepest site first ({overlays}):");
        let mut step = 0;
        for site in &self.sites {
            let where_ = match &site.placement {
                Placement::Host(host) => format!("host {host}"),
                Placement::Vm(vm) => format!("inside {vm}"),
            };
            let mut lines = Vec::new();
            match &site.action {
                SiteAction::Gone { hypervisor, forget } => {
                    for vm in forget {
                        lines.push(format!(
                            "forget {vm} (it stopped with {hypervisor}, which is not running)"
                        ));
                    }
                }
                SiteAction::Teardown(t) => {
                    for vm in &t.stop {
                        let how = match (vm.running, &vm.record) {
                            (false, _) => "not running; its state goes",
                            (true, Some(record)) if record.spec.backend.libvirt_uri().is_some() => {
                                "power off its libvirt domain"
                            }
                            (true, _) => "power off",
                        };
                        lines.push(format!("stop {} ({how})", vm.name));
                    }
                    for (vm, pids) in &t.orphans {
                        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
                        lines.push(format!(
                            "stop {vm} (qemu pid {}, which farm has no state for)",
                            pids.join(", ")
                        ));
                    }
                    for domain in &t.lost_domains {
                        lines.push(format!(
                            "undefine {domain} (a libvirt domain of this project farm has no state for)"
                        ));
                    }
                    for network in &t.networks {
                        lines.push(format!("tear down network {}", network.name));
                    }
                    if !t.lost_network_pids.is_empty() {
                        let pids: Vec<String> =
                            t.lost_network_pids.iter().map(u32::to_string).collect();
                        lines.push(format!(
                            "stop network daemons farm lost track of (pid {})",
                            pids.join(", ")
                        ));
                    }
                }
            }
            if lines.is_empty() {
                continue;
            }
            step += 1;
            let _ = writeln!(out, "  {step}. {where_} (depth {}):", site.depth);
            for line in lines {
                let _ = writeln!(out, "       {line}");
            }
        }
        out
    }
}
