//! The build log farm's image builders share: every tool's command line and output appended
//! to one file under the store's `logs/`, with `==>` notes between them. How a tool is run
//! (output streamed line by line, or captured) stays with each builder; writing the log is
//! the same everywhere.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
#[error("Could not write the build log `{}`: {source}", path.display())]
pub struct LogError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

pub struct ToolLog {
    path: PathBuf,
    /// Tools' stdout and stderr are pumped from two threads.
    file: Mutex<fs_err::File>,
}

impl ToolLog {
    /// Opens `path` for appending, creating it.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let file = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| LogError {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    pub fn write(&self, bytes: &[u8]) -> Result<(), LogError> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(bytes).map_err(|source| LogError {
            path: self.path.clone(),
            source,
        })
    }

    /// Where the log is, for errors that point the user at it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A line of farm's own between the tools' output.
    pub fn note(&self, text: &str) -> Result<(), LogError> {
        self.write(format!("==> {text}\n").as_bytes())
    }
}
