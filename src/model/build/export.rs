//! Images out (issue 32), as data: the artifact formats a built platform can leave the
//! store as, the `qemu-img` conversion each needs, and the small files that go beside a
//! disk (its checksum line, a Vagrant box's metadata and Vagrantfile).
//!
//! Which formats are reproducible is a fact of qemu-img 7.2, measured: `convert -O raw`
//! and `-O qcow2` (with or without `-c`) give the same bytes for the same chain every run
//! (as long as `-W` is not given); vmdk and vhdx embed random ids and timestamps that no
//! `-o` option fixes.

use std::fmt;
use std::str::FromStr;

use crate::model::hash::HashAlgo;

/// What `farm image export --format` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// One qcow2 with no backing file (compressed with `--compress`).
    Qcow2,
    /// The disk's bytes, as big as its virtual size (sparse where the filesystem allows).
    Raw,
    /// VMware's format.
    Vmdk,
    /// Hyper-V's format.
    Vhdx,
    /// A box for Vagrant's libvirt provider: `box.img`, `metadata.json`, `Vagrantfile`.
    VagrantLibvirt,
    /// A KubeVirt containerDisk: an OCI image whose one layer holds `disk/<name>.qcow2`.
    ContainerDisk,
}

impl ExportFormat {
    pub const ALL: [ExportFormat; 6] = [
        ExportFormat::Qcow2,
        ExportFormat::Raw,
        ExportFormat::Vmdk,
        ExportFormat::Vhdx,
        ExportFormat::VagrantLibvirt,
        ExportFormat::ContainerDisk,
    ];

    /// How it is spelt on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::Qcow2 => "qcow2",
            ExportFormat::Raw => "raw",
            ExportFormat::Vmdk => "vmdk",
            ExportFormat::Vhdx => "vhdx",
            ExportFormat::VagrantLibvirt => "vagrant-libvirt",
            ExportFormat::ContainerDisk => "containerdisk",
        }
    }

    /// The `qemu-img -O` format of the disk inside the artifact.
    pub fn disk_format(self) -> &'static str {
        match self {
            ExportFormat::Raw => "raw",
            ExportFormat::Vmdk => "vmdk",
            ExportFormat::Vhdx => "vhdx",
            ExportFormat::Qcow2 | ExportFormat::VagrantLibvirt | ExportFormat::ContainerDisk => {
                "qcow2"
            }
        }
    }

    /// Whether two exports of one derivation are the same bytes. Not vmdk or vhdx: each
    /// carries ids and times qemu-img makes anew.
    pub fn reproducible(self) -> bool {
        !matches!(self, ExportFormat::Vmdk | ExportFormat::Vhdx)
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ExportFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        ExportFormat::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = ExportFormat::ALL.iter().map(|f| f.name()).collect();
                format!(
                    "Unknown export format `{s}`\nhint: one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The checksum written beside an export (`FILE.<name>`), in the line format its tool's
/// `-c` reads.
///
/// blake3 by default: it is farm's own hash (the store is keyed by it), `b3sum` is in
/// Debian, and at 5 GB/s on one core it is hashed as fast as the disk is written. SHA-256
/// (for a cloud or a Vagrant catalogue that wants it) runs at about a third of that with
/// the CPU's SHA instructions, so it costs an export about three times its time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    Blake3,
    Sha256,
}

impl Checksum {
    pub const ALL: [Checksum; 2] = [Checksum::Blake3, Checksum::Sha256];

    pub fn name(self) -> &'static str {
        self.algo().name()
    }

    pub fn algo(self) -> HashAlgo {
        match self {
            Checksum::Blake3 => HashAlgo::Blake3,
            Checksum::Sha256 => HashAlgo::Sha256,
        }
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Checksum {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Checksum::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Checksum::ALL.iter().map(|c| c.name()).collect();
                format!("Unknown checksum `{s}`\nhint: one of {}", names.join(", "))
            })
    }
}

/// The line `sha256sum -c` and `b3sum -c` read for `file` (its name only: the checksum
/// file lies beside it).
pub fn checksum_line(hex: &str, file: &str) -> String {
    format!("{hex}  {file}\n")
}

