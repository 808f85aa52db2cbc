//! Checkpoints taken while a build VM runs a layer's steps (see `crate::store::checkpoints`
//! for how they are kept, `crate::model::build::build_steps` for their keys).
//!
//! After each step the guest syncs, and qemu freezes the disk it was writing
//! (`blockdev-snapshot-sync`): that file is the step's checkpoint, and the VM goes on on a
//! fresh overlay over it. Nothing is copied and the VM never stops, so a checkpoint costs a
//! `sync` and a few milliseconds. When the build ends, the last overlay is squashed onto the
//! parent (the layer stays one layer), and the frozen files move into the store, in step
//! order, with their backing paths made relative.
//!
//! Direct-boot images boot a kernel kept beside the disk, so a step that installs a new
//! kernel (an upgrade) makes later checkpoints boot that kernel: the checkpoint keeps it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::build_vm::{BuildVm, MACHINE_FILE, STATE_FILE};
use super::context::{BootFiles, BuilderError, Log};
use super::guest::Guest;
use crate::model::build::build_steps::BuildStep;
use crate::model::hash::ContentHash;
use crate::store::{CheckpointMeta, Entry, Store};
use crate::sys::qemu_img;
use crate::sys::qmp::Qmp;
use crate::sys::qmp::{save_command, wait_for_migration};

/// No throttle to speak of: 64 GiB/s.
const MIGRATION_BYTES_PER_SECOND: u64 = 64 << 30;

/// Which file the build VM writes during each step: `ck-N.qcow2` in the work directory
/// while step N runs (frozen into step N's checkpoint after it), and the staged layer disk
/// during the cleanup after the last step.
pub(super) struct StepDisks {
    work: PathBuf,
    layer_disk: PathBuf,
    step_count: usize,
}

impl StepDisks {
    pub(super) fn new(work: &Path, layer_disk: PathBuf, step_count: usize) -> Self {
        Self {
            work: work.to_path_buf(),
            layer_disk,
            step_count,
        }
    }

    /// The disk written while step `step` runs; `step == step_count` is the cleanup.
    pub(super) fn during(&self, step: usize) -> PathBuf {
        if step >= self.step_count {
            self.layer_disk.clone()
        } else {
            self.work.join(format!("ck-{step}.qcow2"))
        }
    }
}

/// A checkpoint frozen in the work directory, not yet in the store.
pub(super) struct Frozen {
    step: usize,
    disk: PathBuf,
    /// The boot files in effect after the step, when they are not the parent's.
    boot: Option<PathBuf>,
    /// The machine state saved with it (`vm/`), if any.
    vm: Option<PathBuf>,
}

/// Takes the checkpoints of one build VM.
pub(super) struct Checkpointer {
    qmp: Qmp,
    /// The QMP name of the disk the steps write.
    device: &'static str,
    disks: StepDisks,
    work: PathBuf,
    /// What a saved state is loaded with again; `None` when states are not saved.
    machine: Option<MachineFiles>,
    /// `stat` of `/boot`'s kernels when the current boot files were last known, for
    /// direct-boot guests only.
    boot_listing: Option<String>,
    /// The boot files the guest would boot after the last step, when not the parent's.
    boot: Option<PathBuf>,
    pub(super) frozen: Vec<Frozen>,
}

/// Lists `/boot`'s kernels and initrds with sizes and times: what changes when a step
/// installs a kernel or rebuilds an initrd.
const BOOT_LISTING: &str =
    "stat -c '%n %s %Y' /boot/vmlinuz-* /boot/initrd.img-* 2>/dev/null; true";

/// The files of a running build VM a saved state needs (see `build_vm::Machine`).
struct MachineFiles {
    machine: super::build_vm::Machine,
    client_private: PathBuf,
    seed: PathBuf,
    efivars: Option<PathBuf>,
    boot: Option<BootFiles>,
}

impl Checkpointer {
    /// `boot` is the checkpoint's boot directory the VM was resumed with, if any. Machine
    /// states are saved with checkpoints when `save_states` (and zstd is installed).
    /// `guest` is where the steps run (the VM, or the chroot in it): its `/boot` is read.
    /// A chroot build's appliance is not the machine its steps shape, so its state is never
    /// saved: such checkpoints are disks, resumed by booting the appliance again (seconds).
    pub(super) fn start(
        vm: &BuildVm,
        guest: &Guest,
        disks: StepDisks,
        work: &Path,
        boot: Option<PathBuf>,
        save_states: bool,
    ) -> Result<Self, BuilderError> {
        let socket = vm
            .vm
            .qmp_socket
            .as_deref()
            .expect("build VMs have a QMP socket");
        let qmp = Qmp::connect(socket, Duration::from_secs(120))?;
        let boot_listing = if vm.boot.is_some() {
            Some(guest.run(BOOT_LISTING, None)?.text())
        } else {
            None
        };
        let save_states = save_states
            && !guest.is_chroot()
            && crate::sys::programs::find_program("zstd").is_some();
        Ok(Self {
            qmp,
            device: vm.disk_device,
            disks,
            work: work.to_path_buf(),
            machine: save_states.then(|| MachineFiles {
                machine: vm.machine.clone(),
                client_private: vm.client_private.clone(),
                seed: vm.seed.clone(),
                efivars: vm.vm.uefi_vars.clone(),
                boot: vm.boot.clone(),
            }),
            boot_listing,
            boot,
            frozen: Vec::new(),
        })
    }

