//! What every image farm builds has in common, whichever recipe builds it (`tiny_recipe`,
//! `debian_recipe`): the seed library both agents source, the serial console farm logs and
//! the cloud kernel both boot. A leaf: the recipes use it, it uses neither, so a Debian
//! image that embeds the tiny image's recipe (`init = "busybox"`) does not make them use
//! each other.

use crate::model::values::Arch;

/// The seed library both agents source, installed as `/usr/lib/farm/seed-lib.sh`.
pub const SEED_LIBRARY: &str = include_str!("../../guest_agent/seed-lib.sh");

/// The serial console's device: the 16550 `ttyS0` on PC, the PL011 `ttyAMA0` on arm `virt`.
pub fn serial_console(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    }
}

/// The cloud kernel's meta-package for `arch` (it depends on the current versioned kernel).
pub fn kernel_package(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "linux-image-cloud-amd64",
        Arch::Aarch64 => "linux-image-cloud-arm64",
    }
}
