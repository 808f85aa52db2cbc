//! What every part of a layer build shares: the build's description ([`LayerBuild`]), the
//! boot files and appliance it boots with, its error and its log. A leaf: the build VM,
//! the checkpoints, the guest and the playbook step import it, and it imports none of them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::model::build::boot_watch::BootFailure;
use crate::model::build::derivation::LayerRecipe;
use crate::model::build::qemu::MachineSpec;
use crate::model::config::Platform;
use crate::model::values::Firmware;
use crate::store::{Entry, Staging, Store};
use crate::sys::qemu_img;

/// Kernel, initrd and command line for direct kernel boot, as kept in an entry's `boot/`.
#[derive(Clone, Debug)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

impl BootFiles {
    /// The boot files in `dir` (`vmlinuz`, `initrd.img`, `cmdline`), if it has a kernel.
    pub fn in_dir(dir: &Path) -> Option<BootFiles> {
        let kernel = dir.join("vmlinuz");
        if !kernel.is_file() {
            return None;
        }
        let initrd = Some(dir.join("initrd.img")).filter(|p| p.is_file());
        let cmdline = fs_err::read_to_string(dir.join("cmdline"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "root=/dev/vda rw console=ttyS0".to_string());
        Some(BootFiles {
            kernel,
            initrd,
            cmdline,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuilderError {
    #[error("Step {step} of platform `{platform}` failed with exit status {status}\n{tail}\nhint: the full log is `{}`", log.display())]
    StepFailed {
        platform: String,
        step: String,
        status: String,
        tail: String,
        log: PathBuf,
    },
    #[error("{}", failure.render(&format!("the build VM for `{platform}`"), &format!("the full log is `{}`", log.display())))]
    Boot {
        platform: String,
        failure: Box<BootFailure>,
        log: PathBuf,
    },
    #[error("Cannot mount the image of `{platform}` for a chroot build\n{detail}\nhint: farm's appliance mounts ext4 root filesystems (ext4 /boot and vfat /boot/efi beside them); for another layout set `builder = \"boot\"` on the platform; the full log is `{}`", log.display())]
    NoChrootRoot {
        platform: String,
        detail: String,
        log: PathBuf,
    },
    #[error(
        "Cannot give the build VM for `{platform}` UEFI firmware: {reason}\nhint: install Debian's `ovmf` (x86_64) or `qemu-efi-aarch64` (aarch64), or set `firmware = \"bios\"` on an x86_64 image that boots from BIOS"
    )]
    NoFirmware { platform: String, reason: String },
    #[error(
        "Platform `{platform}` names a playbook, but `ansible-playbook` is not installed here\nhint: install ansible-core (`pip install ansible-core`), or point FARM_ANSIBLE_PLAYBOOK at it"
    )]
    NoAnsible { platform: String },
    #[error("The file `{}` changed since farm hashed it; run farm build again", path.display())]
    InputChanged { path: PathBuf },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    QemuImg(#[from] qemu_img::QemuImgError),
    #[error(transparent)]
    Seed(#[from] crate::model::build::seed::SeedError),
    #[error(transparent)]
    Vm(#[from] crate::sys::vm_process::VmProcessError),
    #[error(transparent)]
    Ssh(#[from] crate::sys::ssh::SshError),
    #[error(transparent)]
    Keygen(#[from] crate::sys::keys::KeygenError),
    #[error("Cannot checkpoint the build VM's disk: {0}")]
    Qmp(#[from] crate::sys::qmp::QmpError),
}

/// Everything one layer build needs.
pub struct LayerBuild<'a> {
    pub name: &'a str,
    pub platform: &'a Platform,
    pub recipe: &'a LayerRecipe,
    pub parent: &'a Entry,
    /// Where step checkpoints are found and kept.
    pub store: &'a Store,
    /// Whether to resume from step checkpoints and keep new ones.
    pub checkpoints: bool,
    /// The boot files the parent boots with (its own or an ancestor's), if it boots directly.
    pub boot: Option<BootFiles>,
    /// How the image's bootloader is started when there are no boot files.
    pub firmware: Firmware,
    pub staging: &'a Staging,
    /// The build VM's hardware, from the target and the command line.
    pub hw: MachineSpec,
    /// How long the guest may take to answer ssh.
    pub boot_timeout: Duration,
    pub log: &'a Path,
    /// farm's appliance, for a `builder = "chroot"` platform: the steps run in a chroot of
    /// the image's root inside it, and the image never boots.
    pub appliance: Option<Appliance>,
}

/// farm's tiny image as the VM a chroot build runs in: its disk (an entry's, never written:
/// the build VM gets an overlay) and its boot files.
#[derive(Clone, Debug)]
pub struct Appliance {
    pub disk: PathBuf,
    pub boot: BootFiles,
}

/// The build log: every command, its output, and the serial console at the end.
pub(super) struct Log {
    file: fs_err::File,
    started: Instant,
}

impl Log {
    pub(super) fn create(path: &Path) -> std::io::Result<Log> {
        if let Some(dir) = path.parent() {
            fs_err::create_dir_all(dir)?;
        }
        Ok(Log {
            file: fs_err::File::create(path)?,
            started: Instant::now(),
        })
    }

    /// One line of farm's own, stamped with the seconds since the build began, so where
    /// a build's time went can be read off the log.
    pub(super) fn line(&mut self, text: &str) {
        let at = self.started.elapsed().as_secs_f64();
        self.raw(&format!("[{at:7.1}s] {text}\n"));
    }

    pub(super) fn raw(&mut self, text: &str) {
        use std::io::Write;
        let _ = self.file.write_all(text.as_bytes());
    }

    pub(super) fn append_file(&mut self, title: &str, path: &Path) {
        let mut text = format!("== {title} ({})\n", path.display());
        let _ = writeln!(
            text,
            "{}",
            fs_err::read(path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        );
        self.raw(&text);
    }
}
