//! Applying a build plan: each missing derivation is realised into a staging directory and
//! committed to the store under its lock, parents first.
//!
//! Concurrency: two farm processes realising the same derivation serialise on the entry's
//! lock; the second finds the entry committed and does nothing. A crash leaves only a
//! staging directory, which the next `stage` of the same key removes.

use std::collections::BTreeMap;

use super::context::{Ancestry, Context};
pub use super::context::{
    BuildError, DEFAULT_BOOT_TIMEOUT_SECS, DEFAULT_FETCH_ATTEMPTS, RealiseOptions,
};
use super::produce::{lookup, realise_one};
use crate::build::layer::BootFiles;
use crate::model::build::derivation::{DrvId, DrvNode};
use crate::model::build::plan::{Action, BuildPlan};
use crate::model::config::Config;
use crate::model::hash::DrvHash;
use crate::progress::Reporter;
use crate::store::{Entry, Store};

/// How many derivations to build at once when not told: one per core, as long as memory
/// holds a build VM (up to 2 GiB) for each.
pub fn default_jobs() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let by_memory = crate::sys::hostinfo::memory_available()
        .map_or(cores as u64, |bytes| bytes / (2 << 30)) as usize;
    cores.min(by_memory).max(1)
}

/// Realises `plan`, up to `options.jobs` derivations at once, each as soon as its parent is
/// in the store; returns the store entry of every derivation. The first failure stops new
/// work; what is already running finishes (its entry is committed or discarded whole).
///
/// A derivation substituted from a cache whose parent is being substituted too starts
/// downloading at once and waits for the parent only to commit: a chain arrives at the
/// speed of the link, not link plus every parent's commit.
pub fn realise(
    config: &Config,
    plan: &BuildPlan,
    store: &Store,
    options: &RealiseOptions,
    reporter: &Reporter,
) -> Result<BTreeMap<DrvId, Entry>, BuildError> {
    struct Schedule {
        done: BTreeMap<DrvId, Entry>,
        running: usize,
        taken: Vec<bool>,
        /// Hashes being realised: a second step with the same derivation (two platform
        /// names, one recipe) waits for the first and finds its entry.
        in_progress: std::collections::BTreeSet<DrvHash>,
        failed: Option<BuildError>,
    }
    let index_of: BTreeMap<&DrvId, usize> = plan
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (&s.node.id, i))
        .collect();
    let substitutes = |i: usize| matches!(plan.steps[i].action, Action::Substitute { .. });
    let schedule = std::sync::Mutex::new(Schedule {
        done: BTreeMap::new(),
        running: 0,
        taken: vec![false; plan.steps.len()],
        in_progress: Default::default(),
        failed: None,
    });
    let changed = std::sync::Condvar::new();
    let context = Context {
        config,
        store,
        options,
        reporter,
    };
    // Whether step `i` may start: no step of the same derivation is under way, and its
    // parent is in the store (or not in the plan), or both are substitutions and the
    // parent's is under way.
    let startable = |s: &Schedule, i: usize| {
        if s.in_progress.contains(&plan.steps[i].node.hash) {
            return false;
        }
        let Some(parent) = &plan.steps[i].node.parent else {
            return true;
        };
        match index_of.get(parent) {
            None => true,
            Some(&p) => {
                s.done.contains_key(parent) || (substitutes(i) && substitutes(p) && s.taken[p])
            }
        }
    };
    let worker = || {
        loop {
            let mut s = schedule.lock().unwrap_or_else(|e| e.into_inner());
            let index = loop {
                if s.failed.is_some() {
                    return;
                }
                match (0..plan.steps.len()).find(|&i| !s.taken[i] && startable(&s, i)) {
                    Some(i) => break i,
                    None if s.running == 0 => return,
                    None => s = changed.wait(s).unwrap_or_else(|e| e.into_inner()),
                }
            };
            s.taken[index] = true;
            s.running += 1;
            s.in_progress.insert(plan.steps[index].node.hash);
            drop(s);
            changed.notify_all();
            let step = &plan.steps[index];
            let node = &step.node;
            // The parent and boot files, once the parent is in the store; None if the run
            // failed meanwhile.
            let ancestry = || -> Option<Ancestry> {
                let mut s = schedule.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let parent = match &node.parent {
                        None => None,
                        Some(p) if !index_of.contains_key(p) => None,
                        Some(p) => match s.done.get(p) {
                            Some(entry) => Some(entry.clone()),
                            None if s.failed.is_some() => return None,
                            None => {
                                s = changed.wait(s).unwrap_or_else(|e| e.into_inner());
                                continue;
                            }
                        },
                    };
                    let boot = boot_files_for(plan, &s.done, node);
                    return Some(Ancestry { parent, boot });
                }
            };
            let result = match lookup(store, node) {
                Ok(Some(entry)) => Ok(entry),
                Ok(None) => realise_one(&context, node, &step.action, &ancestry),
                Err(e) => Err(e),
            };
            let mut s = schedule.lock().unwrap_or_else(|e| e.into_inner());
            s.running -= 1;
            s.in_progress.remove(&node.hash);
            match result {
                Ok(entry) => {
                    s.done.insert(node.id.clone(), entry);
                }
                Err(e) => {
                    s.failed.get_or_insert(e);
                }
            }
            changed.notify_all();
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..options.jobs.max(1).min(plan.steps.len().max(1)) {
            scope.spawn(worker);
        }
        worker();
    });
    let s = schedule.into_inner().unwrap_or_else(|e| e.into_inner());
    match s.failed {
        Some(e) => Err(e),
        None => Ok(s.done),
    }
}

/// The boot files a derivation's output boots with: the nearest ancestor's (or its own)
/// `boot/`. None means the disk boots through firmware and its own bootloader.
pub(super) fn boot_files_for(
    plan: &BuildPlan,
    entries: &BTreeMap<DrvId, Entry>,
    node: &DrvNode,
) -> Option<BootFiles> {
    let mut current = node.parent.clone();
    while let Some(id) = current {
        if let Some(boot) = entries
            .get(&id)
            .and_then(|e| e.boot_dir())
            .and_then(|dir| BootFiles::in_dir(&dir))
        {
            return Some(boot);
        }
        current = plan
            .steps
            .iter()
            .find(|s| s.node.id == id)
            .and_then(|s| s.node.parent.clone());
    }
    None
}

/// The store hashes of every entry present and intact, for planning (a damaged entry is
/// an error, not "cached").
pub fn present_hashes<'a>(
    store: &Store,
    nodes: impl IntoIterator<Item = &'a DrvNode>,
) -> Result<std::collections::BTreeSet<DrvHash>, crate::store::StoreError> {
    let mut present = std::collections::BTreeSet::new();
    for node in nodes {
        if store.lookup_intact(&node.hash, &node.name)?.is_some() {
            present.insert(node.hash);
        }
    }
    Ok(present)
}
