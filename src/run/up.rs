//! `farm up`: build what is missing, observe what runs, plan (`model::up_plan`), then apply
//! the plan. Sites are independent unless one is inside a VM of another: the hosts are
//! brought up in parallel, a site inside a hypervisor VM as soon as that VM answers ssh, and
//! each site's VMs in parallel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::build::realise::{RealiseOptions, human_bytes, present_hashes, realise};
use crate::model::derivation::DrvId;
use crate::model::instance::{InstanceRecord, InstanceSpec};
use crate::model::plan::plan_build;
use crate::model::qemu::ProcessTag;
use crate::model::topology::{Placement, Topology};
use crate::model::up_plan::{
    Basis, Desired, SitePlan, UpPlan, VmAction, VmStep, plan_site, plan_up,
};
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::host::Host;
use crate::run::instance::{self, InstanceError};
use crate::run::observe::{ObserveError, observe_lab, observe_site};
use crate::run::site::{SiteError, Sites};
use crate::run::state::{StateDir, StatePaths};
use crate::run::status::{VmStatus, rows_from_specs};
use crate::store::{Entry, Store};
use crate::sys::ssh::Ssh;

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{}", problems.join("\n"))]
    Plan { problems: Vec<String> },
    #[error(
        "VM `{vm}` did not answer ssh within {seconds} s ({reason})\nlast lines of its serial console:\n{serial}\nhint: `farm logs {vm}` shows the whole console"
    )]
    NoSsh {
        vm: String,
        seconds: u64,
        reason: String,
        serial: String,
    },
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    State(#[from] crate::run::state::StateError),
    #[error(transparent)]
    Build(#[from] crate::build::realise::BuildError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Host(#[from] crate::run::host::HostError),
    #[error(transparent)]
    Push(#[from] crate::run::closure::PushError),
    #[error(transparent)]
    Network(#[from] crate::run::vde::VdeError),
    #[error(transparent)]
    Site(#[from] SiteError),
    #[error(transparent)]
    Observe(#[from] ObserveError),
}

#[derive(Clone, Debug)]
pub struct UpOptions {
    /// VMs to bring up; empty means all.
    pub names: Vec<String>,
    pub dry_run: bool,
    pub realise: RealiseOptions,
    /// How long a VM that restarts may take to power off before qemu is told to quit.
    pub stop_timeout: Duration,
}

/// The project's state directory: `.farm/` beside farm.toml unless given.
pub fn state_dir_for(project: &Project, state: Option<&Path>) -> PathBuf {
    state
        .map(Path::to_path_buf)
        .unwrap_or_else(|| project.project_dir().join(".farm"))
}

/// The named VMs (all when none) and every hypervisor above them.
pub fn with_ancestors(topology: &Topology, names: &[String]) -> BTreeSet<String> {
    let mut wanted = BTreeSet::new();
    for vm in topology.vms.values() {
        if names.is_empty() || names.contains(&vm.name) {
            wanted.insert(vm.name.clone());
            for placement in topology.chain(&vm.name) {
                if let Placement::Vm(parent) = placement {
                    wanted.insert(parent);
                }
            }
        }
    }
    wanted
}

/// What `up` and `status` plan with, for the VMs in `selected`.
pub fn desired<'a>(
    project: &'a Project,
    selected: BTreeSet<String>,
    built: &BTreeMap<DrvId, Entry>,
    store: Option<&Store>,
    state: &StatePaths,
    accel: Option<crate::model::values::Accel>,
    store_dir: &Path,
) -> Result<Desired<'a>, crate::store::StoreError> {
    let layers = crate::run::layers::resolve(
        &project.graph,
        &project.loaded.topology,
        &selected,
        built,
        store,
    )?;
    Ok(Desired {
        config: &project.loaded.config,
        topology: &project.loaded.topology,
        selected,
        layers,
        accel,
        farm_key: state.farm_public_key(),
        local_state: state.root().to_path_buf(),
        local_store: store
            .map(|s| s.root().to_path_buf())
            .unwrap_or_else(|| std::path::absolute(store_dir).unwrap_or_default())
            .join("store"),
    })
}

/// Brings the selected VMs up; returns the status rows of all of them (none for a dry run,
/// which prints its plan and writes nothing).
pub fn up(
    project: &Project,
    state_root: &Path,
    options: &UpOptions,
    reporter: &Reporter,
) -> Result<Vec<VmStatus>, UpError> {
    let started = Instant::now();
    let topology = &project.loaded.topology;
    let selected = with_ancestors(topology, &options.names);

    // Build what is missing, for every level: layers are built here and pushed down.
    let wanted: Vec<DrvId> = topology
        .vms
        .values()
        .filter(|vm| selected.contains(&vm.name))
        .map(|vm| DrvId::Platform {
            platform: vm.platform.clone(),
            target: vm.target.clone(),
        })
        .collect();
    let existing = Store::open_existing(&project.store_dir)?;
    let (store, built) = if options.dry_run {
        let present = match &existing {
            Some(store) => present_hashes(store, project.graph.closure(&wanted))?,
            None => BTreeSet::new(),
        };
        let build_plan = plan_build(&project.loaded.config, &project.graph, &wanted, &present);
        if !build_plan.is_noop() {
            print!("{build_plan}");
        }
        (existing, BTreeMap::new())
    } else {
        let store = Store::open(&project.store_dir)?;
        let present = present_hashes(&store, project.graph.closure(&wanted))?;
        let build_plan = plan_build(&project.loaded.config, &project.graph, &wanted, &present);
        let built = realise(
            &project.loaded.config,
            &build_plan,
            &store,
            &options.realise,
            reporter,
        )?;
        (Some(store), built)
    };

    let paths = StatePaths::new(state_root);
    // A dry run only reads: it reaches what runs through the ssh_config that exists, and
    // remote hosts through one rendered in a temporary directory.
    let (state, scratch) = if options.dry_run {
        (
            None,
            Some(
                tempfile::tempdir().map_err(|source| crate::run::state::StateError::Io {
                    path: std::env::temp_dir(),
                    source,
                })?,
            ),
        )
    } else {
        let state = StateDir::open(state_root)?;
        state.farm_key()?;
        (Some(state), None)
    };
    let desired = desired(
        project,
        selected,
        &built,
        store.as_ref(),
        &paths,
        options.realise.accel,
        &project.store_dir,
    )?;
    let ssh_config = match (&state, &scratch) {
        (Some(state), _) => {
            write_state_ssh_files(project, state, &BTreeMap::new())?;
            state.ssh_config()
        }
        (None, Some(scratch)) if !paths.ssh_config().exists() => {
            let hosts = crate::run::ssh_files::ssh_hosts(
                project.project_dir(),
                topology,
                &paths,
                &BTreeMap::new(),
            );
            let config = scratch.path().join("ssh_config");
            let configs: Vec<_> = hosts.into_iter().map(|(h, _)| h).collect();
            fs_err::write(&config, crate::model::ssh_config::render(&configs)).map_err(
                |source| crate::run::state::StateError::Io {
                    path: config.clone(),
                    source,
                },
            )?;
            config
        }
        _ => paths.ssh_config(),
    };
    let sites = Sites::new(topology, &ssh_config);
    let observed = observe_lab(&desired, &sites, &paths, reporter, false)?;
    let plan = plan_up(&desired, &observed);

    let Some(state) = state else {
        print!("{}", plan.render());
        let problems = plan.problems();
        if !problems.is_empty() {
            return Err(UpError::Plan {
                problems: problems.into_iter().map(str::to_string).collect(),
            });
        }
        return Ok(Vec::new());
    };
    for site in &plan.sites {
        for warning in &site.warnings {
            reporter.warn(warning);
        }
    }
    let problems = plan.problems();
    if !problems.is_empty() {
        return Err(UpError::Plan {
            problems: problems.into_iter().map(str::to_string).collect(),
        });
    }
    if plan.changes() {
        for line in plan.summary().lines() {
            reporter.line(format!("{:>12} {line}", "plan"));
        }
    }

    let entries: BTreeMap<String, Entry> = built
        .values()
        .map(|e| (e.dir_name().to_string(), e.clone()))
        .collect();
    let apply = Apply {
        project,
        desired: &desired,
        state: &state,
        sites: &sites,
        entries: &entries,
        options,
        reporter,
        started,
        specs: Mutex::new(BTreeMap::new()),
    };
    let roots: Vec<&SitePlan> = plan
        .sites
        .iter()
        .filter(|s| matches!(s.placement, Placement::Host(_)))
        .collect();
    let results: Vec<Result<(), UpError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = roots
            .iter()
            .map(|site| {
                let apply = &apply;
                let plan = &plan;
                scope.spawn(move || apply.site(site, Some(plan)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a site thread panicked"))
            .collect()
    });
    first_error(results)?;
    let specs = apply.specs.into_inner().unwrap_or_else(|e| e.into_inner());
    write_state_ssh_files(project, &state, &specs)?;
    Ok(rows_from_specs(topology, &desired.selected, &specs, &state))
}

/// The first error of several (the others were reported as they happened).
fn first_error(results: Vec<Result<(), UpError>>) -> Result<(), UpError> {
    results
        .into_iter()
        .find_map(Result::err)
        .map_or(Ok(()), Err)
}

pub(crate) fn write_state_ssh_files(
    project: &Project,
    state: &StateDir,
    specs: &BTreeMap<String, InstanceSpec>,
) -> Result<(), UpError> {
    let hosts = crate::run::ssh_files::ssh_hosts(
        project.project_dir(),
        &project.loaded.topology,
        state,
        specs,
    );
    Ok(state.write_ssh_files(&hosts)?)
}

/// What applying the plan shares across sites and threads.
struct Apply<'a> {
    project: &'a Project,
    desired: &'a Desired<'a>,
    state: &'a StateDir,
    sites: &'a Sites<'a>,
    /// Local store entries by directory name, for pushes.
    entries: &'a BTreeMap<String, Entry>,
    options: &'a UpOptions,
    reporter: &'a Reporter,
    started: Instant,
    /// The spec of every VM brought up (or kept), for ssh_config and the status table.
    specs: Mutex<BTreeMap<String, InstanceSpec>>,
}

impl Apply<'_> {
    /// Applies one site's plan. `whole` is the plan it came from while that plan still
    /// describes what runs (its hypervisor was kept); a site whose hypervisor (re)started is
    /// observed and planned again here.
    fn site(&self, site: &SitePlan, whole: Option<&UpPlan>) -> Result<(), UpError> {
        if !site.problems.is_empty() {
            return Err(UpError::Plan {
                problems: site.problems.clone(),
            });
        }
        let host = self.sites.connect(&site.placement)?;
        let host = host.as_ref();
        crate::run::vde::check_netdev(host, &site.check_vde)?;
        self.push(host, site)?;
        for step in site
            .networks
            .iter()
            .filter(|n| n.start_switch || n.start_tap)
        {
            let tag = ProcessTag::network(&self.desired.project_tag(), &step.network.name);
            crate::run::vde::ensure_up(host, &site.layout.state_dir, &step.network, &tag)?;
            let attach = step
                .network
                .attach
                .map(|a| {
                    format!(
                        ", {a} on tap {}",
                        step.network.tap_name(&site.layout.state_dir)
                    )
                })
                .unwrap_or_default();
            self.reporter.status(
                "network",
                format!(
                    "{} on {} ({}{attach})",
                    step.network.name,
                    host.name(),
                    step.network.plug(&site.layout.state_dir)
                ),
            );
        }
        self.stop_changed(host, site)?;
        {
            let mut specs = self.specs.lock().unwrap_or_else(|e| e.into_inner());
            for step in &site.vms {
                // Its host key is pinned in known_hosts before it first boots.
                if step.action != VmAction::Keep {
                    self.state.host_key(&step.name)?;
                }
                specs.insert(step.name.clone(), step.spec.clone());
            }
            write_state_ssh_files(self.project, self.state, &specs)?;
        }
        let results: Vec<Result<(), UpError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = site
                .vms
                .iter()
                .map(|step| scope.spawn(move || self.vm(host, site, step, whole)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a VM thread panicked"))
                .collect()
        });
        first_error(results)
    }

    fn push(&self, host: &dyn Host, site: &SitePlan) -> Result<(), UpError> {
        if site.push.is_empty() {
            return Ok(());
        }
        let needed: Vec<&Entry> = site
            .push
            .iter()
            .filter_map(|name| self.entries.get(name))
            .collect();
        let store = crate::run::closure::HostStore::new(
            site.layout
                .store_entries
                .parent()
                .unwrap_or(&site.layout.store_entries),
        );
        let pushed = crate::run::closure::push_closure(host, &store, &needed, self.reporter)?;
        if !pushed.pushed.is_empty() {
            self.reporter.status(
                "pushed",
                format!(
                    "{} layer(s) to {} ({}, {:.1} s; {} already there)",
                    pushed.pushed.len(),
                    host.name(),
                    human_bytes(pushed.bytes),
                    pushed.elapsed.as_secs_f64(),
                    pushed.present
                ),
            );
        }
        Ok(())
    }

    /// Stops, in parallel, the VMs that restart or are replaced (before anything starts:
    /// their ports may go to others), and removes the replaced ones.
    fn stop_changed(&self, host: &dyn Host, site: &SitePlan) -> Result<(), UpError> {
        let results: Vec<Result<(), UpError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = site
                .vms
                .iter()
                .filter(|s| matches!(s.action, VmAction::Restart | VmAction::Replace))
                .map(|step| {
                    scope.spawn(move || -> Result<(), UpError> {
                        if step.running.is_some() {
                            let verb = match step.action {
                                VmAction::Replace => "replacing",
                                _ => "restarting",
                            };
                            self.reporter
                                .status(verb, format!("{} ({})", step.name, reasons(step)));
                            let how = self.stop(host, &step.spec, step.previous.as_ref())?;
                            self.reporter
                                .status("stopped", format!("{} ({how})", step.name));
                        }
                        if step.action == VmAction::Replace {
                            instance::remove(host, &step.spec.paths, &step.name)?;
                            self.state.remove_instance(&step.name)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a VM thread panicked"))
                .collect()
        });
        first_error(results)
    }

    /// Powers a VM off (where it was last started from, when its paths changed).
    fn stop(
        &self,
        host: &dyn Host,
        spec: &InstanceSpec,
        previous: Option<&InstanceSpec>,
    ) -> Result<instance::Stopped, UpError> {
        let paths = previous.map_or(&spec.paths, |p| &p.paths);
        let config = self.sites.ssh_config().to_path_buf();
        let name = spec.name.clone();
        let poweroff = move || ssh_poweroff(&config, &name);
        Ok(instance::stop(
            host,
            paths,
            &spec.name,
            self.options.stop_timeout,
            Some(&poweroff),
        )?)
    }

    /// Brings one VM to its planned state and waits for ssh; then the site inside it.
    fn vm(
        &self,
        host: &dyn Host,
        site: &SitePlan,
        step: &VmStep,
        whole: Option<&UpPlan>,
    ) -> Result<(), UpError> {
        let name = &step.name;
        let spec = &step.spec;
        match step.action {
            VmAction::Keep if step.ready => {}
            VmAction::Keep => self.wait_or_restart(host, site, step)?,
            VmAction::Create | VmAction::Replace => {
                self.reporter
                    .status("starting", format!("{name} ({})", reasons(step)));
                let key = self.state.host_key(name)?;
                let record = instance::create(host, spec, (key.private, key.public))?;
                self.save_mirror(site, &record)?;
                instance::start(host, spec)?;
                self.wait_ready(host, site, record)?;
            }
            VmAction::Restart => {
                if step.running.is_none() {
                    self.reporter
                        .status("restarting", format!("{name} ({})", reasons(step)));
                }
                self.restart(host, site, step)?;
            }
        }
        let Some(inside) = self.desired.site_inside(name) else {
            return Ok(());
        };
        let planned = whole
            .filter(|_| step.action == VmAction::Keep)
            .and_then(|plan| plan.site(&inside))
            .filter(|s| s.basis == Basis::Observed);
        match planned {
            Some(child) => self.site(child, whole),
            None => {
                // It (re)started: what runs inside it is seen only now.
                self.sites.forget(&inside);
                let inner = self.sites.connect(&inside)?;
                let observed = observe_site(inner.as_ref(), self.desired, &inside, true)?;
                let child = plan_site(self.desired, &inside, &observed, Basis::Observed);
                if child.changes() {
                    let summary = UpPlan {
                        sites: vec![child.clone()],
                    }
                    .summary();
                    for line in summary.lines() {
                        self.reporter.status("plan", line);
                    }
                }
                self.site(&child, None)
            }
        }
    }

    /// Restarts a VM on its overlay with its new spec and waits for ssh.
    fn restart(&self, host: &dyn Host, site: &SitePlan, step: &VmStep) -> Result<(), UpError> {
        let key = self.state.host_key(&step.name)?;
        let record = instance::prepare_restart(
            host,
            &step.spec,
            step.grows_to(),
            step.rebase(),
            (key.private, key.public),
        )?;
        self.save_mirror(site, &record)?;
        instance::start(host, &step.spec)?;
        self.wait_ready(host, site, record)
    }

    /// A kept VM that has not answered ssh since it started: waited for, restarted once if
    /// it does not answer, then given up on with its console's tail.
    fn wait_or_restart(
        &self,
        host: &dyn Host,
        site: &SitePlan,
        step: &VmStep,
    ) -> Result<(), UpError> {
        let record = InstanceRecord {
            ready: false,
            ..InstanceRecord::new(step.spec.clone())
        };
        match self.wait_ready(host, site, record) {
            Ok(()) => Ok(()),
            Err(UpError::NoSsh { reason, .. }) => {
                self.reporter.status(
                    "restarting",
                    format!("{} (it did not answer ssh: {reason})", step.name),
                );
                let how = self.stop(host, &step.spec, None)?;
                self.reporter
                    .status("stopped", format!("{} ({how})", step.name));
                self.restart(host, site, step)
            }
            Err(other) => Err(other),
        }
    }

    /// Waits until the VM answers ssh through the generated ssh_config, then records it as
    /// ready.
    fn wait_ready(
        &self,
        host: &dyn Host,
        site: &SitePlan,
        mut record: InstanceRecord,
    ) -> Result<(), UpError> {
        let spec = record.spec.clone();
        let timeout = self.options.realise.boot_timeout;
        let spinner = self.reporter.spinner(&spec.name, "waiting for ssh");
        let deadline = Instant::now() + timeout;
        let waited = Ssh::wait_for(self.sites.ssh_config(), &spec.name, deadline, || {
            match instance::is_running(host, &spec.paths, &spec.name) {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!(
                    "qemu is not running; {}",
                    host_tail(host, &spec.paths.stderr_log(), 5)
                )),
                Err(e) => Err(e.to_string()),
            }
        });
        spinner.finish_and_clear();
        if let Err(e) = waited {
            return Err(UpError::NoSsh {
                vm: spec.name.clone(),
                seconds: timeout.as_secs(),
                reason: e.to_string(),
                serial: host_tail(host, &spec.paths.serial_log(), 25),
            });
        }
        record.ready = true;
        instance::save(host, &record)?;
        self.save_mirror(site, &record)?;
        self.reporter.status(
            "ready",
            format!(
                "{} (ssh after {:.0} s)",
                spec.name,
                self.started.elapsed().as_secs_f64()
            ),
        );
        Ok(())
    }

    /// For a VM on another site: the copy of its record kept here.
    fn save_mirror(&self, site: &SitePlan, record: &InstanceRecord) -> Result<(), UpError> {
        if site.layout.remote {
            self.state.save_record(record)?;
        }
        Ok(())
    }
}

fn reasons(step: &VmStep) -> String {
    step.reasons
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// `poweroff` in the guest over ssh: minimal guests (Debian minbase, farm's tiny image) have
/// no ACPI daemon to act on QMP's power-down.
pub fn ssh_poweroff(ssh_config: &Path, name: &str) {
    let _ = std::process::Command::new("timeout")
        .args(["10", "ssh", "-F"])
        .arg(ssh_config)
        .args(["-o", "ConnectTimeout=5", name, "poweroff"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// The last lines of a log on whichever host has it.
pub fn host_tail(host: &dyn Host, path: &Path, lines: usize) -> String {
    match host.get(path) {
        Ok(Some(bytes)) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Ok(None) => format!("(no `{}` on {})", path.display(), host.name()),
        Err(e) => format!("(cannot read `{}`: {e})", path.display()),
    }
}
