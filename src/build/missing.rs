//! Building what a command needs and the store lacks, the one way `farm build` and `farm up`
//! do it: the plan against the store and the binary caches (`plan_missing`), realised, the
//! project registered with the store as a gc root (`build_missing`). `farm build` then
//! records the outputs in farm.lock, or with `--locked` compares them to it
//! (`build_and_lock`).
//!
//! The functions fail with the caller's own error type, which takes each error they can
//! end in (the store's, the caches', the build's, the lock file's), as `run::lab::LabError`
//! and `anyhow::Error` do: a command keeps its one error type and its exit codes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::binary_cache::BackendError;
use crate::build::realise::{BuildError, RealiseOptions, present_hashes, realise};
use crate::build::substitution::{CacheChoice, Substitution, plan_with_caches};
use crate::model::build::derivation::{DrvId, DrvNode};
use crate::model::build::lock::{self, LockFile, OutputDiffers};
use crate::model::build::plan::BuildPlan;
use crate::model::hash::ContentHash;
use crate::progress::Reporter;
use crate::project::Project;
use crate::project::lockfile::LockFileError;
use crate::store::{Entry, Store, StoreError};

/// What `build_missing` planned and the store entry of every derivation of that plan.
#[derive(Debug)]
pub struct Built {
    pub plan: BuildPlan,
    pub entries: BTreeMap<DrvId, Entry>,
}

/// What became of farm.lock after a build.
#[derive(Debug, PartialEq, Eq)]
pub enum LockOutcome {
    /// farm.lock was written: it records the outputs now.
    Written(PathBuf),
    /// farm.lock already said exactly that, and was left as it was.
    Unchanged,
    /// `--locked`: farm.lock is kept as it is; these outputs, built from locked
    /// derivations, differ from what it records.
    Kept { differs: Vec<OutputDiffers> },
}

/// The plan for `wanted` against `store` (none yet: everything is to be built) and the
/// caches `caches` names; the caches' offers come with it, for `realise` to fetch.
pub fn plan_missing<E>(
    project: &Project,
    store: Option<&Store>,
    wanted: &[DrvId],
    caches: &CacheChoice,
    reporter: &Reporter,
) -> Result<(BuildPlan, Option<Arc<Substitution>>), E>
where
    E: From<StoreError> + From<BackendError>,
{
    let present = match store {
        Some(store) => present_hashes(store, project.graph.closure(wanted))?,
        None => BTreeSet::new(),
    };
    Ok(plan_with_caches(
        project, wanted, &present, caches, reporter,
    )?)
}

/// Plans `wanted` (`plan_missing`), realises the plan into `store` and registers the
/// project, with its state directory `state_dir`, as one of the store's gc roots. The
/// caller holds the store in shared use (`Store::use_shared`) until it is done with the entries.
pub fn build_missing<E>(
    project: &Project,
    store: &Store,
    wanted: &[DrvId],
    caches: &CacheChoice,
    options: &RealiseOptions,
    state_dir: &Path,
    reporter: &Reporter,
) -> Result<Built, E>
where
    E: From<StoreError> + From<BackendError> + From<BuildError>,
{
    let (plan, substitution) = plan_missing::<E>(project, Some(store), wanted, caches, reporter)?;
    let options = RealiseOptions {
        substitution,
        ..options.clone()
    };
    let entries = realise(&project.loaded.config, &plan, store, &options, reporter)?;
    project.register_root(store, state_dir)?;
    Ok(Built { plan, entries })
}

/// `farm build`: `build_missing`, then farm.lock records every output the store has; or,
/// with `locked` (the lock `Project::check_locked` accepted), the lock is kept and the
/// outputs that differ from it are returned.
#[allow(clippy::too_many_arguments)]
pub fn build_and_lock<E>(
    project: &Project,
    store: &Store,
    wanted: &[DrvId],
    caches: &CacheChoice,
    options: &RealiseOptions,
    state_dir: &Path,
    locked: Option<&LockFile>,
    reporter: &Reporter,
) -> Result<(Built, LockOutcome), E>
where
    E: From<StoreError> + From<BackendError> + From<BuildError> + From<LockFileError>,
{
    let built = build_missing::<E>(project, store, wanted, caches, options, state_dir, reporter)?;
    let output_of = |node: &DrvNode| -> Option<ContentHash> {
        store
            .lookup(&node.hash, &node.name)
            .ok()
            .flatten()
            .map(|e| e.meta.output_blake3)
    };
    let outcome = match locked {
        Some(lock) => LockOutcome::Kept {
            differs: lock::outputs_differ(
                lock,
                built.plan.steps.iter().map(|s| &s.node),
                output_of,
            ),
        },
        None => {
            let old = project.read_lock()?;
            let new = lock::updated(old.as_ref(), project.graph.all(), output_of);
            match project.write_lock(&new)? {
                true => LockOutcome::Written(project.lock_path()),
                false => LockOutcome::Unchanged,
            }
        }
    };
    Ok((built, outcome))
}
