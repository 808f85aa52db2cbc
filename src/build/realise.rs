//! Applying a build plan: each missing derivation is realised into a staging directory and
//! committed to the store under its lock, parents first.
//!
//! Concurrency: two farm processes realising the same derivation serialise on the entry's
//! lock; the second finds the entry committed and does nothing. A crash leaves only a
//! staging directory, which the next `stage` of the same key removes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::build::layer::BootFiles;
use crate::build::produce::produce;
use crate::fetch;
use crate::model::config::Config;
use crate::model::derivation::{DrvId, DrvNode};
use crate::model::hash::DrvHash;
use crate::model::plan::{Action, BuildPlan};
use crate::model::values::{Accel, Arch};
use crate::progress::Reporter;
use crate::store::{Entry, EntryMeta, LAYOUT_VERSION, Staging, Store};

/// How many times a download is attempted (each attempt resumes) before giving up.
pub const DEFAULT_FETCH_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("Cannot build `{name}`")]
    Failed {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Cannot build `{name}`")]
    Layer {
        name: String,
        #[source]
        source: Box<crate::build::layer::BuilderError>,
    },
    #[error("Cannot build image `{name}` from a Debian mirror")]
    Debian {
        name: String,
        #[source]
        source: Box<crate::build::debian_image::DebianImageError>,
    },
    #[error("Cannot build the tiny image `{name}`")]
    Tiny {
        name: String,
        #[source]
        source: Box<crate::build::tiny_image::TinyImageError>,
    },
    #[error("The build was interrupted")]
    Interrupted,
    #[error(
        "Image `{name}`: `{url}` matches its declared {algo}, but the file itself is broken: {detail}\nhint: the file as published is damaged (and its checksum was taken of the damaged file): use another mirror or release of the image, and its own checksum"
    )]
    BrokenPublished {
        name: String,
        url: String,
        algo: &'static str,
        detail: String,
    },
}

pub(super) fn failed<E: std::error::Error + Send + Sync + 'static>(
    name: &str,
) -> impl FnOnce(E) -> BuildError {
    let name = name.to_string();
    move |source| BuildError::Failed {
        name,
        source: Box::new(source),
    }
}

/// Options that come from the command line or environment, not from farm.toml.
#[derive(Clone, Debug)]
pub struct RealiseOptions {
    pub fetch_attempts: u32,
    /// How long a download may go without a byte before it counts as stalled.
    pub fetch_timeout: Duration,
    /// Overrides every target's `accel` (`--accel`, `FARM_ACCEL`).
    pub accel: Option<Accel>,
    /// How long a build VM may take to answer ssh.
    pub boot_timeout: Duration,
    /// How many derivations are built at once.
    pub jobs: usize,
    /// The caches `Substitute` steps fetch from (set by `plan_with_caches`).
    pub substitution: Option<std::sync::Arc<crate::build::substitution::Substitution>>,
    /// Resume layer builds from step checkpoints and keep new ones (`false` for
    /// `--no-checkpoints` and `--check`, which must run every step).
    pub step_checkpoints: bool,
}

impl Default for RealiseOptions {
    fn default() -> Self {
        Self {
            fetch_attempts: DEFAULT_FETCH_ATTEMPTS,
            fetch_timeout: fetch::DEFAULT_STALL_TIMEOUT,
            accel: None,
            boot_timeout: Duration::from_secs(DEFAULT_BOOT_TIMEOUT_SECS),
            jobs: 1,
            substitution: None,
            step_checkpoints: true,
        }
    }
}

/// Under TCG a Debian guest takes ~20 s to reach ssh; leave room for slow, busy machines.
pub const DEFAULT_BOOT_TIMEOUT_SECS: u64 = 300;

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

/// What a derivation is made on: its parent's entry and the boot files it builds with.
pub(super) struct Ancestry {
    pub(super) parent: Option<Entry>,
    pub(super) boot: Option<BootFiles>,
}

