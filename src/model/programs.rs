//! The outside programs farm runs, here or on a host, and the Debian package each comes
//! from, so a missing one is reported with the `apt-get install` that fixes it.

/// Every program farm checks for, here or on a host, with the Debian package providing it.
const DEBIAN_PACKAGES: [(&str, &str); 18] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-system-aarch64", "qemu-system-arm"),
    ("qemu-img", "qemu-utils"),
    ("b3sum", "b3sum"),
    ("mmdebstrap", "mmdebstrap"),
    ("arch-test", "arch-test"),
    ("qemu-aarch64-static", "qemu-user-static"),
    ("mkfs.ext4", "e2fsprogs"),
    ("apt-get", "apt"),
    ("apt-cache", "apt"),
    ("dpkg-deb", "dpkg"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("vde_switch", "vde2"),
    ("vde_plug", "vde2"),
    ("wirefilter", "vde2"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_named_for_known_programs() {
        assert_eq!(debian_package("qemu-img"), "qemu-utils");
        assert_eq!(debian_package("vde_plug"), "vde2");
        assert_eq!(debian_package("frobnicate"), "frobnicate");
    }
}
