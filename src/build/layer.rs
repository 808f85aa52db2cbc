//! Realising a platform layer: boot a build VM on an overlay of the parent's layer, run the
//! platform's steps over ssh, shut it down cleanly, and leave the overlay (plus kernel and
//! initrd when they changed) in the staging directory for the store to commit.
//!
//! Steps run in a fixed order, the order of `StepInputs`: authorized keys, upgrade,
//! packages, files, run. Access is by an ephemeral ed25519 key given through a NoCloud seed,
//! with the guest's host key pinned (also from the seed), so even the build VM is reached
//! with host-key checking on. The key is removed from the layer before commit.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::model::config::Platform;
use crate::model::derivation::{Recipe, StepInputs};
use crate::model::first_boot::{self, CloudInit, ConsoleVerdict};
use crate::model::hash::ContentHash;
use crate::model::qemu::{
    DirectBoot, Disk, DiskCache, MachineSpec, NetBackend, Nic, PortForward, QemuVm, mac_for,
};
use crate::model::seed::{SeedNic, SeedSpec, seed_image_bytes};
use crate::model::ssh_config::{SshHost, known_hosts_line, render};
use crate::model::values::{Firmware, uefi_files};
use crate::progress::Reporter;
use crate::store::{Entry, Staging};
use crate::sys::qemu_img;
use crate::sys::ssh::{Ssh, shell_quote};
use crate::sys::vm_process::VmProcess;

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
    #[error("The build VM for `{platform}` did not answer ssh within {seconds} s ({reason})\nlast lines of its serial console:\n{serial}\nhint: the full log is `{}`", log.display())]
    NoSsh {
        platform: String,
        seconds: u64,
        reason: String,
        serial: String,
        log: PathBuf,
    },
    #[error("The build VM for `{platform}` booted to a login prompt, but its image has neither cloud-init nor farm's agent, so nothing will install farm's key\nlast lines of its serial console:\n{serial}\nhint: {}; the full log is `{}`", first_boot::NO_AGENT_HINT, log.display())]
    NoAgent {
        platform: String,
        serial: String,
        log: PathBuf,
    },
    #[error("cloud-init in the build VM for `{platform}` ended in `{status}`\n{detail}\nhint: the image's own first boot failed before any step ran; the full log is `{}`", log.display())]
    CloudInit {
        platform: String,
        status: String,
        detail: String,
        log: PathBuf,
    },
    #[error(
        "Cannot give the build VM for `{platform}` UEFI firmware: {reason}\nhint: install Debian's `ovmf` (x86_64) or `qemu-efi-aarch64` (aarch64), or set `firmware = \"bios\"` on an x86_64 image that boots from BIOS"
    )]
    NoFirmware { platform: String, reason: String },
    #[error("The file `{}` changed since farm hashed it; run farm build again", path.display())]
    InputChanged { path: PathBuf },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    QemuImg(#[from] qemu_img::QemuImgError),
    #[error(transparent)]
    Seed(#[from] crate::model::seed::SeedError),
    #[error(transparent)]
    Vm(#[from] crate::sys::vm_process::VmProcessError),
    #[error(transparent)]
    Ssh(#[from] crate::sys::ssh::SshError),
    #[error(transparent)]
    Keygen(#[from] crate::sys::keys::KeygenError),
}

/// Everything one layer build needs.
pub struct LayerBuild<'a> {
    pub name: &'a str,
    pub platform: &'a Platform,
    pub recipe: &'a Recipe,
    pub parent: &'a Entry,
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
}

/// A virtual size large enough for upgrades and packages. The layer is sparse, so unused
/// space costs nothing; the guest's root filesystem is grown to fill it before the steps.
const BUILD_DISK_FLOOR: u64 = 8 << 30;

pub fn build_layer(build: &LayerBuild, reporter: &Reporter) -> Result<(), BuilderError> {
    let Recipe::Layer { steps, .. } = build.recipe else {
        unreachable!("build_layer is only called for layers")
    };
    let work = build.staging.dir().join("build");
    fs_err::create_dir_all(&work)?;
    let mut log = Log::create(build.log)?;

    // The disk: an overlay on the parent's layer (absolute while building, relative at commit).
    let parent_size = qemu_img::info(&build.parent.disk_path())?.virtual_size;
    let disk = build.staging.disk_path();
    qemu_img::create_overlay(
        &disk,
        &build.parent.disk_path(),
        Some(parent_size.max(BUILD_DISK_FLOOR)),
    )?;

    // Access: an ephemeral client key and a host key farm knows in advance.
    let client_key = keygen(&work.join("id_ed25519"))?;
    let host_key = keygen(&work.join("host_ed25519"))?;
    let mac = mac_for(&format!("build-{}", build.name), 0);
    let mut seed = SeedSpec::new(
        format!("farm-build-{}", build.staging.key().store_key()),
        "farm-build",
    );
    seed.authorized_keys = vec![client_key.public.clone()];
    seed.host_key = Some((host_key.private.clone(), host_key.public.clone()));
    seed.nics = vec![SeedNic {
        mac,
        address: None,
        gateway: None,
    }];
    let seed_path = work.join("seed.img");
    fs_err::write(&seed_path, seed_image_bytes(&seed)?)?;

    let port = crate::sys::hostinfo::free_local_port()?;
    let alias = "farm-build";
    let ssh_config = work.join("ssh_config");
    fs_err::write(
        work.join("known_hosts"),
        known_hosts_line(alias, &host_key.public),
    )?;
    fs_err::write(
        &ssh_config,
        render(&[SshHost::vm(
            alias,
            "127.0.0.1",
            port,
            work.join("id_ed25519"),
            work.join("known_hosts"),
            Vec::new(),
        )]),
    )?;

    // UEFI firmware keeps its variables in a file of the VM's own, from the host's template.
    let uefi_vars = match (&build.boot, build.firmware) {
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
    let vm = QemuVm {
        name: format!("build-{}", build.name),
        hw: build.hw.clone(),
        disks: vec![
            Disk {
                path: disk.clone(),
                format: "qcow2",
                readonly: false,
                cache: DiskCache::Unsafe,
            },
            Disk {
                path: seed_path,
                format: "raw",
                readonly: true,
                cache: DiskCache::Unsafe,
            },
        ],
        uefi_vars,
        boot: build.boot.as_ref().map(|b| DirectBoot {
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
            mac,
        }],
        serial_log: work.join("serial.log"),
        qmp_socket: None,
        pidfile: None,
        daemonize: false,
        tag: None,
    };
    log.line(&format!("$ {} {}", vm.binary(), vm.argv().join(" ")));

    let spinner = reporter.spinner(build.name, "booting build VM");
    let mut process = VmProcess::start(&vm, &work.join("qemu.stderr"))?;
    let deadline = Instant::now() + build.boot_timeout;
    let mut no_agent = false;
    let ssh = Ssh::wait_for(&ssh_config, alias, deadline, || {
        process.check_running().map_err(|e| {
            format!(
                "{e}; {}",
                crate::sys::hostinfo::tail(&work.join("qemu.stderr"), 5)
            )
        })?;
        let console = fs_err::read(&vm.serial_log).unwrap_or_default();
        if first_boot::read_console(&String::from_utf8_lossy(&console)) == ConsoleVerdict::NoAgent {
            no_agent = true;
            return Err("no agent".into());
        }
        Ok(())
    })
    .map_err(|e| {
        log.append_file("serial console", &vm.serial_log);
        let serial = crate::sys::hostinfo::tail(&vm.serial_log, 25);
        if no_agent {
            return BuilderError::NoAgent {
                platform: build.name.to_string(),
                serial,
                log: build.log.to_path_buf(),
            };
        }
        BuilderError::NoSsh {
            platform: build.name.to_string(),
            seconds: build.boot_timeout.as_secs(),
            reason: e.to_string(),
            serial,
            log: build.log.to_path_buf(),
        }
    })?;
    log.line(&format!(
        "ssh answered after boot ({} s)",
        spinner.elapsed().as_secs()
    ));
    spinner.set_message("waiting for cloud-init");
    let waited = wait_for_cloud_init(build, &ssh, deadline, &mut log);
    if waited.is_err() {
        log.append_file("serial console", &vm.serial_log);
    }
    waited?;

    let result = run_steps(build, steps, &ssh, &mut log, &spinner)
        .and_then(|()| finish(build, &ssh, &client_key.public, &mut log, &spinner));
    spinner.finish_and_clear();
    drop(ssh);
    log.append_file("serial console", &vm.serial_log);
    result?;

    spinner.set_message("shutting down");
    if !process.wait_exit(Duration::from_secs(120)) {
        log.line("the guest did not power off within 120 s; killing qemu");
        process.kill();
    }
    fs_err::remove_dir_all(&work)?;
    qemu_img::rebase_unsafe(&disk, &crate::store::relative_backing(build.parent))?;
    Ok(())
}

/// Steps run only once cloud-init (in images that have it) has finished its first boot:
/// before that, apt may be locked, users and keys half made. A cloud-init that failed
/// fails the build with its own words.
fn wait_for_cloud_init(
    build: &LayerBuild,
    ssh: &Ssh,
    deadline: Instant,
    log: &mut Log,
) -> Result<(), BuilderError> {
    let seconds = deadline
        .saturating_duration_since(Instant::now())
        .as_secs()
        .max(60);
    let out = ssh.run(&first_boot::wait_script(seconds), None)?;
    let text = out.text();
    log.line("== cloud-init status");
    log.raw(&text);
    match first_boot::parse_wait_output(&text) {
        CloudInit::Absent | CloudInit::Done => Ok(()),
        CloudInit::Pending { status } => Err(BuilderError::CloudInit {
            platform: build.name.to_string(),
            status: format!("still {status} after {seconds} s"),
            detail: String::new(),
            log: build.log.to_path_buf(),
        }),
        CloudInit::Failed {
            status,
            detail,
            log_tail,
        } => Err(BuilderError::CloudInit {
            platform: build.name.to_string(),
            status,
            detail: format!("{detail}\nlast lines of /var/log/cloud-init.log:\n{log_tail}"),
            log: build.log.to_path_buf(),
        }),
    }
}

/// One step's script, shown in progress and errors by `label`.
struct StepScript {
    label: String,
    script: String,
    stdin: Option<Vec<u8>>,
}

/// The steps as shell scripts, in the documented order. apt is required; dnf and apk are
/// used when apt-get is missing.
fn step_scripts(build: &LayerBuild, steps: &StepInputs) -> Result<Vec<StepScript>, BuilderError> {
    let mut out = Vec::new();
    out.push(StepScript {
        label: "grow root filesystem".into(),
        // Images farm builds have ext4 directly on /dev/vda; cloud images grow themselves.
        script: "if [ \"$(findmnt -no SOURCE /)\" = /dev/vda ] && command -v resize2fs >/dev/null; then resize2fs /dev/vda; fi".into(),
        stdin: None,
    });
    for (grant, key) in build
        .platform
        .steps
        .authorized_keys
        .iter()
        .zip(&steps.authorized_keys)
    {
        let bytes = read_verified(&grant.key_file.value, &key.key)?;
        let user = shell_quote(&grant.user);
        out.push(StepScript {
            label: format!("authorized_keys for {}", grant.user),
            script: format!(
                "set -e; id -u {user} >/dev/null 2>&1 || useradd -m -s /bin/sh {user}; \
                 home=$(getent passwd {user} | cut -d: -f6); mkdir -p \"$home/.ssh\"; \
                 cat >> \"$home/.ssh/authorized_keys\"; \
                 chown -R {user}: \"$home/.ssh\"; chmod 700 \"$home/.ssh\"; chmod 600 \"$home/.ssh/authorized_keys\""
            ),
            stdin: Some(bytes),
        });
    }
    const APT: &str = "export DEBIAN_FRONTEND=noninteractive; APT='apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold'";
    if steps.upgrade {
        out.push(StepScript {
            label: "upgrade".into(),
            script: format!(
                "set -e; if command -v apt-get >/dev/null; then {APT}; $APT update && $APT dist-upgrade; \
                 elif command -v dnf >/dev/null; then dnf -y upgrade; \
                 elif command -v apk >/dev/null; then apk upgrade --update; \
                 else echo 'no supported package manager (apt-get, dnf, apk)' >&2; exit 127; fi"
            ),
            stdin: None,
        });
    }
    if !steps.packages.is_empty() {
        let list: Vec<String> = steps.packages.iter().map(|p| shell_quote(p)).collect();
        let list = list.join(" ");
        out.push(StepScript {
            label: format!("packages ({})", steps.packages.join(", ")),
            script: format!(
                "set -e; if command -v apt-get >/dev/null; then {APT}; $APT update && $APT install --no-install-recommends {list}; \
                 elif command -v dnf >/dev/null; then dnf -y install {list}; \
                 elif command -v apk >/dev/null; then apk add --update {list}; \
                 else echo 'no supported package manager (apt-get, dnf, apk)' >&2; exit 127; fi"
            ),
            stdin: None,
        });
    }
    for ((guest, local), expected) in build.platform.steps.files.iter().zip(steps.files.values()) {
        let bytes = read_verified(&local.value, expected)?;
        let path = shell_quote(guest);
        out.push(StepScript {
            label: format!("file {guest}"),
            script: format!("set -e; mkdir -p \"$(dirname {path})\"; cat > {path}"),
            stdin: Some(bytes),
        });
    }
    for (i, command) in steps.run.iter().enumerate() {
        out.push(StepScript {
            label: format!("run[{i}] `{command}`"),
            script: format!("sh -ec {}", shell_quote(command)),
            stdin: None,
        });
    }
    Ok(out)
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

fn run_steps(
    build: &LayerBuild,
    steps: &StepInputs,
    ssh: &Ssh,
    log: &mut Log,
    spinner: &indicatif::ProgressBar,
) -> Result<(), BuilderError> {
    for step in step_scripts(build, steps)? {
        spinner.set_message(step.label.clone());
        let started = Instant::now();
        log.line(&format!("== {}", step.label));
        let out = ssh.run(&step.script, step.stdin.as_deref())?;
        let text = out.text();
        log.raw(&text);
        log.line(&format!(
            "== {} finished in {:.1} s with status {:?}",
            step.label,
            started.elapsed().as_secs_f64(),
            out.status
        ));
        if !out.success() {
            let lines: Vec<&str> = text.lines().collect();
            return Err(BuilderError::StepFailed {
                platform: build.name.to_string(),
                step: step.label,
                status: out
                    .status
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "unknown (killed by a signal)".into()),
                tail: lines[lines.len().saturating_sub(15)..].join("\n"),
                log: build.log.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Leaves the guest ready to be a template: fresh boot files extracted when they changed,
/// the build key and per-instance state removed, free blocks discarded, then powered off.
fn finish(
    build: &LayerBuild,
    ssh: &Ssh,
    build_key: &str,
    log: &mut Log,
    spinner: &indicatif::ProgressBar,
) -> Result<(), BuilderError> {
    spinner.set_message("extracting boot files");
    if let Some(inherited) = &build.boot {
        extract_boot_files(ssh, inherited, &build.staging.boot_dir(), log)?;
    }
    spinner.set_message("cleaning up");
    let key_body = build_key.split_whitespace().nth(1).unwrap_or(build_key);
    let cleanup = format!(
        // The build key leaves every account: cloud-init gives the seed's keys to the
        // image's default user too. `cat >` keeps each file's owner and mode.
        "for home in /root $(cut -d: -f6 /etc/passwd | sort -u); do f=\"$home/.ssh/authorized_keys\"; \
           [ -f \"$f\" ] || continue; grep -vF {key} \"$f\" > /tmp/farm-keys; cat /tmp/farm-keys > \"$f\"; done; rm -f /tmp/farm-keys; \
         command -v cloud-init >/dev/null && cloud-init clean --logs --seed; \
         [ \"$(cat /etc/hostname 2>/dev/null)\" = farm-build ] && echo localhost > /etc/hostname; \
         [ -f /etc/hosts ] && sed -i '/farm-build/d' /etc/hosts; \
         command -v journalctl >/dev/null && journalctl -q --rotate && journalctl -q --vacuum-time=1s; \
         rm -f /etc/ssh/ssh_host_* /etc/dropbear/dropbear_*_host_key; : > /etc/machine-id; rm -f /var/lib/dbus/machine-id; \
         command -v apt-get >/dev/null && apt-get clean; rm -rf /var/lib/apt/lists/*; \
         fstrim -a >/dev/null 2>&1; sync; true",
        key = shell_quote(key_body)
    );
    let out = ssh.run(&cleanup, None)?;
    log.raw(&out.text());
    spinner.set_message("shutting down");
    // The connection drops as the guest goes down: the result is not an error.
    let _ = ssh.run(
        "(sleep 1; poweroff || systemctl poweroff || halt -p) >/dev/null 2>&1 &",
        None,
    );
    Ok(())
}

/// Copies the guest's newest kernel and initrd into `boot_dir` when they differ from the
/// ones it booted with (an upgrade installed a new kernel); otherwise the layer inherits.
fn extract_boot_files(
    ssh: &Ssh,
    inherited: &BootFiles,
    boot_dir: &Path,
    log: &mut Log,
) -> Result<(), BuilderError> {
    let find = ssh.run(
        "k=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1); [ -n \"$k\" ] && echo \"$k\" && echo \"/boot/initrd.img-${k#/boot/vmlinuz-}\"",
        None,
    )?;
    let listing = String::from_utf8_lossy(&find.stdout).into_owned();
    let mut lines = listing.lines();
    let (Some(kernel), Some(initrd)) = (lines.next(), lines.next()) else {
        log.line("no kernel in /boot: the layer keeps its parent's boot files");
        return Ok(());
    };
    let kernel_bytes = ssh.download(kernel)?;
    let initrd_bytes = ssh.download(initrd)?;
    if !kernel_bytes.success() || !initrd_bytes.success() {
        log.line("cannot read the guest's kernel or initrd: keeping the parent's boot files");
        return Ok(());
    }
    let same_kernel = fs_err::read(&inherited.kernel)? == kernel_bytes.stdout;
    let same_initrd = match &inherited.initrd {
        Some(p) => fs_err::read(p)? == initrd_bytes.stdout,
        None => false,
    };
    if same_kernel && same_initrd {
        return Ok(());
    }
    log.line(&format!(
        "boot files changed: keeping {kernel} and {initrd} in the layer"
    ));
    fs_err::create_dir_all(boot_dir)?;
    fs_err::write(boot_dir.join("vmlinuz"), &kernel_bytes.stdout)?;
    fs_err::write(boot_dir.join("initrd.img"), &initrd_bytes.stdout)?;
    fs_err::write(boot_dir.join("cmdline"), format!("{}\n", inherited.cmdline))?;
    Ok(())
}

fn keygen(path: &Path) -> Result<crate::sys::keys::KeyPair, BuilderError> {
    Ok(crate::sys::keys::generate(path, "farm-build")?)
}

/// The build log: every command, its output, and the serial console at the end.
struct Log {
    file: fs_err::File,
}

impl Log {
    fn create(path: &Path) -> std::io::Result<Log> {
        if let Some(dir) = path.parent() {
            fs_err::create_dir_all(dir)?;
        }
        Ok(Log {
            file: fs_err::File::create(path)?,
        })
    }

    fn line(&mut self, text: &str) {
        self.raw(&format!("{text}\n"));
    }

    fn raw(&mut self, text: &str) {
        use std::io::Write;
        let _ = self.file.write_all(text.as_bytes());
    }

    fn append_file(&mut self, title: &str, path: &Path) {
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
