//! What farm puts into its *tiny* image (see `crate::build::tiny_image`): the boot scripts, the
//! Debian packages it unpacks, the kernel modules and the kernel command line. All of it is
//! an input of the image's derivation (`digest`), so a farm whose boot script changed
//! builds a new tiny image instead of reusing a stale one.

use crate::model::build::guest_basics::{kernel_package, serial_console};
use crate::model::hash::ContentHash;
use crate::model::values::Arch;

/// busybox init's `sysinit` script: mounts, seed, network.
pub const BOOT_SCRIPT: &str = include_str!("../../guest_agent/tiny-init.sh");
/// The seed library shared with the Debian images' agent (`/usr/lib/farm/seed-lib.sh`).
pub use crate::model::build::guest_basics::SEED_LIBRARY;
/// The initramfs `/init`: loads the virtio modules and switches to the disk.
pub const INITRAMFS_INIT: &str = include_str!("../../guest_agent/tiny/initramfs-init.sh");
/// busybox init's configuration: what makes `poweroff` work.
pub const INITTAB: &str = include_str!("../../guest_agent/tiny/inittab");
/// Starts dropbear with the seeded host key when there is one.
pub const SSHD_SCRIPT: &str = include_str!("../../guest_agent/tiny/sshd.sh");
/// udhcpc's hook that applies a lease.
pub const UDHCPC_SCRIPT: &str = include_str!("../../guest_agent/tiny/udhcpc.script");

/// The kernel command line. `quiet` because every line on a serial console costs time under
/// TCG; the disk is mounted by the initramfs, so no `root=`.
pub fn kernel_cmdline(arch: Arch) -> String {
    format!("console={} quiet", serial_console(arch))
}

/// busybox init's configuration with the shell on `arch`'s serial console.
pub fn inittab(arch: Arch) -> String {
    INITTAB.replace("ttyS0::", &format!("{}::", serial_console(arch)))
}

/// The meta-package whose `Depends:` names the current versioned cloud kernel
/// (`linux-image-cloud-amd64`, `linux-image-cloud-arm64`).
pub fn kernel_meta_package(arch: Arch) -> &'static str {
    kernel_package(arch)
}

/// Where `arch`'s libraries live in Debian (`lib/x86_64-linux-gnu`), and its dynamic loader:
/// the file name there and the path every executable names as its interpreter.
pub struct LibraryLayout {
    pub dir: &'static str,
    pub loader: &'static str,
    pub interpreter: &'static str,
}

pub fn library_layout(arch: Arch) -> LibraryLayout {
    match arch {
        Arch::X86_64 => LibraryLayout {
            dir: "lib/x86_64-linux-gnu",
            loader: "ld-linux-x86-64.so.2",
            interpreter: "lib64/ld-linux-x86-64.so.2",
        },
        Arch::Aarch64 => LibraryLayout {
            dir: "lib/aarch64-linux-gnu",
            loader: "ld-linux-aarch64.so.1",
            interpreter: "lib/ld-linux-aarch64.so.1",
        },
    }
}

/// The modules the guest needs (their dependencies are added from each module's
/// `depends=`): virtio disks and NICs, and FAT for the seed volume. A module missing from
/// the package but listed in `modules.builtin` is skipped.
pub const WANTED_MODULES: [&str; 8] = [
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859-1",
    "ext4",
];

/// Packages besides the kernel: busybox is static; dropbear is not, so the libraries it
/// links against come from their packages too ([`DROPBEAR_LIBS`]). OpenSSH's sftp-server
/// (libc only) is there because today's `scp` speaks SFTP.
pub const PACKAGES: [&str; 9] = [
    "busybox-static",
    "dropbear-bin",
    "openssh-sftp-server",
    "libc6",
    "libcrypt1",
    "libtomcrypt1",
    "libtommath1",
    "libgmp10",
    "zlib1g",
];

/// The shared objects dropbear, dropbearconvert and dropbearkey need besides the loader
/// (their `NEEDED` entries, transitively: libtomcrypt pulls libgmp), copied into the
/// architecture's library directory ([`library_layout`]), which Debian's dynamic loader
/// searches without an `ld.so.cache`.
pub const DROPBEAR_LIBS: [&str; 6] = [
    "libc.so.6",
    "libcrypt.so.1",
    "libtomcrypt.so.1",
    "libtommath.so.1",
    "libgmp.so.10",
    "libz.so.1",
];

/// blake3 over everything above for `arch`: part of every tiny image derivation.
pub fn digest(arch: Arch) -> ContentHash {
    let mut hasher = blake3::Hasher::new();
    let layout = library_layout(arch);
    let (cmdline, inittab) = (kernel_cmdline(arch), inittab(arch));
    let parts = [
        BOOT_SCRIPT,
        SEED_LIBRARY,
        INITRAMFS_INIT,
        INITTAB,
        SSHD_SCRIPT,
        UDHCPC_SCRIPT,
        cmdline.as_str(),
        inittab.as_str(),
        kernel_meta_package(arch),
        layout.dir,
        layout.loader,
        layout.interpreter,
        arch.debian_name(),
    ];
    let lists: [&[&str]; 3] = [&WANTED_MODULES, &PACKAGES, &DROPBEAR_LIBS];
    for part in parts.iter().chain(lists.iter().flat_map(|l| l.iter())) {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    ContentHash::from_blake3(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_arch_gets_its_console_loader_and_kernel() {
        let arm = Arch::Aarch64;
        assert_eq!(kernel_cmdline(arm), "console=ttyAMA0 quiet");
        assert!(inittab(arm).contains("\nttyAMA0::respawn:-/bin/sh\n"));
        assert!(!inittab(arm).contains("ttyS0"));
        assert_eq!(inittab(Arch::X86_64), INITTAB);
        assert_eq!(kernel_meta_package(arm), "linux-image-cloud-arm64");
        assert_eq!(library_layout(arm).interpreter, "lib/ld-linux-aarch64.so.1");
        assert_ne!(digest(arm), digest(Arch::X86_64));
    }
}
