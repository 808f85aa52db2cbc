//! Starting a layer's build VM, either by booting it or by loading the machine state saved
//! with a step checkpoint, and reaching it over ssh.
//!
//! Why two ways: booting a cloud image under TCG takes most of a minute (firmware, grub,
//! systemd, cloud-init), while loading a saved state takes a second or two. A rebuild that
//! changed only a late step loads the state saved after the step before it and runs on;
//! when the state cannot be loaded (another qemu, other hardware, a damaged file) the disk
//! checkpoint is booted instead, which gives the same result more slowly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::context::{BootFiles, BuilderError, LayerBuild, Log};
use crate::model::build::boot_watch::BootRules;
use crate::model::build::qemu::{
    DirectBoot, Disk, DiskCache, NetBackend, Nic, PortForward, QemuVm,
};
use crate::model::build::seed::{SeedNic, SeedSpec, seed_image_bytes};
use crate::model::lab::ssh_config::{SshHost, known_hosts_line, render};
use crate::model::values::mac_for;
use crate::model::values::{Firmware, uefi_files};
use crate::sys::boot_wait::{self, BootError, LocalQemu, Probe, SshRoute};
use crate::sys::qmp::Qmp;
use crate::sys::ssh::Ssh;
use crate::sys::vm_process::VmProcess;

/// The ssh alias of the build VM in its own ssh_config.
const ALIAS: &str = "farm-build";

/// What a saved machine state needs to run again besides the disk: the same hardware and
/// boot files, the seed and firmware variables it started with, and the build's keys (the
/// guest's sshd and authorized_keys already hold them).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Machine {
    /// Hardware, firmware and kernel command line as JSON: a state loads only into the
    /// machine that saved it.
    pub fingerprint: String,
    pub client_public: String,
    pub host_public: String,
}

/// A running build VM reached over ssh, and the files a checkpoint saves with its state.
pub(super) struct BuildVm {
    pub process: VmProcess,
    /// The QMP name of the disk the steps write (`virtio0`, or the image's disk in the
    /// appliance of a chroot build).
    pub disk_device: &'static str,
    /// Holds the QMP socket (see [`qmp_dir`]); removed when the VM is done.
    pub qmp_dir: tempfile::TempDir,
    pub ssh: Ssh,
    pub vm: QemuVm,
    pub machine: Machine,
    pub client_private: PathBuf,
    pub seed: PathBuf,
    pub boot: Option<BootFiles>,
}

/// The fingerprint of the machine a build of `build` runs, booted with `boot`.
pub(super) fn fingerprint(build: &LayerBuild, boot: Option<&BootFiles>) -> String {
    serde_json::json!({
        "hw": build.hw,
        "firmware": build.firmware,
        "cmdline": boot.map(|b| b.cmdline.clone()),
    })
    .to_string()
}

/// The qemu of a build VM writing `disk`. With `appliance` (a chroot build: farm's tiny
/// VM's own root), that is the first disk and the image's disk the second
/// (`chroot::DISK_DEVICE`), and `boot` is the appliance's.
#[allow(clippy::too_many_arguments)]
fn build_vm(
    build: &LayerBuild,
    work: &Path,
    disk: &Path,
    seed: &Path,
    appliance: Option<&Path>,
    boot: Option<&BootFiles>,
    uefi_vars: Option<PathBuf>,
    port: u16,
) -> QemuVm {
    let qcow2 = |path: &Path| Disk {
        path: path.to_path_buf(),
        format: "qcow2",
        readonly: false,
        cache: DiskCache::Unsafe,
    };
    let mut disks: Vec<Disk> = appliance.map(qcow2).into_iter().collect();
    disks.push(qcow2(disk));
    disks.push(Disk {
        path: seed.to_path_buf(),
        format: "raw",
        readonly: true,
        cache: DiskCache::Unsafe,
    });
    QemuVm {
        name: format!("build-{}", build.name),
        hw: build.hw.clone(),
        disks,
        uefi_vars,
        boot: boot.map(|b| DirectBoot {
            kernel: b.kernel.clone(),
            initrd: b.initrd.clone(),
            cmdline: b.cmdline.clone(),
        }),
        nics: vec![Nic {
            backend: NetBackend::User {
                forwards: vec![PortForward {
                    host_addr: "127.0.0.1".to_string(),
                    host_port: port,
                    guest_port: 22,
                }],
            },
            mac: mac_for(&format!("build-{}", build.name), 0),
        }],
        serial_log: work.join("serial.log"),
        qmp_socket: None,
        pidfile: None,
        daemonize: false,
        tag: None,
        incoming: false,
        display: false,
    }
}

