//! A loaded project: farm.toml validated, inputs hashed, derivations computed, and where its
//! store and state live. Every command starts here.

pub mod checks;
pub mod inputs;
pub mod lockfile;

use std::path::{Path, PathBuf};

use crate::config::{ConfigError, Loaded};
use crate::model::build::derivation::{DrvGraph, DrvId, derive_all, wanted_platforms};
use crate::model::config::diagnostic::list_names;
use crate::model::config::topology::STORE_DIR_NAME;
use crate::store::{Entry, ProjectRoot, Store, StoreError};

/// Bad input on the command line (an unknown name): exit code 2, like an invalid farm.toml.
#[derive(Debug, thiserror::Error)]
#[error("{message}\nhint: {hint}")]
pub struct UsageError {
    pub message: String,
    pub hint: String,
}

/// Where the project's paths come from (flags and environment, resolved by the CLI).
#[derive(Clone, Debug)]
pub struct ProjectOptions {
    pub config: PathBuf,
    pub store: Option<PathBuf>,
}

impl ProjectOptions {
    /// The store directory without loading farm.toml (store commands work on a store
    /// alone): `--store`, else `cache/` beside farm.toml.
    pub fn store_dir(&self) -> PathBuf {
        self.store.clone().unwrap_or_else(|| {
            self.config
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .join(STORE_DIR_NAME)
        })
    }
}

#[derive(Debug)]
pub struct Project {
    pub loaded: Loaded,
    pub graph: DrvGraph,
    /// The derivations `farm build` realises when given no names.
    pub wanted: Vec<DrvId>,
    pub store_dir: PathBuf,
    pub config_path: PathBuf,
}

impl Project {
    pub fn load(options: &ProjectOptions) -> Result<Project, ConfigError> {
        let loaded = crate::config::load(&options.config)?;
        let invalid = |diagnostics: Vec<_>| ConfigError::Invalid {
            rendered: loaded.sources.render_all(&diagnostics),
            diagnostics,
        };
        let store_dir = options
            .store
            .clone()
            .unwrap_or_else(|| loaded.project_dir.join(STORE_DIR_NAME));
        // Files farm.toml names are checked together with hashing them, so one run of
        // `farm check` reports every problem, in line order.
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let mut problems =
            checks::check_referenced(&loaded.config, &loaded.project_dir, home.as_deref());
        let inputs = match crate::project::inputs::hash_inputs(&loaded.config, Some(&store_dir)) {
            Ok(inputs) => Some(inputs),
            Err(diagnostics) => {
                problems.extend(diagnostics);
                None
            }
        };
        let Some(inputs) = inputs.filter(|_| problems.is_empty()) else {
            problems.sort_by_key(|d| (d.at.file, d.at.span.start));
            return Err(invalid(problems));
        };
        let wanted = wanted_platforms(&loaded.config, &loaded.topology);
        let graph = derive_all(&loaded.config, &wanted, &inputs).map_err(invalid)?;
        Ok(Project {
            loaded,
            graph,
            wanted,
            store_dir,
            config_path: options.config.clone(),
        })
    }

    /// The project when its farm.toml exists, `None` when it does not: store commands
    /// work on a store alone, but a farm.toml that is there must be valid.
    pub fn load_if_present(options: &ProjectOptions) -> Result<Option<Project>, ConfigError> {
        options
            .config
            .exists()
            .then(|| Project::load(options))
            .transpose()
    }

    /// The derivations the command-line `names` stand for (see `resolve`), or, given none,
    /// what `farm build` builds (`default_build`).
    pub fn resolve_all(&self, names: &[String]) -> Result<Vec<DrvId>, UsageError> {
        if names.is_empty() {
            return Ok(self.default_build());
        }
        let mut ids = Vec::new();
        for name in names {
            ids.extend(self.resolve(name)?);
        }
        Ok(ids)
    }

    /// Derivations a command-line NAME stands for: a store entry name (`<platform>_<target>`,
    /// an image), a platform (every target it is built for), or a VM (its platform layer).
    pub fn resolve(&self, name: &str) -> Result<Vec<DrvId>, UsageError> {
        let by_entry: Vec<DrvId> = self
            .graph
            .nodes
            .values()
            .filter(|n| n.name == name)
            .map(|n| n.id.clone())
            .collect();
        if !by_entry.is_empty() {
            return Ok(by_entry);
        }
        let matching: Vec<DrvId> = self
            .graph
            .nodes
            .keys()
            .filter(|id| match id {
                DrvId::Platform { platform, .. } => platform == name,
                DrvId::Image { image, .. } => image == name,
            })
            .cloned()
            .collect();
        if !matching.is_empty() {
            return Ok(matching);
        }
        if let Some(vm) = self.loaded.topology.vms.get(name) {
            return Ok(vec![DrvId::Platform {
                platform: vm.platform.clone(),
                target: vm.target.clone(),
            }]);
        }
        let config = &self.loaded.config;
        Err(UsageError {
            message: format!(
                "`{name}` is not an image, platform or VM of `{}`",
                self.config_path.display()
            ),
            hint: format!(
                "images: {}; platforms: {}; VMs: {}",
                list_names(config.images.keys()),
                list_names(config.platforms.keys()),
                list_names(self.loaded.topology.vms.keys())
            ),
        })
    }

    pub fn project_dir(&self) -> &Path {
        &self.loaded.project_dir
    }

    /// The store entries of every derivation this farm.toml defines, and of the appliance
    /// its chroot builds run in, where built.
    pub fn entries_in(&self, store: &Store) -> Result<Vec<Entry>, StoreError> {
        let mut entries = Vec::new();
        for node in self.graph.all() {
            entries.extend(store.lookup(&node.hash, &node.name)?);
        }
        // The appliance its chroot builds run in: rebuilding it needs the Debian mirror,
        // which an offline lab may not have.
        for arch in crate::model::build::derivation::appliance_arches(&self.graph) {
            let node = crate::model::build::derivation::appliance_node(arch);
            entries.extend(store.lookup(&node.hash, &node.name)?);
        }
        Ok(entries)
    }

    /// What `farm build` builds when given no names: what the VMs use, every unused
    /// platform, and every image.
    pub fn default_build(&self) -> Vec<DrvId> {
        let mut all = self.wanted.clone();
        all.extend(
            self.graph
                .nodes
                .keys()
                .filter(|id| matches!(id, DrvId::Image { .. }))
                .cloned(),
        );
        all
    }

    /// Registers this project with `store` as a gc root: its farm.toml, its state
    /// directory `state_dir` and the entries of its derivations, so `farm gc` run from
    /// another project sharing the store keeps them.
    pub fn register_root(&self, store: &Store, state_dir: &Path) -> Result<(), StoreError> {
        let absolute = |path: &Path| std::path::absolute(path).unwrap_or(path.to_path_buf());
        store.register_root(&ProjectRoot {
            config: absolute(&self.config_path),
            state_dir: absolute(state_dir),
            entries: self
                .entries_in(store)?
                .iter()
                .map(|e| e.dir_name().to_string())
                .collect(),
        })
    }
}