fn lookup(store: &Store, node: &DrvNode) -> Result<Option<Entry>, BuildError> {
    store
        .lookup(&node.hash, &node.name)
        .map_err(failed(&node.name))
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

/// What every realisation needs besides the derivation itself.
pub(super) struct Context<'a> {
    pub(super) config: &'a Config,
    pub(super) store: &'a Store,
    pub(super) options: &'a RealiseOptions,
    pub(super) reporter: &'a Reporter,
}

/// Realises one derivation under its lock. `ancestry` blocks until the parent is in the
/// store (None: the run failed meanwhile); a substitution calls it only after downloading.
fn realise_one(
    cx: &Context,
    node: &DrvNode,
    action: &Action,
    ancestry: &dyn Fn() -> Option<Ancestry>,
) -> Result<Entry, BuildError> {
    let (store, reporter) = (cx.store, cx.reporter);
    let name = node.name.as_str();
    let parent_failed = || failed(name)(std::io::Error::other("its parent could not be made"));
    let lock = match store.try_lock(&node.hash).map_err(failed(name))? {
        Some(lock) => lock,
        None => {
            reporter.line(format!(
                "waiting for another farm process building `{name}`"
            ));
            store.lock(&node.hash).map_err(failed(name))?
        }
    };
    if let Some(entry) = lookup(store, node)? {
        reporter.line(format!(
            "{:>12} {name} (built by another farm process)",
            "cached"
        ));
        return Ok(entry);
    }
    let started = Instant::now();
    // Every action but a substitution needs its parent in the store before it starts.
    let build = |action: &Action, staging: &Staging| {
        let ancestry = ancestry().ok_or_else(parent_failed)?;
        let output = produce(
            cx,
            node,
            action,
            ancestry.parent.as_ref(),
            ancestry.boot,
            staging,
            started,
        )?;
        Ok::<_, BuildError>((output, ancestry.parent))
    };
    let mut staging = store.stage(&lock, name).map_err(failed(name))?;
    let (output, parent) = match action {
        Action::Substitute { from, fallback, .. } => {
            match crate::build::substitution::substitute(cx, node, from, &staging, ancestry) {
                Ok(Some(done)) => done,
                Ok(None) => return Err(parent_failed()),
                Err(e) => {
                    let Some(fallback) = fallback else {
                        return Err(e);
                    };
                    reporter.warn(format!(
                        "{}; building `{name}` instead",
                        crate::sys::ssh::error_chain(&e).replace('\n', " ")
                    ));
                    drop(staging);
                    staging = store.stage(&lock, name).map_err(failed(name))?;
                    build(fallback, &staging)?
                }
            }
        }
        _ => build(action, &staging)?,
    };
    let (output_blake3, size) = output;
    let meta = EntryMeta {
        layout: LAYOUT_VERSION,
        name: name.to_string(),
        drv_hash: node.hash,
        derivation: serde_json::to_value(&node.derivation).expect("derivations serialize"),
        output_blake3,
        size,
        parent: parent.map(|p| p.dir_name().to_string()),
        built_at_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        build_seconds: started.elapsed().as_secs_f64(),
        disk_mtime_ns: None,
        files: Default::default(),
        meta_blake3: None,
    };
    let entry = store.commit(staging, meta).map_err(failed(name))?;
    drop(lock);
    Ok(entry)
}

/// farm's appliance for `arch` (see `derivation::appliance_node`), realised when a chroot
/// build first needs it, under its own lock.
pub(super) fn realise_appliance(cx: &Context, arch: Arch) -> Result<Entry, BuildError> {
    let node = crate::model::derivation::appliance_node(arch);
    if let Some(entry) = lookup(cx.store, &node)? {
        return Ok(entry);
    }
    realise_one(cx, &node, &Action::BuildTiny, &|| {
        Some(Ancestry {
            parent: None,
            boot: None,
        })
    })
}

pub fn human_bytes(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
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
