//! Where a layer's steps run: the build VM's own shell (`builder = "boot"`), or a chroot of
//! the image's root inside farm's appliance VM (`builder = "chroot"`, see
//! `crate::model::build::chroot`). Everything that acts on the image (steps, checkpoint syncs,
//! kernel downloads, cleanup) goes through a [`Guest`], so it reads the same either way.

use std::path::Path;

use super::context::{BuilderError, LayerBuild, Log};
use crate::model::build::chroot;
use crate::model::shell::shell_quote;
use crate::sys::ssh::{Output, Ssh, SshError};

/// Mounts the image's root in the appliance of a chroot build (`chroot::setup_script`).
pub(super) fn mount_chroot(
    build: &LayerBuild,
    ssh: &Ssh,
    log: &mut Log,
) -> Result<(), BuilderError> {
    log.line("== mounting the image's root filesystem in the appliance");
    let out = ssh.run(&chroot::setup_script(), None)?;
    let text = out.text();
    log.raw(&text);
    if out.success() {
        return Ok(());
    }
    Err(BuilderError::NoChrootRoot {
        platform: build.name.to_string(),
        detail: text.trim().to_string(),
        log: build.log.to_path_buf(),
    })
}

pub(super) struct Guest<'a> {
    ssh: &'a Ssh,
    chroot: bool,
}

impl<'a> Guest<'a> {
    pub(super) fn booted(ssh: &'a Ssh) -> Self {
        Guest { ssh, chroot: false }
    }

    pub(super) fn chroot(ssh: &'a Ssh) -> Self {
        Guest { ssh, chroot: true }
    }

    pub(super) fn is_chroot(&self) -> bool {
        self.chroot
    }

    /// Runs `script` as root in the image, `stdin` on its standard input.
    pub(super) fn run(&self, script: &str, stdin: Option<&[u8]>) -> Result<Output, SshError> {
        if self.chroot {
            self.ssh.run(&chroot::wrap(script), stdin)
        } else {
            self.ssh.run(script, stdin)
        }
    }

    /// Reads a file of the image whole.
    pub(super) fn download(&self, path: &str) -> Result<Output, SshError> {
        self.run(&format!("cat {}", shell_quote(path)), None)
    }

    /// Undoes what [`mount_chroot`] did to the image and unmounts it (`chroot::teardown_script`);
    /// nothing to do in a booted build VM.
    pub(super) fn unmount(&self, log: &mut Log) -> Result<(), SshError> {
        if self.chroot {
            log.line("== unmounting the image");
            let out = self.ssh.run(&chroot::teardown_script(), None)?;
            log.raw(&out.text());
        }
        Ok(())
    }

    /// The machine itself: the build VM, or the appliance around the chroot.
    pub(super) fn machine(&self) -> &Ssh {
        self.ssh
    }
}

/// Downloads the guest's newest kernel and its initrd into `dir` (`vmlinuz`, `initrd.img`,
/// and `cmdline`); `false` when it has none that can be read.
pub(super) fn download_newest_kernel(
    guest: &Guest,
    dir: &Path,
    cmdline: &str,
    log: &mut Log,
) -> Result<bool, BuilderError> {
    let find = guest.run(
        "k=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1); [ -n \"$k\" ] && echo \"$k\" && echo \"/boot/initrd.img-${k#/boot/vmlinuz-}\"",
        None,
    )?;
    let listing = String::from_utf8_lossy(&find.stdout).into_owned();
    let mut lines = listing.lines();
    let (Some(kernel), Some(initrd)) = (lines.next(), lines.next()) else {
        return Ok(false);
    };
    let kernel_bytes = guest.download(kernel)?;
    let initrd_bytes = guest.download(initrd)?;
    if !kernel_bytes.success() || !initrd_bytes.success() {
        return Ok(false);
    }
    log.line(&format!("copied {kernel} and {initrd} out of the guest"));
    fs_err::create_dir_all(dir)?;
    fs_err::write(dir.join("vmlinuz"), &kernel_bytes.stdout)?;
    fs_err::write(dir.join("initrd.img"), &initrd_bytes.stdout)?;
    fs_err::write(dir.join("cmdline"), format!("{cmdline}\n"))?;
    Ok(true)
}