    /// Freezes the disk step `step` wrote as its checkpoint; the VM goes on writing the
    /// next step's disk.
    pub(super) fn after_step(
        &mut self,
        step: usize,
        guest: &Guest,
        inherited: Option<&BootFiles>,
        log: &mut Log,
    ) -> Result<(), BuilderError> {
        // What the guest wrote must reach the disk file before it is frozen.
        let listing = guest.run(&format!("sync; {BOOT_LISTING}"), None)?.text();
        if let Some(before) = &self.boot_listing
            && *before != listing
        {
            let dir = self.work.join(format!("boot-{step}"));
            let cmdline = inherited.map(|b| b.cmdline.as_str()).unwrap_or_default();
            if super::guest::download_newest_kernel(guest, &dir, cmdline, log)? {
                self.boot = Some(dir);
            }
            self.boot_listing = Some(listing);
        }
        let next = self.disks.during(step + 1);
        // Stopped, the disk and the machine state are of one instant.
        self.qmp.command("stop", serde_json::json!({}))?;
        let snapshot = self.qmp.command(
            "blockdev-snapshot-sync",
            serde_json::json!({
                "device": self.device,
                "snapshot-file": next.display().to_string(),
                "format": "qcow2",
            }),
        );
        let vm = match (&snapshot, &self.machine) {
            (Ok(_), Some(_)) => {
                let started = std::time::Instant::now();
                match self.save_state(step) {
                    Ok(dir) => {
                        log.line(&format!(
                            "saved the machine state after step {step} in {:.1} s",
                            started.elapsed().as_secs_f64()
                        ));
                        Some(dir)
                    }
                    Err(e) => {
                        log.line(&format!("could not save the machine state: {e}"));
                        None
                    }
                }
            }
            _ => None,
        };
        self.qmp.command("cont", serde_json::json!({}))?;
        snapshot?;
        self.frozen.push(Frozen {
            step,
            disk: self.disks.during(step),
            boot: self.boot.clone(),
            vm,
        });
        Ok(())
    }

    /// Writes the stopped VM's state and what loading it needs into `vm-STEP/`.
    fn save_state(&mut self, step: usize) -> Result<PathBuf, String> {
        let files = self
            .machine
            .as_ref()
            .expect("only called when saving states");
        let dir = self.work.join(format!("vm-{step}"));
        let io = |e: std::io::Error| e.to_string();
        fs_err::create_dir_all(&dir).map_err(io)?;
        // qemu throttles migrations to 128 MiB/s by default, meant for a network shared
        // with running guests; a stopped VM written to a local file should not wait.
        self.qmp
            .command(
                "migrate-set-parameters",
                serde_json::json!({ "max-bandwidth": MIGRATION_BYTES_PER_SECOND }),
            )
            .map_err(|e| e.to_string())?;
        self.qmp
            .command(
                "migrate",
                serde_json::json!({ "uri": format!("exec:{}", save_command(&dir.join(STATE_FILE))) }),
            )
            .map_err(|e| e.to_string())?;
        wait_for_migration(&mut self.qmp, "query-migrate", Duration::from_secs(300))?;
        let link_or_copy = |from: &Path, to: &Path| -> Result<(), String> {
            if fs_err::hard_link(from, to).is_err() {
                fs_err::copy(from, to).map_err(io)?;
            }
            Ok(())
        };
        fs_err::copy(&files.client_private, dir.join("id_ed25519")).map_err(io)?;
        link_or_copy(&files.seed, &dir.join("seed.img"))?;
        if let Some(vars) = &files.efivars {
            fs_err::copy(vars, dir.join("efivars.fd")).map_err(io)?;
        }
        if let Some(boot) = &files.boot {
            let to = dir.join("boot");
            fs_err::create_dir_all(&to).map_err(io)?;
            link_or_copy(&boot.kernel, &to.join("vmlinuz"))?;
            if let Some(initrd) = &boot.initrd {
                link_or_copy(initrd, &to.join("initrd.img"))?;
            }
            fs_err::write(to.join("cmdline"), format!("{}\n", boot.cmdline)).map_err(io)?;
        }
        fs_err::write(
            dir.join(MACHINE_FILE),
            serde_json::to_vec_pretty(&files.machine).expect("machine descriptions serialize"),
        )
        .map_err(io)?;
        Ok(dir)
    }
}

/// Moves the frozen checkpoints into the store in step order, each backed by the one
/// before it (or by the parent). Stops at the first key another build committed first.
/// Failures are logged, not returned: checkpoints only save time.
pub(super) fn commit_checkpoints(
    store: &Store,
    parent: &Entry,
    steps: &[BuildStep],
    keys: &[ContentHash],
    frozen: &[Frozen],
    log: &mut Log,
) -> usize {
    let mut committed = 0;
    for checkpoint in frozen {
        let step = checkpoint.step;
        let previous = step.checked_sub(1).map(|p| keys[p]);
        let meta = CheckpointMeta {
            key: keys[step],
            previous,
            label: steps[step].label.clone(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let backing = store.checkpoint_backing(parent, previous.as_ref());
        let result = qemu_img::rebase_unsafe(&checkpoint.disk, &backing)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                store
                    .commit_checkpoint(
                        parent,
                        &meta,
                        &checkpoint.disk,
                        checkpoint.boot.as_deref(),
                        checkpoint.vm.as_deref(),
                    )
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok(true) => committed += 1,
            Ok(false) => {
                log.line(&format!(
                    "checkpoint of step {step} was made by another build meanwhile; keeping none after it"
                ));
                break;
            }
            Err(e) => {
                log.line(&format!(
                    "could not keep the checkpoint of step {step}: {e}"
                ));
                break;
            }
        }
    }
    committed
}
