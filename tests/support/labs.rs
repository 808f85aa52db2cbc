//! farm.toml pieces the VM tests and benchmarks share, so that they all hit the same
//! cached layers in the shared test store.

/// The Debian image, farm's tiny image, the amd64 target, the bundled farm.toml's L1
/// hypervisor platform (`debian_vs`: qemu, qemu-img, vde2, b3sum) and a tiny `leaf`.
pub const HYPERVISOR_LAB: &str = r#"
[images.bookworm]
debian = { suite = "bookworm" }

[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.debian_vs]
from = "bookworm"
upgrade = true
packages = ["qemu-system-x86", "qemu-utils", "vde2", "b3sum"]
memory = "2G"
cpus = 2

[platforms.leaf]
from = "tiny"
memory = "256M"
"#;

/// [`HYPERVISOR_LAB`] followed by `rest`.
pub fn hypervisor_lab(rest: &str) -> String {
    format!("{HYPERVISOR_LAB}{rest}")
}
