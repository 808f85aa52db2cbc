//! farm.toml pieces the VM tests and benchmarks share, so that they all hit the same
//! cached layers in the shared test store.

/// The Debian image every Debian test starts from, with the amd64 target.
pub const BOOKWORM: &str = r#"
[images.bookworm]
debian = { suite = "bookworm" }

[targets.amd64]
arch = "x86_64"
"#;

/// The parent of every Debian layer the tests build: [`BOOKWORM`] upgraded, once.
const UPGRADED: &str = r#"
[platforms.upgraded]
from = "bookworm"
upgrade = true
"#;

/// [`BOOKWORM`] and its upgraded layer `upgraded`, followed by `rest`.
pub fn debian(rest: &str) -> String {
    format!("{BOOKWORM}{UPGRADED}{rest}")
}

/// farm's tiny image, the L1 hypervisor platform every lab of the tests uses (`debian_vs`:
/// the bundled farm.toml's qemu, qemu-img, vde2 and b3sum, and libvirt, on the upgraded
/// parent; one layer, so a run builds one hypervisor) and a tiny `leaf`.
const HYPERVISOR_PLATFORMS: &str = r#"
[images.tiny]
tiny = true

[platforms.debian_vs]
from = "upgraded"
packages = ["qemu-system-x86", "qemu-utils", "vde2", "b3sum", "libvirt-daemon-system"]
memory = "2G"
cpus = 2

[platforms.leaf]
from = "tiny"
memory = "256M"
"#;

/// The Debian image and its upgraded parent, the tiny image, the amd64 target, the
/// hypervisor platform `debian_vs` and a tiny `leaf`, followed by `rest`.
pub fn hypervisor_lab(rest: &str) -> String {
    debian(&format!("{HYPERVISOR_PLATFORMS}{rest}"))
}
