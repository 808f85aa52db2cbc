//! `farm up`: build what is missing, observe what runs, plan (`model::up_plan`), then apply
//! the plan. Sites are independent unless one is inside a VM of another: the hosts are
//! brought up in parallel, a site inside a hypervisor VM as soon as that VM answers ssh, and
//! each site's VMs in parallel.

use std::collections::BTreeMap;
use std::path::Path;

use crate::build::missing::{build_missing, plan_missing};
use crate::model::build::derivation::DrvId;
use crate::model::build::plan::BuildPlan;
use crate::model::config::topology::Placement;
use crate::model::lab::converged::{CONVERGED, from_nothing};
use crate::model::lab::up_plan::{Desired, SitePlan, UpPlan, plan_up};
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::converged::Found;
use crate::run::lab::{
    LabError, UpOptions, desired, dry_run_ssh_config, first_error, with_ancestors,
    write_state_ssh_files,
};
use crate::run::observe::{Ask, observe_lab};
use crate::run::provision::Due;
use crate::run::site::Sites;
use crate::run::state::{StateDir, StatePaths};
use crate::run::status::{VmStatus, rows_from_specs};
use crate::store::{Entry, Store};

/// What `up` did, or would do.
#[derive(Debug)]
pub enum UpOutcome {
    /// A dry run, which wrote nothing: what would be built (when anything), the plan, and
    /// the playbooks due once the lab is up.
    Planned {
        build: Option<BuildPlan>,
        plan: UpPlan,
        playbooks: Vec<Due>,
        /// The lab would start from its converged snapshot (`[lab] converged_snapshot`)
        /// rather than boot as `plan` says.
        from_snapshot: bool,
    },
    /// The status rows of the VMs brought up.
    Up(Vec<VmStatus>),
}

impl UpOutcome {
    /// The plan's problems as the error `up` would have stopped on, after a dry run showed
    /// them in its plan.
    pub fn refusal(&self) -> Option<LabError> {
        let UpOutcome::Planned { plan, .. } = self else {
            return None;
        };
        let problems = plan.problems();
        (!problems.is_empty()).then(|| LabError::Plan {
            problems: problems.into_iter().map(str::to_string).collect(),
        })
    }

    /// A dry run's outcome as it is printed.
    pub fn render_plan(&self) -> String {
        let UpOutcome::Planned {
            build,
            plan,
            playbooks,
            from_snapshot,
        } = self
        else {
            return String::new();
        };
        let mut out = build.as_ref().map(ToString::to_string).unwrap_or_default();
        if *from_snapshot {
            out.push_str(&format!(
                "start from snapshot {CONVERGED}: the lab converged from the same farm.toml, layers and playbooks (`--boot` boots it instead, as below)\n"
            ));
        }
        out.push_str(&plan.render());
        for due in playbooks {
            out.push_str(&format!(
                "playbook {} on {} ({}, after the lab is up)\n",
                due.playbook.display(),
                due.vm,
                due.reason
            ));
        }
        out
    }
}

/// Brings the selected VMs up, or plans it (a dry run, which writes nothing).
pub fn up(
    project: &Project,
    state_root: &Path,
    options: &UpOptions,
    reporter: &Reporter,
) -> Result<UpOutcome, LabError> {
    let start = if options.boot {
        Start::Boot
    } else {
        Start::Consider
    };
    let failed = match up_from(project, state_root, options, start, reporter) {
        Err(e) if !options.dry_run => e,
        done => return done,
    };
    // A hypervisor VM that died under its guests is restarted with them, once.
    let topology = &project.loaded.topology;
    let selected = with_ancestors(topology, &options.names);
    let paths = StatePaths::new(state_root);
    let panicked = crate::run::recover::panicked_hypervisors(topology, &selected, &paths);
    if panicked.is_empty() {
        return Err(failed);
    }
    for dead in &panicked {
        reporter.warn(format!(
            "{vm}: its kernel panicked while `up` ran, and `up` failed: {what}\nits console:\n{console}\n{vm} is stopped, and `up` converges once more: it restarts, with the VMs inside it",
            vm = dead.vm,
            what = failed.to_string().lines().next().unwrap_or_default(),
            console = dead.console,
        ));
        dead.stop()?;
    }
    up_from(project, state_root, options, Start::Boot, reporter)
}

