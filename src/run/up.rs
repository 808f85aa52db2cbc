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
use crate::model::lab::up_plan::{SitePlan, UpPlan, plan_up};
use crate::progress::Reporter;
use crate::project::Project;
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
        } = self
        else {
            return String::new();
        };
        let mut out = build.as_ref().map(ToString::to_string).unwrap_or_default();
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
    let failed = match up_once(project, state_root, options, reporter) {
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
    up_once(project, state_root, options, reporter)
}

/// Builds what is missing, then observes, plans and applies once.
fn up_once(
    project: &Project,
    state_root: &Path,
    options: &UpOptions,
    reporter: &Reporter,
) -> Result<UpOutcome, LabError> {
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

    let Some(state) = state else {
        return Ok(UpOutcome::Planned {
            build: planned_build,
            plan,
            playbooks: due,
        });
    };
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
    Ok(UpOutcome::Up(rows_from_specs(
        topology,
        &desired.selected,
        &specs,
        &state,
    )))
}
