//! Reading and writing the project's `farm.lock` (its content is `model::lock`).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::Project;
use crate::model::build::derivation::DrvId;
use crate::model::build::lock::{self, LOCK_FILE, LockFile};

#[derive(Debug, thiserror::Error)]
pub enum LockFileError {
    #[error(
        "`{path}` does not exist, and `--locked` builds only what a lock describes\nhint: run \
         `farm build` once without `--locked` to write it, and keep it with farm.toml"
    )]
    Missing { path: PathBuf },
    #[error(
        "`{path}` cannot be read: {reason}\nhint: delete it and run `farm build` to write it again"
    )]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "`{config}` does not match `{path}`:\n{}\nhint: if the change is meant, run \
         `farm build` without `--locked` to build it and update the lock",
        drifts.join("\n")
    )]
    Drift {
        config: PathBuf,
        path: PathBuf,
        /// Each derivation that differs, as `model::lock::Drift` says it, indented.
        drifts: Vec<String>,
    },
    #[error("Cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Project {
    /// `farm.lock`, beside farm.toml.
    pub fn lock_path(&self) -> PathBuf {
        self.config_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join(LOCK_FILE)
    }

    /// The lock, or `None` when there is none yet.
    pub fn read_lock(&self) -> Result<Option<LockFile>, LockFileError> {
        let path = self.lock_path();
        let text = match fs_err::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(LockFileError::Unreadable {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        lock::parse(&text)
            .map(Some)
            .map_err(|e| LockFileError::Unreadable {
                path,
                reason: e.to_string(),
            })
    }

    pub fn require_lock(&self) -> Result<LockFile, LockFileError> {
        self.read_lock()?.ok_or(LockFileError::Missing {
            path: self.lock_path(),
        })
    }

    /// `--locked`: the lock, when every derivation of `ids` (and what they are built on)
    /// is in it unchanged.
    pub fn check_locked(&self, ids: &[DrvId]) -> Result<LockFile, LockFileError> {
        let lock = self.require_lock()?;
        let drifts = lock::drift(&lock, self.graph.closure(ids));
        if drifts.is_empty() {
            return Ok(lock);
        }
        Err(LockFileError::Drift {
            config: self.config_path.clone(),
            path: self.lock_path(),
            drifts: drifts.iter().map(|d| format!("  {d}")).collect(),
        })
    }

    /// Writes `lock` (through a temporary file and a rename) unless the file already says
    /// exactly that: an unchanged lock keeps its modification time. Returns whether it wrote.
    pub fn write_lock(&self, lock: &LockFile) -> Result<bool, LockFileError> {
        let path = self.lock_path();
        let text = lock::render(lock);
        if fs_err::read_to_string(&path).is_ok_and(|old| old == text) {
            return Ok(false);
        }
        let write = || -> std::io::Result<()> {
            let dir = path.parent().unwrap_or(Path::new("."));
            let mut tmp = tempfile::Builder::new()
                .prefix(".farm.lock.")
                .tempfile_in(dir)?;
            tmp.write_all(text.as_bytes())?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        };
        write().map_err(|source| LockFileError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(true)
    }
}
