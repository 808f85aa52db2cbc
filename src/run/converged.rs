//! The converged snapshot on disk (`model::lab::converged` says what it is): found by its
//! key file beside the manifest, saved after an `up` that converged the lab from nothing,
//! removed when it no longer matches. A snapshot named `converged` that farm did not save
//! (no key file) is the user's: farm neither restores it on its own nor replaces it.

use std::path::Path;

use crate::model::lab::converged::{CONVERGED, KEY_FILE};
use crate::model::lab::snapshot::SnapshotPaths;
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::snapshot::SnapshotError;

/// What the state directory holds under the name `converged`.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing.
    None,
    /// farm's, saved under this key.
    Current,
    /// farm's, saved under another key: another lab.
    Stale,
    /// A snapshot the user saved under that name.
    Users,
}

/// What is saved as `converged` in `state_root`, seen against `key`.
pub fn find(state_root: &Path, key: &str) -> Found {
    let paths = SnapshotPaths::new(state_root, CONVERGED);
    if !paths.manifest().exists() {
        return Found::None;
    }
    match fs_err::read_to_string(paths.dir.join(KEY_FILE)) {
        Ok(saved) if saved.trim() == key => Found::Current,
        Ok(_) => Found::Stale,
        Err(_) => Found::Users,
    }
}

/// Saves the running lab as `converged` under `key` (it runs on from the snapshot).
pub fn save(
    project: &Project,
    state_root: &Path,
    key: &str,
    reporter: &Reporter,
) -> Result<(), SnapshotError> {
    crate::run::snapshot::save(project, state_root, CONVERGED, &[], false, reporter)?;
    let path = SnapshotPaths::new(state_root, CONVERGED).dir.join(KEY_FILE);
    crate::sys::files::replace_file(&path, format!("{key}\n").as_bytes(), 0o644).map_err(
        |source| SnapshotError::Io {
            what: "write",
            path: path.clone(),
            source,
        },
    )?;
    reporter.status(
        "kept",
        format!("snapshot {CONVERGED}: the next `up` of this lab, when it is down, starts from it"),
    );
    Ok(())
}

/// Removes farm's `converged` snapshot (its entries go with the next `farm gc`).
pub fn remove(project: &Project, state_root: &Path) -> Result<(), SnapshotError> {
    crate::run::snapshot::remove(project, state_root, CONVERGED)
}