/// A directory for the QMP socket under the system's temporary directory: a socket's path
/// must be under 108 bytes, and a store's staging paths can be longer.
fn qmp_dir() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("farm-qmp")
        .tempdir_in(std::env::temp_dir())
}

/// Writes the ssh_config and known_hosts that reach the VM on `port`.
fn ssh_files(work: &Path, port: u16, host_public: &str) -> Result<PathBuf, BuilderError> {
    let config = work.join("ssh_config");
    fs_err::write(
        work.join("known_hosts"),
        known_hosts_line(ALIAS, host_public),
    )?;
    fs_err::write(
        &config,
        render(
            &[SshHost::vm(
                ALIAS,
                "127.0.0.1",
                port,
                work.join("id_ed25519"),
                work.join("known_hosts"),
                Vec::new(),
            )],
            None,
        ),
    )?;
    Ok(config)
}

/// Boots a fresh build VM on `disk` and waits for ssh and for cloud-init's first boot.
pub(super) fn boot(
    build: &LayerBuild,
    work: &Path,
    disk: &Path,
    boot: Option<BootFiles>,
    log: &mut Log,
    spinner: &indicatif::ProgressBar,
) -> Result<BuildVm, BuilderError> {
    // Access: an ephemeral client key and a host key farm knows in advance (new ones, also
    // after a saved state failed to load and left its copies here).
    let client_private = work.join("id_ed25519");
    for stale in [
        "id_ed25519",
        "id_ed25519.pub",
        "host_ed25519",
        "host_ed25519.pub",
    ] {
        let _ = fs_err::remove_file(work.join(stale));
    }
    let client_key = keygen(&client_private)?;
    let host_key = keygen(&work.join("host_ed25519"))?;
    let mut seed = SeedSpec::new(
        format!("farm-build-{}", build.staging.key().store_key()),
        "farm-build",
    );
    seed.authorized_keys = vec![client_key.public.clone()];
    seed.host_key = Some((host_key.private.clone(), host_key.public.clone()));
    seed.init_modules_only = true;
    seed.nics = vec![SeedNic {
        mac: mac_for(&format!("build-{}", build.name), 0),
        address: None,
        gateway: None,
    }];
    let seed_path = work.join("seed.img");
    fs_err::write(&seed_path, seed_image_bytes(&seed)?)?;
    let port = crate::sys::hostinfo::free_local_port()?;
    let ssh_config = ssh_files(work, port, &host_key.public)?;

    // A chroot build boots farm's appliance on a throwaway overlay of its own; the image's
    // boot files are still what its checkpoints record.
    let (appliance_disk, qemu_boot) = match &build.appliance {
        Some(appliance) => {
            let overlay = work.join("appliance.qcow2");
            let _ = fs_err::remove_file(&overlay);
            crate::sys::qemu_img::create_overlay(&overlay, &appliance.disk, None)?;
            (Some(overlay), Some(appliance.boot.clone()))
        }
        None => (None, boot.clone()),
    };
    // UEFI firmware keeps its variables in a file of the VM's own, from the host's template.
    let uefi_vars = match (&qemu_boot, build.firmware) {
        (None, Firmware::Uefi) => {
            let vars = work.join("efivars.fd");
            let (_, template) = uefi_files(build.hw.arch);
            fs_err::copy(template, &vars).map_err(|e| BuilderError::NoFirmware {
                platform: build.name.to_string(),
                reason: e.to_string(),
            })?;
            Some(vars)
        }
        _ => None,
    };
    let qmp_dir = qmp_dir()?;
    let vm = QemuVm {
        qmp_socket: Some(qmp_dir.path().join("qmp")),
        ..build_vm(
            build,
            work,
            disk,
            &seed_path,
            appliance_disk.as_deref(),
            qemu_boot.as_ref(),
            uefi_vars,
            port,
        )
    };
    log.line(&format!("$ {} {}", vm.binary(), vm.argv().join(" ")));
    let stderr_log = work.join("qemu.stderr");
    let started = Instant::now();
    let mut target = LocalQemu::start(&vm, &stderr_log)?;
    let rules = BootRules {
        timeout: build.boot_timeout,
        direct_boot: qemu_boot.is_some(),
        kvm_inside_tcg: None,
        may_restart: true,
    };
    let route = SshRoute {
        config: &ssh_config,
        alias: ALIAS,
        jump: None,
        probe: Probe::Shell,
    };
    let waited = boot_wait::wait_for_ssh(&mut target, route, rules, &mut |reason, qemu_log| {
        log.line(&format!("restarting the build VM: {reason}"));
        if let Some(qemu_log) = qemu_log {
            log.raw(&qemu_log);
        }
    });
    let boot_failed = |failure, log: &mut Log| {
        log.append_file("serial console", &vm.serial_log);
        BuilderError::Boot {
            platform: build.name.to_string(),
            failure: Box::new(failure),
            log: build.log.to_path_buf(),
        }
    };
    let (ssh, watch) = match waited {
        Ok(answered) => answered,
        Err(BootError::Restart(e)) => return Err(e.into()),
        Err(BootError::Failed(failure)) => return Err(boot_failed(failure, log)),
    };
    let LocalQemu { process, .. } = target;
    log.line(&format!(
        "ssh answered after boot ({} s)",
        spinner.elapsed().as_secs()
    ));
    let disk_device = if build.appliance.is_some() {
        // The appliance has no cloud-init; the image's root is mounted for the steps.
        spinner.set_message("mounting the image");
        super::guest::mount_chroot(build, &ssh, log)?;
        crate::model::build::chroot::DISK_DEVICE
    } else {
        spinner.set_message("waiting for cloud-init");
        let remaining = (started + build.boot_timeout).saturating_duration_since(Instant::now());
        let first_boot = boot_wait::wait_for_first_boot(&watch, &ssh, remaining);
        log.line("== cloud-init status");
        log.raw(&first_boot.output);
        if let Err(failure) = first_boot.ready {
            return Err(boot_failed(failure, log));
        }
        BUILD_DISK_DEVICE
    };
    Ok(BuildVm {
        process,
        disk_device,
        qmp_dir,
        ssh,
        machine: Machine {
            fingerprint: fingerprint(build, boot.as_ref()),
            client_public: client_key.public,
            host_public: host_key.public,
        },
        vm,
        client_private,
        seed: seed_path,
        boot,
    })
}