/// A Vagrant libvirt box's `metadata.json`: vagrant-libvirt wants the virtual size in
/// whole GiB, rounded up (a size too small breaks the boot).
pub fn vagrant_metadata(virtual_size: u64) -> String {
    let gib = virtual_size.div_ceil(1 << 30).max(1);
    format!(
        "{{\n  \"provider\": \"libvirt\",\n  \"format\": \"qcow2\",\n  \"virtual_size\": {gib}\n}}\n"
    )
}

/// A Vagrant box's own Vagrantfile, merged under the user's: log in as `user` (the account
/// the platform gave keys to; the user's Vagrantfile names the private key with
/// `config.ssh.private_key_path`, since farm never holds one), with `sh` (busybox images
/// have no bash), without sudo when that account is root (they have no sudo either), and
/// no synced folder (a guest may have neither NFS nor rsync). `guest` names the guest's
/// kind for images Vagrant cannot detect (busybox images have no `/etc/os-release`).
pub fn vagrantfile(user: &str, guest: Option<&str>) -> String {
    let sudo = match user {
        "root" => "  config.ssh.sudo_command = \"%c\"\n",
        _ => "",
    };
    let guest = guest
        .map(|kind| format!("  config.vm.guest = :{kind}\n"))
        .unwrap_or_default();
    format!(
        "# Written by farm (`farm image export --format vagrant-libvirt`).\n\
         Vagrant.configure(\"2\") do |config|\n  \
           config.ssh.username = \"{user}\"\n  \
           config.ssh.insert_key = false\n  \
           config.ssh.shell = \"sh\"\n\
         {sudo}{guest}  \
           config.vm.synced_folder \".\", \"/vagrant\", disabled: true\n  \
           config.vm.provider :libvirt do |libvirt|\n    \
             libvirt.disk_bus = \"virtio\"\n  \
           end\n\
         end\n"
    )
}

/// The files of a Vagrant box, in the order they are written into its tar.
pub const VAGRANT_BOX_FILES: [&str; 3] = ["metadata.json", "Vagrantfile", "box.img"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_reads_back_from_its_name_and_an_unknown_one_lists_them() {
        for format in ExportFormat::ALL {
            assert_eq!(format.name().parse::<ExportFormat>(), Ok(format));
        }
        let err = "qcow".parse::<ExportFormat>().unwrap_err();
        assert!(
            err.contains("`qcow`") && err.contains("hint: one of qcow2, raw, vmdk"),
            "{err}"
        );
        assert!(ExportFormat::Qcow2.reproducible() && !ExportFormat::Vhdx.reproducible());
        assert_eq!(ExportFormat::ContainerDisk.disk_format(), "qcow2");
    }

    #[test]
    fn a_box_gives_whole_gibibytes_rounded_up_and_logs_in_with_its_own_key() {
        assert!(vagrant_metadata(1 << 30).contains("\"virtual_size\": 1\n"));
        assert!(vagrant_metadata((1 << 30) + 1).contains("\"virtual_size\": 2\n"));
        let json: serde_json::Value = serde_json::from_str(&vagrant_metadata(3 << 29)).unwrap();
        assert_eq!(json["provider"], "libvirt");
        assert_eq!(json["format"], "qcow2");
        assert_eq!(json["virtual_size"], 2);
        let file = vagrantfile("root", Some("linux"));
        assert!(file.contains("  config.vm.guest = :linux\n"));
        assert!(file.contains("config.ssh.username = \"root\""));
        assert!(file.contains("config.ssh.sudo_command = \"%c\""));
        assert!(file.contains("config.ssh.shell = \"sh\""));
        assert!(file.trim_end().ends_with("end"));
        assert!(!vagrantfile("alice", None).contains("sudo_command"));
        assert!(!vagrantfile("alice", None).contains("config.vm.guest"));
        assert_eq!(checksum_line("ab", "disk.raw"), "ab  disk.raw\n");
    }
}
