//! Realising a platform layer: start a build VM (booted on the parent's layer, or loaded
//! from the checkpoint of the longest unchanged prefix of steps), run the remaining steps
//! over ssh with a checkpoint after each, shut it down cleanly, squash its disk onto the
//! parent, and leave it (plus kernel and initrd when they changed) in the staging directory
//! for the store to commit. With `builder = "chroot"` the build VM is farm's appliance with
//! the layer's disk as its second disk, and the steps run in a chroot of the image's root
//! (`guest`, `crate::model::build::chroot`); everything else is the same.
//!
//! The parts: `context` (what they all share), `build_vm` (boot or load the VM, reach it),
//! `guest` (where steps run), `checkpointing` (a checkpoint after each step), `playbook`
//! (the Ansible step); this module runs the build with them.
//!
//! Steps run in a fixed order (`model::build_steps`): authorized keys, upgrade, packages,
//! files, run, then a playbook, which `ansible-playbook` applies from this machine. Access
//! is by an ephemeral ed25519 key given through a NoCloud seed, with the guest's host key
//! pinned (also from the seed), so even the build VM is reached with host-key checking on.
//! The key is removed from the layer before commit.

mod build_vm;
mod checkpointing;
mod context;
mod guest;
mod playbook;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::model::build::build_steps::{BuildStep, build_steps, checkpoint_keys};
use crate::model::hash::ContentHash;
use crate::model::shell::shell_quote;
use crate::progress::Reporter;
use crate::sys::qemu_img;
use checkpointing::{Checkpointer, StepDisks, commit_checkpoints};
use context::Log;
pub use context::{Appliance, BootFiles, BuilderError, LayerBuild};
use guest::{Guest, download_newest_kernel};

/// A virtual size large enough for upgrades and packages. The layer is sparse, so unused
/// space costs nothing; the guest's root filesystem is grown to fill it before the steps.
const BUILD_DISK_FLOOR: u64 = 8 << 30;

/// What a layer build did, for its status line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerReport {
    /// Steps of the build, farm's own first step (growing the root filesystem) included.
    pub steps: usize,
    /// Steps taken from checkpoints instead of run.
    pub reused: usize,
}

