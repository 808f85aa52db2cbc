//! Finding the outside programs farm runs (the Debian package each comes from is in
//! `model::programs`, so a missing one is reported with the `apt-get install` that fixes it).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub use crate::model::programs::debian_package;

/// Finds a program on `PATH`, then in the sbin directories a non-root `PATH` often lacks
/// (`mkfs.ext4` lives in `/usr/sbin`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Whether `path` is a file someone may execute.
pub fn is_executable(path: &Path) -> bool {
    fs_err::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_on_path() {
        assert!(find_program("sh").is_some());
        assert!(find_program("no-such-program-farm").is_none());
    }
}
