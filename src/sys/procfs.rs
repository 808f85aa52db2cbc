//! What running processes hold, read from `/proc`: files they have open under a directory
//! (qemu keeps every disk of a backing chain open), and the project tag farm puts in the
//! environment of the processes it starts.

use std::path::{Path, PathBuf};

/// A process and a file it has open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenFile {
    pub pid: u32,
    /// `/proc/<pid>/comm`: the program's name.
    pub command: String,
    pub path: PathBuf,
}

/// Every file under `dir` that some process has open. Processes farm may not look into
/// (another user's, when not root) are skipped: they cannot hold farm's store files open
/// without farm being able to see them when run as the same user.
pub fn open_files_under(dir: &Path) -> Vec<OpenFile> {
    let mut found = Vec::new();
    for pid in pids() {
        let Ok(fds) = fs_err::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let mut command = None;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if target.starts_with(dir) {
                let command = command.get_or_insert_with(|| comm(pid)).clone();
                found.push(OpenFile {
                    pid,
                    command,
                    path: target,
                });
            }
        }
    }
    found
}

/// Processes whose environment has `name=value`, with the value.
pub fn processes_with_env(name: &str) -> Vec<(u32, String)> {
    let prefix = format!("{name}=");
    let mut found = Vec::new();
    for pid in pids() {
        let Ok(environ) = fs_err::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        for var in environ.split(|b| *b == 0) {
            if let Some(value) = var.strip_prefix(prefix.as_bytes()) {
                found.push((pid, String::from_utf8_lossy(value).into_owned()));
            }
        }
    }
    found
}

fn pids() -> Vec<u32> {
    let Ok(listing) = fs_err::read_dir("/proc") else {
        return Vec::new();
    };
    listing
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn comm(pid: u32) -> String {
    fs_err::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_file_this_process_holds_open_and_its_own_environment() {
        let dir = tempfile::tempdir().unwrap();
        let dir = fs_err::canonicalize(dir.path()).unwrap();
        let path = dir.join("disk.qcow2");
        let _held = fs_err::File::create(&path).unwrap();
        let open = open_files_under(&dir);
        assert!(
            open.iter()
                .any(|f| f.pid == std::process::id() && f.path == path),
            "{open:?}"
        );
        // PATH is in every test runner's environment.
        assert!(
            processes_with_env("PATH")
                .iter()
                .any(|(pid, _)| *pid == std::process::id())
        );
    }
}