pub fn build_layer(build: &LayerBuild, reporter: &Reporter) -> Result<LayerReport, BuilderError> {
    let steps = build_steps(&build.platform.steps, &build.recipe.steps);
    if steps.iter().any(|s| s.playbook.is_some()) {
        // Known before minutes of booting.
        playbook::ansible_playbook(build)?;
    }
    let keys = checkpoint_keys(build.recipe, &steps);
    let work = build.staging.dir().join("build");
    fs_err::create_dir_all(&work)?;
    let mut log = Log::create(build.log)?;

    // Resume from the checkpoint of the longest unchanged prefix of steps, if kept.
    let resume = if build.checkpoints {
        build.store.resume_point(build.parent, &keys)
    } else {
        None
    };
    let reused = resume.as_ref().map_or(0, |(n, _)| *n);
    let (base, resumed_boot) = match &resume {
        Some((n, checkpoint)) => {
            log.line(&format!(
                "resuming after step {n} of {} ({}) from checkpoint `{}`",
                steps.len(),
                checkpoint.meta.label,
                checkpoint.dir.display()
            ));
            (checkpoint.disk_path(), checkpoint.boot_dir())
        }
        None => (build.parent.disk_path(), None),
    };
    let boot = match &resumed_boot {
        Some(dir) => BootFiles::in_dir(dir),
        None => build.boot.clone(),
    };

    // The disk: a chain of overlays, one per step (absolute while building); the layer is
    // squashed onto the parent at the end.
    let parent_size = qemu_img::info(&build.parent.disk_path())?.virtual_size;
    let disk = build.staging.disk_path();
    let disks = StepDisks::new(&work, disk.clone(), steps.len());
    qemu_img::create_overlay(
        &disks.during(reused),
        &base,
        Some(parent_size.max(BUILD_DISK_FLOOR)),
    )?;

    // Load the machine state saved after the last reused step, or boot.
    let spinner = reporter.spinner(build.name, "booting build VM");
    let saved = resume.as_ref().and_then(|(_, c)| c.vm_dir());
    let restored = match &saved {
        Some(saved) => {
            spinner.set_message("loading the saved build VM");
            match build_vm::restore(build, &work, &disks.during(reused), saved, &mut log) {
                Ok(running) => Some(running),
                Err(reason) => {
                    log.line(&format!(
                        "cannot load the machine state in `{}` ({reason}); booting the checkpoint's disk instead",
                        saved.display()
                    ));
                    // Whatever the failed attempt wrote goes with it.
                    fs_err::remove_file(disks.during(reused))?;
                    qemu_img::create_overlay(
                        &disks.during(reused),
                        &base,
                        Some(parent_size.max(BUILD_DISK_FLOOR)),
                    )?;
                    spinner.set_message("booting build VM");
                    None
                }
            }
        }
        None => None,
    };
    let running = match restored {
        Some(running) => running,
        None => build_vm::boot(
            build,
            &work,
            &disks.during(reused),
            boot,
            &mut log,
            &spinner,
        )?,
    };
    let guest = match build.appliance {
        Some(_) => Guest::chroot(&running.ssh),
        None => Guest::booted(&running.ssh),
    };
    let mut checkpointer = Checkpointer::start(
        &running,
        &guest,
        disks,
        &work,
        resumed_boot,
        build.checkpoints,
    )?;
    let result = run_steps(
        build,
        &steps,
        reused,
        &guest,
        &mut checkpointer,
        &mut log,
        &spinner,
    )
    .and_then(|()| {
        finish(
            build,
            &guest,
            &running.machine.client_public,
            &mut log,
            &spinner,
        )
    });
    spinner.finish_and_clear();
    let build_vm::BuildVm {
        mut process,
        qmp_dir: _qmp_dir,
        ssh,
        vm,
        ..
    } = running;
    drop(ssh);
    log.append_file("serial console", &vm.serial_log);
    let keep = |log: &mut Log| {
        if !build.checkpoints {
            return;
        }
        let kept = commit_checkpoints(
            build.store,
            build.parent,
            &steps,
            &keys,
            &checkpointer.frozen,
            log,
        );
        log.line(&format!("kept {kept} new step checkpoints"));
    };
    if let Err(e) = result {
        // The steps that did finish are kept: fixing a failed step resumes right before it.
        process.kill();
        keep(&mut log);
        return Err(e);
    }

    spinner.set_message("shutting down");
    if process.wait_exit(Duration::from_secs(120)) {
        log.line("the guest powered off");
    } else {
        log.line("the guest did not power off within 120 s; killing qemu");
        process.kill();
    }
    // One layer on the parent, whatever the chain of checkpoints beneath it.
    let squash = Instant::now();
    qemu_img::rebase_safe(&disk, &build.parent.disk_path())?;
    log.line(&format!(
        "squashed onto the parent in {:.1} s",
        squash.elapsed().as_secs_f64()
    ));
    qemu_img::rebase_unsafe(&disk, &crate::store::relative_backing(build.parent))?;
    keep(&mut log);
    fs_err::remove_dir_all(&work)?;
    Ok(LayerReport {
        steps: steps.len(),
        reused,
    })
}

