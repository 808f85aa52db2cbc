//! Observing a lab before planning: one script per site (`model::observation`), then, for
//! each instance that runs, whether its sshd answers. Sites inside hypervisor VMs are
//! observed when those VMs run; sites are observed in parallel. Nothing is written.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use crate::model::instance::{InstanceRecord, InstanceSpec};
use crate::model::network::site_attachments;
use crate::model::observation::{
    NetworkProbe, ObserveRequest, ObservedInstance, SiteObservation, observe_script,
    parse_observation,
};
use crate::model::topology::Placement;
use crate::model::up_plan::Desired;
use crate::progress::Reporter;
use crate::run::host::{Host, HostError};
use crate::run::site::{SiteError, Sites};
use crate::run::state::StatePaths;

/// How long an sshd may take to send its banner.
const BANNER_TIMEOUT: Duration = Duration::from_secs(3);

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
                    switch: (n.backend == crate::model::network::VdeBackend::Switch).then(|| {
                        (
                            dir.join("switch.pid"),
                            n.control_dir(&layout.state_dir).display().to_string(),
                        )
                    }),
                    tap: n.attach.map(|_| {
                        (
                            dir.join("tap.pid"),
                            format!("tap://{}", n.tap_name(&layout.state_dir)),
                        )
                    }),
                }
            })
            .collect(),
    }
}

/// Runs the observation on one site, then (with `ask_ssh`) asks every running instance's
/// sshd for its banner, in parallel.
pub fn observe_site(
    host: &dyn Host,
    desired: &Desired,
    placement: &Placement,
    ask_ssh: bool,
) -> Result<SiteObservation, HostError> {
    let out = host.run(&observe_script(&request(desired, placement)))?;
    let mut observation = parse_observation(&String::from_utf8_lossy(&out.stdout));
    observation.reached = true;
    if !ask_ssh {
        return Ok(observation);
    }
    let attached: Vec<String> = site_attachments(desired.topology, placement)
        .into_iter()
        .map(|(network, _)| network)
        .collect();
    std::thread::scope(|scope| {
        for instance in observation.instances.values_mut() {
            let Some(address) = instance
                .record
                .as_ref()
                .ok()
                .filter(|_| instance.pid.is_some())
                .and_then(|r| ssh_address(&r.spec, &attached))
            else {
                continue;
            };
            scope.spawn(move || instance.answers = Some(host.ssh_answers(address, BANNER_TIMEOUT)));
        }
    });
    Ok(observation)
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
    tolerant: bool,
    found: Mutex<BTreeMap<Placement, SiteObservation>>,
    errors: Mutex<Vec<ObserveError>>,
}

impl Survey<'_> {
    /// Observes `placement`, then (in parallel) the site inside each of its hypervisor VMs
    /// that runs and answers.
    fn visit(&self, placement: Placement) {
        let desired = self.desired;
        let observed = self
            .sites
            .connect(&placement)
            .map_err(ObserveError::from)
            .and_then(|host| Ok(observe_site(host.as_ref(), desired, &placement, true)?));
        let observation = match observed {
            Ok(observation) => observation,
            Err(ObserveError::Site(e @ SiteError::VmUnreachable { .. })) => {
                self.reporter.warn(e.to_string());
                from_local_records(self.state, desired, &placement)
            }
            Err(ObserveError::Site(e @ SiteError::HostUnreachable { .. })) if self.tolerant => {
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
        let inside: Vec<Placement> = observation
            .instances
            .iter()
            .filter(|(_, i)| i.running() && i.answers != Some(false))
            .filter_map(|(name, _)| desired.site_inside(name))
            .collect();
        self.found
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(placement, observation);
        std::thread::scope(|scope| {
            for child in inside {
                scope.spawn(move || self.visit(child));
            }
        });
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
/// that does not answer when `tolerant` (`status`), else that is an error (its VMs may well
/// run: `up` and `down` must not guess).
pub fn observe_lab(
    desired: &Desired,
    sites: &Sites,
    state: &StatePaths,
    reporter: &Reporter,
    tolerant: bool,
) -> Result<BTreeMap<Placement, SiteObservation>, ObserveError> {
    let survey = Survey {
        desired,
        sites,
        state,
        reporter,
        tolerant,
        found: Mutex::new(BTreeMap::new()),
        errors: Mutex::new(Vec::new()),
    };
    std::thread::scope(|scope| {
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