/// `up_once` until the lab is up: restored from its converged snapshot when it may be, and
/// booted when that fails or the restored lab turns out not to be what farm.toml makes.
fn up_from(
    project: &Project,
    state_root: &Path,
    options: &UpOptions,
    mut start: Start,
    reporter: &Reporter,
) -> Result<UpOutcome, LabError> {
    loop {
        start = match up_once(project, state_root, options, start, reporter)? {
            Next::Done(outcome) => return Ok(outcome),
            Next::Restore => {
                match crate::run::snapshot::restore(project, state_root, CONVERGED, reporter) {
                    Ok(_) => Start::Restored,
                    Err(e) => {
                        reporter.warn(format!(
                            "The lab did not start from its snapshot `{CONVERGED}`, so it boots: {e}"
                        ));
                        Start::Boot
                    }
                }
            }
            Next::Outdated => {
                crate::run::down::down(
                    project,
                    state_root,
                    &[],
                    false,
                    options.stop_timeout,
                    false,
                    reporter,
                )?;
                crate::run::converged::remove(project, state_root)
                    .map_err(|e| LabError::Converged(e.to_string()))?;
                Start::Boot
            }
        };
    }
}

/// What one pass of `up` left to do.
enum Next {
    Done(UpOutcome),
    /// Start the lab from its converged snapshot, then look again.
    Restore,
    /// The restored lab is not what farm.toml makes now: stop it, remove the snapshot, boot.
    Outdated,
}

/// How an `up` treats the lab's converged snapshot, when farm.toml keeps one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// Start from it when the whole lab is down and it is current.
    Consider,
    /// It was just restored: what is left to do says whether it really was current.
    Restored,
    /// Boot (`--boot`, or the snapshot failed to load or was out of date).
    Boot,
}

