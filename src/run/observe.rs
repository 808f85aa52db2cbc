//! Observing a lab before planning: one script per site (`model::observation`), then, for
//! each instance that runs, whether its sshd answers. Sites inside hypervisor VMs are
//! observed when those VMs run; sites are observed in parallel. Nothing is written.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use crate::model::config::network::site_attachments;
use crate::model::config::topology::Placement;
use crate::model::lab::instance::{InstanceRecord, InstanceSpec};
use crate::model::lab::observation::{
    NetworkProbe, ObserveRequest, ObservedInstance, SiteObservation, observe_script,
    parse_observation,
};
use crate::model::lab::up_plan::Desired;
use crate::progress::Reporter;
use crate::run::host::{Host, HostError};
use crate::run::site::{SiteError, Sites};
use crate::run::state::StatePaths;

/// Whether, and how patiently, running VMs' sshds are asked for their banner. A banner
/// normally comes in a fraction of a second, even nested under TCG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Not at all (`down`).
    No,
    /// Once, briefly: `status` only reports.
    Quickly,
    /// Twice, with time to spare: `up` restarts a VM that does not answer, so a busy one
    /// must not be mistaken for a dead one.
    Carefully,
}

impl Ask {
    fn answers(self, host: &dyn Host, address: SocketAddr) -> bool {
        match self {
            Ask::No => false,
            Ask::Quickly => host.ssh_answers(address, Duration::from_secs(2)),
            Ask::Carefully => {
                let patience = Duration::from_secs(8);
                host.ssh_answers(address, patience) || host.ssh_answers(address, patience)
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error(transparent)]
    Site(#[from] SiteError),
    #[error(transparent)]
    Host(#[from] HostError),
}

/// What to ask `placement`: its tools, its instances, the store entries its VMs need, its
/// networks' daemons.
pub fn request(desired: &Desired, placement: &Placement) -> ObserveRequest {
    let layout = desired.layout(placement);
    let networks = desired.networks(placement);
    let entries = layout.remote.then(|| {
        let mut names: Vec<String> = Vec::new();
        for vm in desired.vms_on(placement) {
            let key = (vm.platform.clone(), vm.target.clone());
            for entry in desired
                .layers
                .get(&key)
                .map(|l| l.closure.clone())
                .unwrap_or_default()
            {
                if !names.contains(&entry) {
                    names.push(entry);
                }
            }
        }
        (layout.store_entries.clone(), names)
    });
    ObserveRequest {
        state_dir: layout.state_dir.clone(),
        project: desired.project_tag(),
        tools: desired.site_tools(placement),
        taps: networks.iter().any(|n| n.attach.is_some()),
        store: entries,
        networks: networks
            .iter()
            .map(|n| {
                let dir = n.dir(&layout.state_dir);
                NetworkProbe {
                    name: n.name.clone(),
                    switch: (n.backend == crate::model::config::network::VdeBackend::Switch)
                        .then(|| dir.join("switch.pid")),
                    tap: n.attach.map(|_| dir.join("tap.pid")),
                }
            })
            .collect(),
    }
}

/// Runs the observation on one site and (as `ask` says) asks every running instance's
/// sshd for its banner, in parallel. `expected` gives the addresses farm's records here
/// name for the site's VMs: those are asked while the script runs (one round trip saved on
/// a hypervisor VM); an instance found elsewhere is asked afterwards.
pub fn observe_site(
    host: &dyn Host,
    desired: &Desired,
    placement: &Placement,
    ask: Ask,
    expected: &BTreeMap<String, SocketAddr>,
) -> Result<SiteObservation, HostError> {
    let attached: Vec<String> = site_attachments(desired.topology, placement)
        .into_iter()
        .map(|(network, _)| network)
        .collect();
    let early: Vec<(&String, &SocketAddr)> = expected
        .iter()
        .filter(|(name, _)| ask != Ask::No && desired.site_inside(name).is_none())
        .collect();
    let (out, early) = std::thread::scope(|scope| {
        let asked: Vec<_> = early
            .into_iter()
            .map(|(name, address)| {
                scope.spawn(move || {
                    (
                        name.clone(),
                        *address,
                        // A quick first look; a VM that is slow to answer is asked again
                        // as patiently as `ask` says, below.
                        Ask::Quickly.answers(host, *address),
                    )
                })
            })
            .collect();
        let out = host.run(&observe_script(&request(desired, placement)));
        let answers: Vec<(String, SocketAddr, bool)> = asked
            .into_iter()
            .map(|h| h.join().expect("a banner thread panicked"))
            .collect();
        (out, answers)
    });
    let out = out?;
    let mut observation = parse_observation(
        &String::from_utf8_lossy(&out.stdout),
        &desired.project_tag(),
    );
    observation.reached = true;
    if ask == Ask::No {
        return Ok(observation);
    }
    std::thread::scope(|scope| {
        for (name, instance) in observation.instances.iter_mut() {
            // A hypervisor VM farm looks into is asked by logging in (`observe_lab`).
            if desired.site_inside(name).is_some() {
                continue;
            }
            let Some(address) = instance
                .record
                .as_ref()
                .ok()
                .filter(|_| instance.pid.is_some())
                .and_then(|r| ssh_address(&r.spec, &attached))
            else {
                continue;
            };
            // An early "yes" stands; anything else is asked (again) now.
            if early
                .iter()
                .any(|(n, a, yes)| n == name && *a == address && *yes)
            {
                instance.answers = Some(true);
            } else {
                scope.spawn(move || instance.answers = Some(ask.answers(host, address)));
            }
        }
    });
    Ok(observation)
}

/// The ssh addresses farm's records here give for the VMs on `placement` that run
/// elsewhere than this machine (on this machine, asking costs nothing to wait for).
pub fn expected_addresses(
    state: &StatePaths,
    desired: &Desired,
    placement: &Placement,
) -> BTreeMap<String, SocketAddr> {
    if !desired.layout(placement).remote {
        return BTreeMap::new();
    }
    let attached: Vec<String> = site_attachments(desired.topology, placement)
        .into_iter()
        .map(|(network, _)| network)
        .collect();
    let records = state.records();
    desired
        .vms_on(placement)
        .into_iter()
        .filter_map(|vm| {
            let record = records.get(&vm.name)?;
            Some((vm.name.clone(), ssh_address(&record.spec, &attached)?))
        })
        .collect()
}

/// Where the instance's sshd is, seen from its site: its forwarded port, or its address
/// on a network the site attaches.
pub fn ssh_address(spec: &InstanceSpec, attached: &[String]) -> Option<SocketAddr> {
    if let Some(port) = spec.ssh_port() {
        return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    spec.vde_nics
        .iter()
        .filter(|n| attached.contains(&n.network))
        .find_map(|n| n.address.map(|a| SocketAddr::new(a.addr, 22)))
}

/// One observation of a whole lab, site by site.
struct Survey<'a> {
    desired: &'a Desired<'a>,
    sites: &'a Sites<'a>,
    state: &'a StatePaths,
    reporter: &'a Reporter,
    ask: Ask,
    found: Mutex<BTreeMap<Placement, SiteObservation>>,
    errors: Mutex<Vec<ObserveError>>,
}

impl Survey<'_> {
    /// Observes `placement`, then (in parallel) logs in to each of its hypervisor VMs that
    /// runs, which answers whether it answers ssh, and observes the site inside it.
    fn visit(&self, placement: Placement) {
        let desired = self.desired;
        let observed = self
            .sites
            .connect(&placement)
            .map_err(ObserveError::from)
            .and_then(|host| {
                let expected = expected_addresses(self.state, desired, &placement);
                Ok(observe_site(
                    host.as_ref(),
                    desired,
                    &placement,
                    self.ask,
                    &expected,
                )?)
            });
        let mut observation = match observed {
            Ok(observation) => observation,
            Err(ObserveError::Site(e @ SiteError::HostUnreachable { .. }))
                if self.ask == Ask::Quickly =>
            {
                self.reporter
                    .warn(format!("{e}\n(its VMs are shown as farm last knew them)"));
                from_local_records(self.state, desired, &placement)
            }
            Err(e) => {
                self.errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(e);
                return;
            }
        };
        let inside: Vec<(String, Placement)> = observation
            .instances
            .iter()
            .filter(|(_, i)| i.running())
            .filter_map(|(name, _)| Some((name.clone(), desired.site_inside(name)?)))
            .collect();
        let answered = crate::run::parallel::each(inside, |(vm, child)| {
            match self.sites.connect(&child) {
                Ok(_) => {
                    self.visit(child);
                    (vm, true)
                }
                // Not logged in to: the plan restarts it (it does not answer).
                Err(_) => (vm, false),
            }
        });
        for (vm, answers) in answered {
            if let Some(instance) = observation.instances.get_mut(&vm) {
                instance.answers = Some(answers);
            }
        }
        self.found
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(placement, observation);
    }
}

/// What is known of a site farm cannot reach: the records kept here, nothing running.
pub fn from_local_records(
    state: &StatePaths,
    desired: &Desired,
    placement: &Placement,
) -> SiteObservation {
    let records = state.records();
    let mut observation = SiteObservation::default();
    for vm in desired.topology.children(placement) {
        if let Some(record) = records.get(&vm.name) {
            observation.instances.insert(
                vm.name.clone(),
                ObservedInstance {
                    record: Ok::<InstanceRecord, String>(record.clone()),
                    pid: None,
                    answers: None,
                },
            );
        }
    }
    observation
}

/// Observes every site with selected VMs that can be observed: the hosts, and the site
/// inside every selected hypervisor VM that runs. A hypervisor VM that runs but cannot be
/// logged in to is reported and described from the records kept here; so is a remote host
/// that does not answer when only asking quickly (`status`), else that is an error (its VMs
/// may well run: `up` must not guess).
pub fn observe_lab(
    desired: &Desired,
    sites: &Sites,
    state: &StatePaths,
    reporter: &Reporter,
    ask: Ask,
) -> Result<BTreeMap<Placement, SiteObservation>, ObserveError> {
    let survey = Survey {
        desired,
        sites,
        state,
        reporter,
        ask,
        found: Mutex::new(BTreeMap::new()),
        errors: Mutex::new(Vec::new()),
    };
    std::thread::scope(|scope| {
        // Logging in to a hypervisor VM is the slowest part of looking at a running lab:
        // start it now for those farm's records say answered, while this machine is
        // observed (the connection is kept for when it is needed).
        let records = state.records();
        for vm in &desired.selected {
            if records.get(vm).is_some_and(|r| r.ready)
                && let Some(inside) = desired.site_inside(vm)
            {
                scope.spawn(move || drop(sites.connect(&inside)));
            }
        }
        for placement in desired.top_sites() {
            let survey = &survey;
            scope.spawn(move || survey.visit(placement));
        }
    });
    let Survey { found, errors, .. } = survey;
    if let Some(error) = errors.into_inner().unwrap_or_default().into_iter().next() {
        return Err(error);
    }
    let mut found = found.into_inner().unwrap_or_default();
    // Hypervisor VMs that do not run (or do not answer): their sites as farm left them.
    for vm in &desired.selected {
        if let Some(inside) = desired.site_inside(vm) {
            found
                .entry(inside.clone())
                .or_insert_with(|| from_local_records(state, desired, &inside));
        }
    }
    Ok(found)
}
