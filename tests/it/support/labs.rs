//! farm.toml pieces the VM tests and benchmarks share, so that they all hit the same
//! cached layers in the shared test store.

/// The Debian image every Debian test starts from, with the amd64 target.
pub const BOOKWORM: &str = r#"
[images.bookworm]
debian = { suite = "bookworm" }

[targets.amd64]
arch = "x86_64"
"#;

/// The image of the Debian L2 guests, as the bundled `images/debian-bookworm-busybox.toml`
/// (the same derivation: `bundle.rs` checks it), under the name `pybox`.
pub const L2_IMAGE: &str = r#"
[images.pybox]
debian = { suite = "bookworm", init = "busybox", packages = ["python3", "python3-apt", "rsync"] }
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

/// farm's tiny image, the L1 hypervisor platform every lab of the tests uses and a tiny
/// `leaf`. The hypervisor is the bundled farm.toml's, derivation for derivation (`bundle.rs`
/// checks that they stay the same): `bookworm_kvm` (Debian with the libvirt stack, installed
/// by mmdebstrap), upgraded (`kvm_init`), then `debian_vs`.
const HYPERVISOR_PLATFORMS: &str = r#"
[images.tiny]
tiny = true

[images.bookworm_kvm]
debian = { suite = "bookworm", packages = ["qemu-system-x86", "qemu-utils", "libvirt-daemon-system", "vde2", "b3sum", "zstd", "python3", "rsync"] }

[platforms.kvm_init]
from = "bookworm_kvm"
upgrade = true

[platforms.debian_vs]
from = "kvm_init"
memory = "2G"
cpus = 2

[platforms.leaf]
from = "tiny"
memory = "256M"
"#;

/// The Debian image and its upgraded parent, the tiny image, the amd64 target, the
/// hypervisor platform `debian_vs` (on its own image) and a tiny `leaf`, followed by `rest`.
pub fn hypervisor_lab(rest: &str) -> String {
    debian(&format!("{HYPERVISOR_PLATFORMS}{rest}"))
}

/// The shape of the tests' shared labs, as the seed's: hv (`debian_vs`, its guests libvirt
/// domains) joins the VDE network `lab` (`vxvde://GROUP`, `PREFIX.0/24`) with a tap at
/// `PREFIX.254`; inside it, `LEAF_amd64` (deployed by hv for the target amd64) on QEMU's user
/// network, with `leaf_lines` added, and `vleaf_amd64` of the same platform only on `lab`
/// at `PREFIX.21`, reached through hv's tap. Both L2s are provisioned by `site.yml`. `rest`
/// defines platform `leaf` names, if it is not the tiny `leaf`.
pub fn two_leaf_lab(leaf: &str, group: &str, prefix: &str, leaf_lines: &str, rest: &str) -> String {
    hypervisor_lab(&format!(
        r#"{rest}
[networks.lab]
kind = "vde"
url = "vxvde://{group}"
subnet = "{prefix}.0/24"

[vms.hv]
platform = "debian_vs"
backend = "libvirt"
attach = {{ lab = "{prefix}.254/24" }}
deploy = {{ targets = ["amd64"], platforms = ["{leaf}"] }}

[vms.{leaf}_amd64]
playbook = "site.yml"
{leaf_lines}

[vms.vleaf_amd64]
platform = "{leaf}"
host = "hv"
user_network = false
nics = [{{ network = "lab", ip = "{prefix}.21/24" }}]
playbook = "site.yml"
"#
    ))
}

/// hv's line in [`two_leaf_lab`] with `leaf`, which a test adds hv's own lines after.
pub fn hv_deploy_line(leaf: &str) -> String {
    format!(r#"deploy = {{ targets = ["amd64"], platforms = ["{leaf}"] }}"#)
}