/// Reads an input again and checks it is still what the derivation hashed.
fn read_verified(path: &Path, expected: &ContentHash) -> Result<Vec<u8>, BuilderError> {
    let bytes = fs_err::read(path)?;
    if &ContentHash::of(&bytes) != expected {
        return Err(BuilderError::InputChanged {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// Runs `steps` from `first` on (the ones before are in the checkpoint the VM resumed
/// from), checkpointing after each.
fn run_steps(
    build: &LayerBuild,
    steps: &[BuildStep],
    first: usize,
    guest: &Guest,
    checkpointer: &mut Checkpointer,
    log: &mut Log,
    spinner: &indicatif::ProgressBar,
) -> Result<(), BuilderError> {
    for (index, step) in steps.iter().enumerate().skip(first) {
        if let Some(playbook) = &step.playbook {
            spinner.set_message(step.label.clone());
            read_verified(&playbook.path, &playbook.hash)?;
            playbook::run_playbook(build, &step.label, &playbook.path, log)?;
            checkpointer.after_step(index, guest, build.boot.as_ref(), log)?;
            continue;
        }
        let stdin = match &step.stdin {
            Some(input) => Some(read_verified(&input.path, &input.hash)?),
            None => None,
        };
        spinner.set_message(step.label.clone());
        let started = Instant::now();
        log.line(&format!("== {}", step.label));
        let out = guest.run(&step.script, stdin.as_deref())?;
        let text = out.text();
        log.raw(&text);
        log.line(&format!(
            "== {} finished in {:.1} s with status {:?}",
            step.label,
            started.elapsed().as_secs_f64(),
            out.status
        ));
        if !out.success() {
            return Err(BuilderError::StepFailed {
                platform: build.name.to_string(),
                step: step.label.clone(),
                status: out
                    .status
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "unknown (killed by a signal)".into()),
                tail: crate::model::text::last_lines(&text, 15),
                log: build.log.to_path_buf(),
            });
        }
        checkpointer.after_step(index, guest, build.boot.as_ref(), log)?;
    }
    Ok(())
}

/// Leaves the guest ready to be a template: fresh boot files extracted when they changed,
/// the build key and per-instance state removed, free blocks discarded, then powered off.
fn finish(
    build: &LayerBuild,
    guest: &Guest,
    build_key: &str,
    log: &mut Log,
    spinner: &indicatif::ProgressBar,
) -> Result<(), BuilderError> {
    spinner.set_message("extracting boot files");
    if let Some(inherited) = &build.boot {
        extract_boot_files(guest, inherited, &build.staging.boot_dir(), log)?;
    }
    spinner.set_message("cleaning up");
    let key_body = build_key.split_whitespace().nth(1).unwrap_or(build_key);
    let cleanup = format!(
        // The build key leaves every account: cloud-init gives the seed's keys to the
        // image's default user too. `cat >` keeps each file's owner and mode.
        "for home in /root $(cut -d: -f6 /etc/passwd | sort -u); do f=\"$home/.ssh/authorized_keys\"; \
           [ -f \"$f\" ] || continue; grep -vF {key} \"$f\" | grep -v ' farm-build$' > /tmp/farm-keys; cat /tmp/farm-keys > \"$f\"; done; rm -f /tmp/farm-keys; \
         [ -e /var/lib/cloud/instance ] && command -v cloud-init >/dev/null && cloud-init clean --logs --seed; \
         [ \"$(cat /etc/hostname 2>/dev/null)\" = farm-build ] && echo localhost > /etc/hostname; \
         [ -f /etc/hosts ] && sed -i '/farm-build/d' /etc/hosts; \
         command -v journalctl >/dev/null && journalctl -q --rotate && journalctl -q --vacuum-time=1s; \
         rm -f /etc/ssh/ssh_host_* /etc/dropbear/dropbear_*_host_key; : > /etc/machine-id; rm -f /var/lib/dbus/machine-id; \
         command -v apt-get >/dev/null && apt-get clean; rm -rf /var/lib/apt/lists/*; \
         fstrim -a >/dev/null 2>&1; sync; true",
        key = shell_quote(key_body)
    );
    log.line("== cleanup");
    let out = guest.run(&cleanup, None)?;
    log.raw(&out.text());
    guest.unmount(log)?;
    log.line("== cleanup finished; powering off");
    spinner.set_message("shutting down");
    // The connection drops as the guest goes down: the result is not an error.
    let _ = guest.machine().run(
        "(sleep 1; poweroff || systemctl poweroff || halt -p) >/dev/null 2>&1 &",
        None,
    );
    Ok(())
}

/// Copies the guest's newest kernel and initrd into `boot_dir` when they differ from the
/// ones it booted with (an upgrade installed a new kernel); otherwise the layer inherits.
fn extract_boot_files(
    guest: &Guest,
    inherited: &BootFiles,
    boot_dir: &Path,
    log: &mut Log,
) -> Result<(), BuilderError> {
    if !download_newest_kernel(guest, boot_dir, &inherited.cmdline, log)? {
        log.line("no readable kernel in /boot: the layer keeps its parent's boot files");
        return Ok(());
    }
    let same_kernel = fs_err::read(&inherited.kernel)? == fs_err::read(boot_dir.join("vmlinuz"))?;
    let same_initrd = match &inherited.initrd {
        Some(p) => fs_err::read(p)? == fs_err::read(boot_dir.join("initrd.img"))?,
        None => false,
    };
    if same_kernel && same_initrd {
        fs_err::remove_dir_all(boot_dir)?;
    } else {
        log.line("boot files changed: the layer keeps its own");
    }
    Ok(())
}
