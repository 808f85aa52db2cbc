//! Looking after a store over time: `gc` removes what no project, instance or running
//! process needs; `verify` finds damaged entries and repairs them; `chosen_entries` picks
//! the entries `farm store export` and `push` take.
//!
//! This floor sits above `run` (it reads instance records) and `build`, below `cli`.

pub mod gc;
pub mod verify;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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
    let state_root = project.map(|p| p.project_dir().join(".farm"));
    by_store.extend(crate::run::snapshot::entries_of(
        state_root.as_deref(),
        entries,
        name,
    ));
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

#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    #[error(
        "`{}` does not exist, so there is no lab to take entries from\nhint: name the entries, \
         as `farm store ls` lists them",
        config.display()
    )]
    NoProject { config: PathBuf },
    #[error("Not in the store yet: `{}`\nhint: run `farm build` first", missing.join("`, `"))]
    NotBuilt { missing: Vec<String> },
    #[error(
        "Entry `{entry}` backs onto `{parent}`, which is not in the store\nhint: `farm store \
         verify` finds what else is broken"
    )]
    ParentMissing { entry: String, parent: String },
    #[error(transparent)]
    Named(#[from] NamedError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ChooseError {
    /// A name that means nothing here: the command line is wrong (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, ChooseError::Named(NamedError::Usage(_)))
    }
}

/// The entries `names` mean (`entries_named`) with everything they back onto, parents
/// first, for `farm store export` and `push`. Without names: every derivation `farm build`
/// builds for `project` (all must be in the store), with the appliance its chroot builds
/// run in when it is here (~8 MiB), so a machine that receives them can rebuild such a
/// platform after a change to its steps. `config` is farm.toml's path, for the error when
/// there is no project.
pub fn chosen_entries(
    store: &Store,
    project: Option<&Project>,
    config: &Path,
    names: &[String],
) -> Result<Vec<Entry>, ChooseError> {
    let entries = store.entries()?;
    let mut dirs = Vec::new();
    if names.is_empty() {
        let Some(project) = project else {
            return Err(ChooseError::NoProject {
                config: config.to_path_buf(),
            });
        };
        let mut missing = Vec::new();
        for node in project.graph.closure(&project.default_build()) {
            match store.lookup(&node.hash, &node.name)? {
                Some(entry) => dirs.push(entry.dir_name().to_string()),
                None => missing.push(node.name.clone()),
            }
        }
        for arch in crate::model::build::derivation::appliance_arches(&project.graph) {
            let node = crate::model::build::derivation::appliance_node(arch);
            if let Some(entry) = store.lookup(&node.hash, &node.name)? {
                dirs.push(entry.dir_name().to_string());
            }
        }
        if !missing.is_empty() {
            return Err(ChooseError::NotBuilt { missing });
        }
    }
    for name in names {
        dirs.extend(entries_named(store, project, &entries, name, name)?);
    }
    let chosen = closure_of(&entries, &dirs);
    let present: BTreeSet<&str> = chosen.iter().map(|e| e.dir_name()).collect();
    for entry in &chosen {
        if let Some(parent) = &entry.meta.parent
            && !present.contains(parent.as_str())
        {
            return Err(ChooseError::ParentMissing {
                entry: entry.dir_name().to_string(),
                parent: parent.clone(),
            });
        }
    }
    Ok(chosen)
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
