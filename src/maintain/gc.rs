//! `farm gc`: finds the roots (this farm.toml, the projects registered in the store, their
//! instances, processes with store files open, `--keep`), lets `model::gc` decide, then
//! removes what it decided under the store-wide exclusive lock, and sweeps the leftovers.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::model::build::gc::{GcEntry, GcLimits, GcPlan, KeepReason, plan_gc};
use crate::model::build::qemu::TAG_PROJECT;
use crate::progress::Reporter;
use crate::project::{Project, UsageError};
use crate::run::lab::state_dir_for;
use crate::run::state::StatePaths;
use crate::store::{Store, StoreError, Swept};
use crate::sys::procfs;

/// Leftover downloads and logs older than this go (a resume or a look at a failed build's
/// log happens within days, not weeks).
pub const STALE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Clone, Debug, Default)]
pub struct GcOptions {
    pub dry_run: bool,
    /// Entry directory names or labels (`web_amd64`), or names this farm.toml resolves
    /// (platforms, images, VMs), kept whatever else says.
    pub keep: Vec<String>,
    pub older_than: Option<Duration>,
    pub max_size: Option<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct GcReport {
    pub plan: GcPlan,
    /// Root files whose project is gone (or that do not parse), forgotten.
    pub forgotten_roots: Vec<PathBuf>,
    pub swept: Swept,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Usage(#[from] UsageError),
}

impl From<super::NamedError> for GcError {
    fn from(e: super::NamedError) -> Self {
        match e {
            super::NamedError::Store(e) => GcError::Store(e),
            super::NamedError::Usage(e) => GcError::Usage(e),
        }
    }
}

/// Runs gc on `store`; `project` is the farm.toml it runs for, if there is one.
pub fn gc(
    store: &Store,
    project: Option<&Project>,
    options: &GcOptions,
    reporter: &Reporter,
) -> Result<GcReport, GcError> {
    // Exclusive before looking, so nothing is added or taken into use between the look
    // and the removal. A dry run only looks.
    let _use = match options.dry_run {
        true => None,
        false => Some(store.use_exclusive(reporter)?),
    };
    let (entries, problems) = store.scan()?;
    for problem in &problems {
        reporter.warn(format!("{problem} (left as it is)"));
    }
    let mut report = GcReport::default();
    let mut roots: Vec<(String, KeepReason)> = Vec::new();
    if let Some(project) = project {
        for entry in project.entries_in(store)? {
            roots.push((entry.dir_name().to_string(), KeepReason::ThisProject));
        }
    }
    for name in &options.keep {
        let kept = super::entries_named(store, project, &entries, name, &format!("--keep {name}"))?;
        roots.extend(kept.into_iter().map(|n| (n, KeepReason::Asked)));
    }
    // This project's own registration is what it wanted when it last built; what it wants
    // now (above) replaces it.
    let own_state = project.map(|p| absolute(&state_dir_for(p, None)));
    let mut state_dirs: Vec<PathBuf> = own_state.iter().cloned().collect();
    for (file, root) in store.project_roots()? {
        match root {
            Ok(root) if Some(&root.state_dir) == own_state.as_ref() => {}
            Ok(root) if root.project_exists() => {
                roots.extend(
                    root.entries
                        .iter()
                        .map(|e| (e.clone(), KeepReason::Project(root.config.clone()))),
                );
                state_dirs.push(root.state_dir);
            }
            Ok(_) => report.forgotten_roots.push(file),
            Err(why) => {
                reporter.warn(format!(
                    "`{}` is not a gc root farm can read ({why}); it is removed",
                    file.display()
                ));
                report.forgotten_roots.push(file);
            }
        }
    }
    // Running farm processes name their project in their environment.
    state_dirs.extend(
        procfs::processes_with_env(TAG_PROJECT)
            .into_iter()
            .map(|(_, dir)| PathBuf::from(dir)),
    );
    state_dirs.sort();
    state_dirs.dedup();
    for state_dir in &state_dirs {
        // A snapshot's entries (and, through them, the layers they back onto).
        for (name, entry) in crate::run::snapshot::saved_entries(state_dir, store) {
            roots.push((
                entry,
                KeepReason::Snapshot {
                    name,
                    state_dir: state_dir.clone(),
                },
            ));
        }
        for (vm, record) in StatePaths::new(state_dir).records() {
            roots.push((
                record.spec.layer.entry.clone(),
                KeepReason::Instance {
                    vm,
                    state_dir: state_dir.clone(),
                },
            ));
        }
    }
    let store_dir = store.root().join("store");
    for open in procfs::open_files_under(&store_dir) {
        if let Ok(relative) = open.path.strip_prefix(&store_dir)
            && let Some(entry) = relative.components().next()
        {
            roots.push((
                entry.as_os_str().to_string_lossy().into_owned(),
                KeepReason::OpenBy {
                    pid: open.pid,
                    command: open.command,
                },
            ));
        }
    }

    let gc_entries = entries
        .iter()
        .map(|entry| {
            Ok(GcEntry {
                dir_name: entry.dir_name().to_string(),
                parent: entry.meta.parent.clone(),
                bytes: Store::disk_usage(&entry.dir)?,
                built_at_unix: entry.meta.built_at_unix,
            })
        })
        .collect::<Result<Vec<_>, std::io::Error>>()
        .map_err(StoreError::from)?;
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    report.plan = plan_gc(
        &gc_entries,
        &roots,
        GcLimits {
            older_than_secs: options.older_than.map(|d| d.as_secs()),
            max_size: options.max_size,
            now_unix,
        },
    );

    let dry = options.dry_run;
    let verb = if dry { "would remove" } else { "removed" };
    for name in &report.plan.remove {
        if !dry {
            store.remove_entry(name)?;
        }
        let bytes = gc_entries
            .iter()
            .find(|e| &e.dir_name == name)
            .map_or(0, |e| e.bytes);
        reporter.line(format!(
            "{verb:>12} {name} ({})",
            crate::model::text::human_bytes(bytes)
        ));
    }
    for file in &report.forgotten_roots {
        if !dry {
            fs_err::remove_file(file).map_err(StoreError::from)?;
        }
    }
    if let (Some(project), Some(own_state), false) = (project, &own_state, dry) {
        project.register_root(store, own_state)?;
    }
    let wanted_keys: BTreeSet<String> = project
        .map(|p| p.graph.nodes.values().map(|n| n.hash.store_key()).collect())
        .unwrap_or_default();
    let removed: BTreeSet<String> = report.plan.remove.iter().cloned().collect();
    report.swept += store.sweep_tmp(dry)?;
    report.swept += store.sweep_partials(STALE_AFTER, &wanted_keys, dry)?;
    report.swept += store.sweep_logs(&removed, STALE_AFTER, dry)?;
    // Step checkpoints back onto their parent entry: they go with it.
    let live: BTreeSet<String> = gc_entries
        .iter()
        .map(|e| e.dir_name.clone())
        .filter(|name| !removed.contains(name))
        .collect();
    report.swept += store.sweep_checkpoints(&live, dry)?;
    Ok(report)
}

fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or(path.to_path_buf())
}
