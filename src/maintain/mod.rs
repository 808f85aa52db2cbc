//! Looking after a store over time: `gc` removes what no project, instance or running
//! process needs; `verify` finds damaged entries and repairs them.
//!
//! This floor sits above `run` (it reads instance records) and `build`, below `cli`.

pub mod gc;
pub mod verify;

use crate::project::{Project, UsageError};
use crate::store::{Entry, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum NamedError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Usage(#[from] UsageError),
}

/// The entry directories `name` means: an entry directory, an entry label, or what this
/// farm.toml calls `name` (an image, a platform, a VM). `said` is how the user wrote it,
/// for the error (`--keep web`).
pub fn entries_named(
    store: &Store,
    project: Option<&Project>,
    entries: &[Entry],
    name: &str,
    said: &str,
) -> Result<Vec<String>, NamedError> {
    let mut by_store: Vec<String> = entries
        .iter()
        .filter(|e| e.dir_name() == name || e.meta.name == name)
        .map(|e| e.dir_name().to_string())
        .collect();
    by_store.extend(crate::run::snapshot::latest_entries(entries, name));
    if !by_store.is_empty() {
        // A snapshot's entries bring the layers of the VMs saved inside them.
        let inside: Vec<String> = entries
            .iter()
            .filter(|e| by_store.iter().any(|d| d == e.dir_name()))
            .flat_map(crate::run::snapshot::layers_inside)
            .filter(|layer| entries.iter().any(|e| e.dir_name() == layer))
            .collect();
        return Ok(by_store.into_iter().chain(inside).collect());
    }
    let Some(project) = project else {
        return Err(UsageError {
            message: format!("`{said}` names no entry of the store"),
            hint: "give an entry's directory or label, as `farm store ls` lists them".into(),
        }
        .into());
    };
    let mut names = Vec::new();
    for id in project.resolve(name)? {
        let node = &project.graph.nodes[&id];
        names.extend(
            store
                .lookup(&node.hash, &node.name)?
                .map(|e| e.dir_name().to_string()),
        );
    }
    Ok(names)
}

/// `dirs` and every entry they back onto, parents first.
pub fn closure_of(entries: &[Entry], dirs: &[String]) -> Vec<Entry> {
    let by_dir: std::collections::BTreeMap<&str, &Entry> =
        entries.iter().map(|e| (e.dir_name(), e)).collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut ordered = Vec::new();
    for dir in dirs {
        let mut chain = Vec::new();
        let mut current = by_dir.get(dir.as_str()).copied();
        while let Some(entry) = current {
            if !seen.insert(entry.dir_name().to_string()) {
                break;
            }
            chain.push(entry.clone());
            current = entry
                .meta
                .parent
                .as_deref()
                .and_then(|p| by_dir.get(p).copied());
        }
        ordered.extend(chain.into_iter().rev());
    }
    ordered
}
