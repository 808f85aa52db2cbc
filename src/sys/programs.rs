//! Finding the outside programs farm runs, and the Debian package each comes from, so a
//! missing one is reported with the `apt-get install` that fixes it.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// Every program farm checks for, here or on a host, with the Debian package providing it.
const DEBIAN_PACKAGES: [(&str, &str); 15] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-system-aarch64", "qemu-system-arm"),
    ("qemu-img", "qemu-utils"),
    ("b3sum", "b3sum"),
    ("mmdebstrap", "mmdebstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("apt-get", "apt"),
    ("apt-cache", "apt"),
    ("dpkg-deb", "dpkg"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("vde_switch", "vde2"),
    ("vde_plug", "vde2"),
    ("ip", "iproute2"),
    ("socat", "socat"),
];

/// The Debian package that provides `program` (the program's own name when farm does not
/// know it: often right, and clearly a guess).
pub fn debian_package(program: &str) -> &str {
    DEBIAN_PACKAGES
        .iter()
        .find(|(p, _)| *p == program)
        .map_or(program, |(_, package)| package)
}

/// Finds a program on `PATH`, then in the sbin directories a non-root `PATH` often lacks
/// (`mkfs.ext4` lives in `/usr/sbin`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs_err::metadata(candidate)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_named_for_known_programs() {
        assert_eq!(debian_package("qemu-img"), "qemu-utils");
        assert_eq!(debian_package("vde_plug"), "vde2");
        assert_eq!(debian_package("frobnicate"), "frobnicate");
        assert!(find_program("sh").is_some());
        assert!(find_program("no-such-program-farm").is_none());
    }
}
