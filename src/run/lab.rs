//! What `up`, `down` and `status` share: the lab's error, `up`'s options, which VMs a
//! command is about, what they plan with (`Desired`), and the ssh files written after
//! each. A leaf of `run/`: the commands import it, it imports none of them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::build::realise::RealiseOptions;
use crate::model::build::boot_watch::{BootFailure, BootFailureKind};
use crate::model::build::derivation::DrvId;
use crate::model::config::topology::{Placement, Topology};
use crate::model::lab::instance::InstanceSpec;
use crate::model::lab::up_plan::Desired;
use crate::project::Project;
use crate::run::instance::InstanceError;
use crate::run::observe::ObserveError;
use crate::run::site::SiteError;
use crate::run::state::{StateDir, StatePaths};
use crate::store::{Entry, Store};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{}", problems.join("\n"))]
    Plan { problems: Vec<String> },
    #[error("{}", boot_message(vm, failure))]
    Boot { vm: String, failure: BootFailure },
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
    #[error(transparent)]
    Cache(#[from] crate::binary_cache::BackendError),
    #[error(transparent)]
    Provision(#[from] crate::run::provision::ProvisionError),
    /// Saving, restoring or removing the converged snapshot failed (`run::converged`).
    #[error("{0}")]
    Converged(String),
}

/// A boot failure of `vm`, with where to read more.
fn boot_message(vm: &str, failure: &BootFailure) -> String {
    let more = match failure.kind {
        BootFailureKind::CloudInit { .. } => {
            format!("`farm ssh {vm}` and `cloud-init status --long` show more")
        }
        _ => format!("`farm logs {vm}` shows the whole console"),
    };
    failure.render(&format!("VM `{vm}`"), &more)
}

#[derive(Clone, Debug)]
pub struct UpOptions {
    /// VMs to bring up; empty means all.
    pub names: Vec<String>,
    pub dry_run: bool,
    pub realise: RealiseOptions,
    /// Which binary caches to ask before building.
    pub caches: crate::build::substitution::CacheChoice,
    /// How long a VM that restarts may take to power off before qemu is told to quit.
    pub stop_timeout: Duration,
    /// Boot the lab even when its converged snapshot could start it (`--boot`).
    pub boot: bool,
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

/// The ssh_config a dry run reaches what runs through, without writing to the state
/// directory: the one that exists, or, when there is none, one rendered in a temporary
/// directory (returned with it, to keep it until the dry run ends) so remote hosts are
/// reached.
pub fn dry_run_ssh_config(
    project: &Project,
    paths: &StatePaths,
) -> Result<(PathBuf, Option<tempfile::TempDir>), LabError> {
    let existing = paths.own_ssh_config();
    if existing.exists() {
        return Ok((existing, None));
    }
    let io_error = |path: PathBuf| move |source| crate::run::state::StateError::Io { path, source };
    let scratch = tempfile::tempdir().map_err(io_error(std::env::temp_dir()))?;
    let hosts = crate::run::ssh_files::ssh_hosts(
        project.project_dir(),
        &project.loaded.topology,
        paths,
        &BTreeMap::new(),
    );
    let config = scratch.path().join("ssh_config");
    let configs: Vec<_> = hosts.into_iter().map(|(h, _)| h).collect();
    fs_err::write(
        &config,
        crate::model::lab::ssh_config::render(&configs, None),
    )
    .map_err(io_error(config.clone()))?;
    Ok((config, Some(scratch)))
}

/// The first error of several (the others were reported as they happened).
pub(crate) fn first_error(results: Vec<Result<(), LabError>>) -> Result<(), LabError> {
    results
        .into_iter()
        .find_map(Result::err)
        .map_or(Ok(()), Err)
}

/// Writes what users reach the lab with: ssh_config, known_hosts and the Ansible inventory,
/// after every command that changes what runs (`up`, `down`, a restore), so none of them
/// describes an earlier lab or an earlier farm's format.
pub(crate) fn write_state_ssh_files(
    project: &Project,
    state: &StateDir,
    specs: &BTreeMap<String, InstanceSpec>,
) -> Result<(), LabError> {
    let hosts = crate::run::ssh_files::ssh_hosts(
        project.project_dir(),
        &project.loaded.topology,
        state,
        specs,
    );
    state.write_ssh_files(&hosts)?;
    let inventory = crate::run::provision::lab_inventory(project, state, false);
    Ok(state.write_inventory(&inventory.to_yaml())?)
}
