//! What farm puts into every Debian image it builds, besides the user's packages: its
//! first-boot agent, the mmdebstrap hooks, the packages it relies on, the kernel command
//! line. All of it is an input of the image's derivation (`digest`), so a farm whose agent
//! changed builds new images instead of reusing stale ones.

pub use crate::model::build::guest_basics::SEED_LIBRARY;
use crate::model::build::guest_basics::{kernel_package, serial_console};
use crate::model::config::DebianInit;
use crate::model::hash::ContentHash;
use crate::model::values::Arch;

/// farm's seed agent, installed as `/usr/local/sbin/farm-seed`.
pub const AGENT_SCRIPT: &str = include_str!("../../guest_agent/farm-seed.sh");
/// The systemd unit that runs the agent early at every boot.
pub const AGENT_UNIT: &str = include_str!("../../guest_agent/farm-seed.service");
/// The mmdebstrap customize hook that installs the agent and strips the build's identity.
pub const CUSTOMIZE_SCRIPT: &str = include_str!("../../guest_agent/customize-rootfs.sh");
/// The customize hook for `init = "busybox"`: the tiny image's boot files instead of the
/// agent's unit, busybox's applets where Debian has no program of that name.
pub const BUSYBOX_CUSTOMIZE_SCRIPT: &str =
    include_str!("../../guest_agent/customize-rootfs-busybox.sh");

/// The customize hook for `init`.
pub fn customize_script(init: DebianInit) -> &'static str {
    match init {
        DebianInit::Systemd => CUSTOMIZE_SCRIPT,
        DebianInit::Busybox => BUSYBOX_CUSTOMIZE_SCRIPT,
    }
}

/// The variant used when the spec names none: the smallest set that still has apt.
pub const DEFAULT_VARIANT: &str = "minbase";

/// Packages farm needs in every image it boots, before the spec's own: the cloud kernel
/// (virtio, ext4 and vfat, no hardware drivers), then per init:
/// - systemd: systemd as init (the agent is a systemd unit; networkd configures NICs), sshd,
///   `ip`, udev for `/dev/disk/by-label`, and systemd-resolved so names resolve with the DNS
///   server DHCP hands out. The agent's other tools (blkid, mount, useradd, ssh-keygen) come
///   with these or with minbase.
/// - busybox: the tiny image's userland: busybox (init, `ip`, udhcpc), dropbear and
///   OpenSSH's sftp-server, which today's `scp` and Ansible's file transfers speak.
pub fn required_packages(arch: Arch, init: DebianInit) -> Vec<String> {
    let own: &[&str] = match init {
        DebianInit::Systemd => &[
            "systemd-sysv",
            "systemd-resolved",
            "openssh-server",
            "iproute2",
            "udev",
        ],
        DebianInit::Busybox => &["busybox-static", "dropbear-bin", "openssh-sftp-server"],
    };
    std::iter::once(kernel_package(arch))
        .chain(own.iter().copied())
        .map(str::to_string)
        .collect()
}

/// The kernel command line for direct kernel boot: the whole first virtio disk is the root
/// filesystem, mounted read-write from the start (fsck needs nothing else), and the console
/// is the serial port farm logs (`ttyS0` on PC, the PL011 `ttyAMA0` on the arm `virt` board).
/// With busybox as init the tiny image's initramfs mounts the disk, so its command line.
pub fn kernel_cmdline(arch: Arch, init: DebianInit) -> String {
    match init {
        DebianInit::Systemd => format!("root=/dev/vda rw console={}", serial_console(arch)),
        DebianInit::Busybox => crate::model::build::tiny_recipe::kernel_cmdline(arch),
    }
}

/// Runs after the essential packages, before the kernel package builds the initramfs:
/// writes the root fstab (the whole first virtio disk, no partition table) and tells
/// initramfs-tools the root is ext4. Its fsck hook would otherwise probe `/dev/vda` on the
/// build machine, find nothing and leave fsck out, and a VM killed mid-write would boot
/// without its root filesystem checked.
pub const ESSENTIAL_HOOK: &str = concat!(
    r#"printf '/dev/vda\t/\text4\tdefaults\t0\t1\n' > "$1/etc/fstab" && "#,
    r#"mkdir -p "$1/etc/initramfs-tools/conf.d" && "#,
    r#"echo FSTYPE=ext4 > "$1/etc/initramfs-tools/conf.d/farm-fsck""#,
);

/// blake3 over everything above for `arch` and `init`: part of every Debian image
/// derivation. systemd's parts are hashed as they were before `init` existed, so those
/// images keep their keys; busybox adds its hook and the tiny image's recipe.
pub fn digest(arch: Arch, init: DebianInit) -> ContentHash {
    let mut hasher = blake3::Hasher::new();
    if init == DebianInit::Busybox {
        let tiny = crate::model::build::tiny_recipe::digest(arch).to_hex();
        for part in [BUSYBOX_CUSTOMIZE_SCRIPT.as_bytes(), tiny.as_bytes()] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
    }
    for part in [
        AGENT_SCRIPT,
        SEED_LIBRARY,
        AGENT_UNIT,
        CUSTOMIZE_SCRIPT,
        ESSENTIAL_HOOK,
        DEFAULT_VARIANT,
    ] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    for package in required_packages(arch, init) {
        hasher.update(package.as_bytes());
        hasher.update(b"\n");
    }
    hasher.update(kernel_cmdline(arch, init).as_bytes());
    ContentHash::from_blake3(hasher.finalize())
}
