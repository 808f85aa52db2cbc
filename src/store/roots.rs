//! Garbage-collection roots: which projects use this store, and for what.
//!
//! Like Nix's gcroots, each project that builds into or runs from a store registers itself
//! in `roots/<id>.json` (`id` derived from its state directory, so one file per project):
//! its farm.toml, its state directory and the entries its farm.toml wants. `farm gc` keeps
//! those entries and every layer an instance in that state directory boots, and forgets a
//! root whose project is gone (neither its farm.toml nor its state directory exists).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Store, StoreError};

pub(super) const ROOTS_DIR: &str = "roots";

/// One project's registration.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProjectRoot {
    /// The project's farm.toml, absolute.
    pub config: PathBuf,
    /// Its state directory (`.farm/`), absolute: instance records live there.
    pub state_dir: PathBuf,
    /// Entry directory names the project's farm.toml wants (with their closures).
    pub entries: Vec<String>,
}

impl ProjectRoot {
    /// Whether the project still exists: a root whose farm.toml and state are both gone
    /// keeps nothing alive.
    pub fn project_exists(&self) -> bool {
        self.config.exists() || self.state_dir.exists()
    }
}

/// A root file and what it holds (or why it could not be read).
pub type RootFile = (PathBuf, Result<ProjectRoot, String>);

impl Store {
    /// Registers (or updates) `root`, replacing the file atomically; a root registered as
    /// it is already is left alone. On a store this process cannot write to, nothing is
    /// registered and that is no error: a root only keeps `farm gc` off the project's
    /// entries, and whoever can run gc there is not this process.
    pub fn register_root(&self, root: &ProjectRoot) -> Result<(), StoreError> {
        let dir = self.root.join(ROOTS_DIR);
        let path = dir.join(root_file_name(&root.state_dir));
        let mut json = serde_json::to_vec_pretty(root).map_err(std::io::Error::other)?;
        json.push(b'\n');
        if fs_err::read(&path).is_ok_and(|known| known == json) {
            return Ok(());
        }
        let written = fs_err::create_dir_all(&dir)
            .and_then(|()| tempfile::NamedTempFile::new_in(&dir))
            .and_then(|mut file| {
                file.write_all(&json)?;
                file.persist(&path).map_err(|e| e.error)
            });
        match written {
            Ok(_) => Ok(()),
            Err(e) if super::usage::cannot_write(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every registered root with the file it is in; a file that does not parse is
    /// returned as an error beside the others, never silently dropped.
    pub fn project_roots(&self) -> Result<Vec<RootFile>, StoreError> {
        let dir = self.root.join(ROOTS_DIR);
        let listing = match fs_err::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut roots = Vec::new();
        for child in listing {
            let path = child?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let parsed = fs_err::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<ProjectRoot>(&bytes).map_err(|e| e.to_string())
                });
            roots.push((path, parsed));
        }
        roots.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(roots)
    }
}

/// `<blake3 of the state directory, 16 hex digits>.json`: stable per project, and the same
/// for every farm.toml that shares a state directory (they share instances too).
fn root_file_name(state_dir: &Path) -> String {
    let digest = blake3::hash(state_dir.as_os_str().as_encoded_bytes());
    format!("{}.json", &digest.to_hex()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_root_is_listed_updated_in_place_and_knows_when_its_project_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cache")).unwrap();
        let project = dir.path().join("p");
        fs_err::create_dir_all(&project).unwrap();
        let mut root = ProjectRoot {
            config: project.join("farm.toml"),
            state_dir: project.join(".farm"),
            entries: vec!["a-x".into()],
        };
        store.register_root(&root).unwrap();
        root.entries.push("b-y".into());
        store.register_root(&root).unwrap();
        let roots = store.project_roots().unwrap();
        assert_eq!(roots.len(), 1, "{roots:?}");
        assert_eq!(roots[0].1.as_ref().unwrap(), &root);
        assert!(
            !root.project_exists(),
            "neither farm.toml nor .farm/ exists yet"
        );
        fs_err::write(&root.config, "").unwrap();
        assert!(root.project_exists());
    }
}