/// How long a loaded state may take to answer ssh before farm boots the disk instead.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts a build VM on `disk` from the machine state saved in `saved` (a checkpoint's
/// `vm/`), and sets its clock to now. Any failure is returned as a reason: the caller boots.
pub(super) fn restore(
    build: &LayerBuild,
    work: &Path,
    disk: &Path,
    saved: &Path,
    log: &mut Log,
) -> Result<BuildVm, String> {
    let stderr = work.join("qemu.stderr");
    let _ = fs_err::remove_file(&stderr);
    load_saved(build, work, disk, saved, log).map_err(|reason| {
        let tail = crate::sys::hostinfo::tail(&stderr, 5);
        if tail.trim().is_empty() || tail.starts_with("(no log") {
            reason
        } else {
            format!("{reason}; qemu said: {}", tail.trim())
        }
    })
}

fn load_saved(
    build: &LayerBuild,
    work: &Path,
    disk: &Path,
    saved: &Path,
    log: &mut Log,
) -> Result<BuildVm, String> {
    if !saved.join(STATE_FILE).is_file() {
        return Err(format!("`{}` is missing", saved.join(STATE_FILE).display()));
    }
    let text = fs_err::read_to_string(saved.join(MACHINE_FILE)).map_err(|e| e.to_string())?;
    let machine: Machine = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let boot = BootFiles::in_dir(&saved.join("boot"));
    if machine.fingerprint != fingerprint(build, boot.as_ref()) {
        return Err("it was saved by a build VM with other hardware".into());
    }
    let client_private = work.join("id_ed25519");
    let copy = |from: &str, to: &Path, mode: u32| -> std::io::Result<()> {
        fs_err::copy(saved.join(from), to)?;
        use std::os::unix::fs::PermissionsExt;
        fs_err::set_permissions(to, std::fs::Permissions::from_mode(mode))
    };
    copy("id_ed25519", &client_private, 0o600).map_err(|e| e.to_string())?;
    let uefi_vars = if saved.join("efivars.fd").is_file() {
        let vars = work.join("efivars.fd");
        copy("efivars.fd", &vars, 0o644).map_err(|e| e.to_string())?;
        Some(vars)
    } else {
        None
    };
    let port = crate::sys::hostinfo::free_local_port().map_err(|e| e.to_string())?;
    let ssh_config = ssh_files(work, port, &machine.host_public).map_err(|e| e.to_string())?;
    let seed = saved.join("seed.img");
    let qmp_dir = qmp_dir().map_err(|e| e.to_string())?;
    let vm = QemuVm {
        incoming: true,
        qmp_socket: Some(qmp_dir.path().join("qmp")),
        ..build_vm(
            build,
            work,
            disk,
            &seed,
            None,
            boot.as_ref(),
            uefi_vars,
            port,
        )
    };
    log.line(&format!("$ {} {}", vm.binary(), vm.argv().join(" ")));
    let mut process =
        VmProcess::start(&vm, &work.join("qemu.stderr")).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let socket = vm.qmp_socket.clone().expect("build VMs have a QMP socket");
    let mut qmp = connect_when_ready(&socket, &mut process)?;
    let state = saved.join(STATE_FILE);
    qmp.command(
        "migrate-incoming",
        serde_json::json!({ "uri": format!("exec:{}", crate::sys::qmp::load_command(&state)) }),
    )
    .map_err(|e| e.to_string())?;
    // The guest runs on by itself once the state is in (qemu exits if it cannot load it).
    let loading = Instant::now() + RESTORE_TIMEOUT;
    loop {
        process.check_running()?;
        let status = qmp
            .command("query-status", serde_json::json!({}))
            .map_err(|e| e.to_string())?;
        match status["status"].as_str() {
            Some("inmigrate") if Instant::now() < loading => {
                let migration = qmp
                    .command("query-migrate", serde_json::json!({}))
                    .map_err(|e| e.to_string())?;
                if migration["status"] == "failed" {
                    return Err(format!(
                        "the saved state did not load: {}",
                        migration["error-desc"]
                            .as_str()
                            .unwrap_or("no reason given")
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Some("running") => break,
            Some("paused") | Some("postmigrate") => {
                qmp.command("cont", serde_json::json!({}))
                    .map_err(|e| e.to_string())?;
                break;
            }
            other => return Err(format!("the saved state did not load (qemu is {other:?})")),
        }
    }
    let stderr_log = work.join("qemu.stderr");
    let mut target = LocalQemu {
        vm: &vm,
        process,
        stderr_log: &stderr_log,
    };
    let rules = BootRules {
        timeout: RESTORE_TIMEOUT,
        direct_boot: false,
        kvm_inside_tcg: None,
        may_restart: false,
    };
    let route = SshRoute {
        config: &ssh_config,
        alias: ALIAS,
        jump: None,
        probe: Probe::SetClock,
    };
    let (ssh, _) = boot_wait::wait_for_ssh(&mut target, route, rules, &mut |_, _| {}).map_err(
        |e| match e {
            BootError::Failed(failure) => failure
                .render("the loaded build VM", "")
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            BootError::Restart(e) => e.to_string(),
        },
    )?;
    // The guest's clock, which stopped when the state was saved, was set as it answered.
    let LocalQemu { process, .. } = target;
    log.line(&format!(
        "loaded the saved machine state; ssh answered after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(BuildVm {
        process,
        disk_device: BUILD_DISK_DEVICE,
        qmp_dir,
        ssh,
        vm,
        machine,
        client_private,
        seed,
        boot,
    })
}

/// The block device qemu names the first `-drive if=virtio` disk: a booted build VM's.
const BUILD_DISK_DEVICE: &str = "virtio0";

/// The saved state and its description in a checkpoint's `vm/`.
pub(super) const STATE_FILE: &str = "state.zst";
pub(super) const MACHINE_FILE: &str = "machine.json";

/// The shell command qemu writes a state through: zstd's fastest level, since the state
/// is mostly page cache and zeroes.
/// Waits until qemu answers on its QMP socket.
fn connect_when_ready(socket: &Path, process: &mut VmProcess) -> Result<Qmp, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Qmp::connect(socket, Duration::from_secs(60)) {
            Ok(qmp) => return Ok(qmp),
            Err(e) if Instant::now() > deadline => return Err(e.to_string()),
            Err(_) => {
                process.check_running()?;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn keygen(path: &Path) -> Result<crate::sys::keys::KeyPair, BuilderError> {
    Ok(crate::sys::keys::generate(path, "farm-build")?)
}