/// Builds what is missing, then observes, plans and applies once (or starts the lab from
/// its converged snapshot, and checks that nothing is left to do).
fn up_once(
    project: &Project,
    state_root: &Path,
    options: &UpOptions,
    start: Start,
    reporter: &Reporter,
) -> Result<Next, LabError> {
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
    let paths = StatePaths::new(state_root);
    // A playbook that cannot run is refused before anything is built or started.
    let due = crate::run::provision::due(project, &paths, &selected)?;
    if !options.dry_run {
        crate::run::provision::check_ansible(&due)?;
    }
    let existing = Store::open_existing(&project.store_dir)?;
    let mut planned_build = None;
    let (store, built, _store_use) = if options.dry_run {
        let (build_plan, _) = plan_missing::<LabError>(
            project,
            existing.as_ref(),
            &wanted,
            &options.caches,
            reporter,
        )?;
        planned_build = (!build_plan.is_noop()).then_some(build_plan);
        (existing, BTreeMap::new(), None)
    } else {
        let store = Store::open(&project.store_dir)?;
        // Held until up returns: gc waits rather than remove a layer about to boot.
        let store_use = store.use_shared(reporter)?;
        let built = build_missing::<LabError>(
            project,
            &store,
            &wanted,
            &options.caches,
            &options.realise,
            state_root,
            reporter,
        )?;
        (Some(store), built.entries, Some(store_use))
    };

    let state = if options.dry_run {
        None
    } else {
        let state = StateDir::open(state_root)?;
        state.farm_key()?;
        Some(state)
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
    // A dry run only reads: it reaches what runs through the ssh_config that exists, and
    // remote hosts through one rendered in a temporary directory.
    let (ssh_config, _scratch) = match &state {
        Some(state) => {
            write_state_ssh_files(project, state, &BTreeMap::new())?;
            (state.own_ssh_config(), None)
        }
        None => dry_run_ssh_config(project, &paths)?,
    };
    let sites = Sites::new(topology, &ssh_config);
    let observed = observe_lab(&desired, &sites, &paths, reporter, Ask::Carefully)?;
    let plan = plan_up(&desired, &observed);
    // The converged snapshot: kept for the whole lab only, and only by an up from nothing.
    let converged = (project.loaded.config.lab.converged_snapshot
        && options.names.is_empty()
        && from_nothing(&plan))
    .then(|| converged_key(&desired, project))
    .transpose()?;
    let found = converged.as_deref().map_or(Found::None, |key| {
        crate::run::converged::find(state_root, key)
    });

    let Some(state) = state else {
        return Ok(Next::Done(UpOutcome::Planned {
            build: planned_build,
            plan,
            playbooks: due,
            from_snapshot: found == Found::Current && start == Start::Consider,
        }));
    };
    if found == Found::Current && start == Start::Consider {
        return Ok(Next::Restore);
    }
    if start == Start::Restored && (plan.changes() || !due.is_empty()) {
        // Its key missed a difference: the restored lab is not what farm.toml makes now.
        reporter.warn(format!(
            "The lab restored from snapshot `{CONVERGED}` is not what farm.toml makes now:\n{}\nso the snapshot is removed and the lab boots",
            plan.summary().trim_end()
        ));
        return Ok(Next::Outdated);
    }
    if found == Found::Users {
        reporter.warn(format!(
            "A snapshot `{CONVERGED}` that farm did not save is there, so `up` does not keep one of its own\nhint: `farm snapshot rm {CONVERGED}`, or save yours again under another name"
        ));
    }
    let save = converged
        .filter(|_| found != Found::Users)
        .map(|key| (key, found));
    for site in &plan.sites {
        for warning in &site.warnings {
            reporter.warn(warning);
        }
    }
    let problems = plan.problems();
    if !problems.is_empty() {
        return Err(LabError::Plan {
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
    let apply = crate::run::apply::Apply {
        project,
        desired: &desired,
        state: &state,
        sites: &sites,
        entries: &entries,
        options,
        reporter,
        specs: std::sync::Mutex::new(BTreeMap::new()),
        resumed: std::sync::Mutex::new(std::collections::BTreeSet::new()),
    };
    let roots: Vec<&SitePlan> = plan
        .sites
        .iter()
        .filter(|s| matches!(s.placement, Placement::Host(_)))
        .collect();
    let results = crate::run::parallel::each(roots, |site| apply.site(site, Some(&plan)));
    first_error(results)?;
    let specs = apply.specs.into_inner().unwrap_or_else(|e| e.into_inner());
    write_state_ssh_files(project, &state, &specs)?;
    // Replaced VMs lost their markers while the plan was applied: asked again.
    let due = crate::run::provision::due(project, &state, &desired.selected)?;
    crate::run::provision::apply(project, &state, &due, reporter)?;
    let rows = rows_from_specs(topology, &desired.selected, &specs, &state);
    if let Some((key, found)) = save {
        // Saving locks the state directory itself.
        drop(state);
        save_converged(project, state_root, &key, found, reporter)?;
    }
    Ok(Next::Done(UpOutcome::Up(rows)))
}

/// Saves the lab `up` just converged from nothing as its converged snapshot, in place of
/// the one `found` (of another lab, or this one's when `--boot` booted it).
fn save_converged(
    project: &Project,
    state_root: &Path,
    key: &str,
    found: Found,
    reporter: &Reporter,
) -> Result<(), LabError> {
    let failed = |e: crate::run::snapshot::SnapshotError| {
        LabError::Converged(format!(
            "The lab is up, but its snapshot `{CONVERGED}` was not saved: {e}"
        ))
    };
    if found != Found::None {
        crate::run::converged::remove(project, state_root).map_err(failed)?;
    }
    crate::run::converged::save(project, state_root, key, reporter).map_err(failed)
}

/// The converged snapshot's key for the lab `desired` describes: its layers and
/// declarations, and each VM's playbook as it is now.
fn converged_key(desired: &Desired<'_>, project: &Project) -> Result<String, LabError> {
    let mut playbooks = BTreeMap::new();
    for vm in project.loaded.topology.vms.values() {
        if let Some(playbook) = &vm.playbook {
            let hash = crate::run::provision::content_hash(playbook)?;
            playbooks.insert(vm.name.clone(), hash.to_string());
        }
    }
    Ok(crate::model::lab::converged::converged_key(
        desired,
        &playbooks,
        env!("CARGO_PKG_VERSION"),
    ))
}
