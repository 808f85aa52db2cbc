//! One VM instance on a host: a qcow2 overlay on its platform's store entry, a NoCloud
//! seed, and a daemonized qemu with pidfile, QMP socket and serial log, all in the VM's
//! state directory. Every operation goes through `Host`, so it is the same on every host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::build::layer::BootFiles;
use crate::model::hash::DrvHash;
use crate::model::instance::ObservedVm;
use crate::model::network::VdeNic;
use crate::model::qemu::{DirectBoot, Disk, MachineSpec, NetBackend, Nic, PortForward, QemuVm};
use crate::model::seed::{SeedNic, SeedSpec, seed_image_bytes};
use crate::model::values::MacAddr;
use crate::run::host::{Host, HostError};
use crate::sys::ssh::shell_quote;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("{what} for VM `{vm}` failed on host `{host}` (exit status {status:?}):\n{output}")]
    Command {
        vm: String,
        host: String,
        what: String,
        status: Option<i32>,
        output: String,
    },
    #[error(transparent)]
    Seed(#[from] crate::model::seed::SeedError),
    #[error("The instance record `{}` is unreadable: {source}", path.display())]
    Record {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The files of one instance, in `<state>/vms/<name>/`.
#[derive(Clone, Debug)]
pub struct InstancePaths {
    pub dir: PathBuf,
}

impl InstancePaths {
    pub fn new(state_dir: &Path, name: &str) -> Self {
        Self {
            dir: state_dir.join("vms").join(name),
        }
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn seed(&self) -> PathBuf {
        self.dir.join("seed.img")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    pub fn stderr_log(&self) -> PathBuf {
        self.dir.join("qemu.stderr")
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("instance.json")
    }
}

/// What farm remembers about an instance: which derivation its overlay is on, and how it
/// was started, so `up` can restart it identically and `status` can compare.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub name: String,
    pub drv_hash: DrvHash,
    pub entry_disk: PathBuf,
    pub ssh_port: Option<u16>,
    pub mac: MacAddr,
    pub argv: Vec<String>,
    pub binary: String,
}

/// Everything needed to create and start one instance.
#[derive(Clone, Debug)]
pub struct InstanceSpec {
    pub name: String,
    pub hostname: String,
    pub drv_hash: DrvHash,
    pub entry_disk: PathBuf,
    pub boot: Option<BootFiles>,
    pub hw: MachineSpec,
    pub disk_size: Option<u64>,
    /// User networking (slirp) with ssh forwarded from this port; `None` for a VM that
    /// is only on VDE networks.
    pub ssh_port: Option<u16>,
    pub forwards: Vec<(u16, u16)>,
    /// The user-networking NIC's MAC.
    pub mac: MacAddr,
    /// VDE NICs, each with what qemu's `sock=` is given to join its network.
    pub vde_nics: Vec<(VdeNic, String)>,
    pub authorized_keys: Vec<String>,
    /// (private, public) OpenSSH host key, pinned in farm's known_hosts.
    pub host_key: (String, String),
}

impl InstanceSpec {
    fn qemu(&self, paths: &InstancePaths) -> QemuVm {
        let mut forwards: Vec<PortForward> = self
            .ssh_port
            .iter()
            .map(|p| PortForward {
                host_addr: "127.0.0.1".into(),
                host_port: *p,
                guest_port: 22,
            })
            .collect();
        forwards.extend(self.forwards.iter().map(|(host, guest)| PortForward {
            host_addr: "127.0.0.1".into(),
            host_port: *host,
            guest_port: *guest,
        }));
        QemuVm {
            name: self.name.clone(),
            hw: self.hw.clone(),
            disks: vec![
                Disk {
                    path: paths.disk(),
                    format: "qcow2",
                    readonly: false,
                },
                Disk {
                    path: paths.seed(),
                    format: "raw",
                    readonly: true,
                },
            ],
            boot: self.boot.as_ref().map(|b| DirectBoot {
                kernel: b.kernel.clone(),
                initrd: b.initrd.clone(),
                cmdline: b.cmdline.clone(),
            }),
            nics: self
                .ssh_port
                .map(|_| Nic {
                    backend: NetBackend::User { forwards },
                    mac: self.mac,
                })
                .into_iter()
                .chain(self.vde_nics.iter().map(|(nic, sock)| Nic {
                    backend: NetBackend::Vde { sock: sock.clone() },
                    mac: nic.mac,
                }))
                .collect(),
            serial_log: paths.serial_log(),
            qmp_socket: Some(paths.qmp()),
            pidfile: Some(paths.pidfile()),
            daemonize: true,
        }
    }
}

fn check(
    host: &dyn Host,
    vm: &str,
    what: &str,
    script: &str,
) -> Result<crate::run::host::Output, InstanceError> {
    let out = host.run(script)?;
    if !out.success() {
        return Err(InstanceError::Command {
            vm: vm.to_string(),
            host: host.name().to_string(),
            what: what.to_string(),
            status: out.status,
            output: out.text(),
        });
    }
    Ok(out)
}

/// The instance's record and whether its qemu runs. `None` when it has no state.
pub fn observe(
    host: &dyn Host,
    paths: &InstancePaths,
) -> Result<Option<(InstanceRecord, bool)>, InstanceError> {
    let Some(bytes) = host.get(&paths.record())? else {
        return Ok(None);
    };
    let record: InstanceRecord =
        serde_json::from_slice(&bytes).map_err(|source| InstanceError::Record {
            path: paths.record(),
            source,
        })?;
    let running = is_running(host, paths, &record.name)?;
    Ok(Some((record, running)))
}

pub fn observed_vm(record: &InstanceRecord, running: bool) -> ObservedVm {
    ObservedVm {
        name: record.name.clone(),
        drv_hash: record.drv_hash,
        running,
    }
}

/// The pidfile's process is alive *and* is this VM's qemu (pids are reused).
fn is_running(host: &dyn Host, paths: &InstancePaths, name: &str) -> Result<bool, HostError> {
    let script = crate::run::host::process_alive_test(
        &paths.pidfile(),
        &format!("{name},process=farm-{name}"),
    );
    Ok(host.run(&script)?.success())
}

/// Makes the overlay and the seed, and records the instance. Does not start it.
pub fn create(
    host: &dyn Host,
    paths: &InstancePaths,
    spec: &InstanceSpec,
) -> Result<InstanceRecord, InstanceError> {
    let dir = shell_quote(&paths.dir.display().to_string());
    let size = spec.disk_size.map(|s| s.to_string()).unwrap_or_default();
    check(
        host,
        &spec.name,
        "Creating the overlay",
        &format!(
            "mkdir -p {dir} && chmod 700 {dir} && qemu-img create -q -f qcow2 -F qcow2 -b {entry} {disk} {size}",
            entry = shell_quote(&spec.entry_disk.display().to_string()),
            disk = shell_quote(&paths.disk().display().to_string()),
        ),
    )?;
    let mut seed = SeedSpec::new(
        format!("{}-{}", spec.name, &spec.drv_hash.to_hex()[..12]),
        spec.hostname.clone(),
    );
    seed.authorized_keys = spec.authorized_keys.clone();
    seed.host_key = Some(spec.host_key.clone());
    // The user NIC by DHCP, VDE NICs with their static addresses, matched by MAC in the
    // guest, so a VM only on VDE is configured without being reached first.
    seed.nics = spec
        .ssh_port
        .map(|_| SeedNic {
            mac: spec.mac,
            address: None,
            gateway: None,
        })
        .into_iter()
        .chain(spec.vde_nics.iter().map(|(nic, _)| SeedNic {
            mac: nic.mac,
            address: nic.address,
            gateway: nic.gateway,
        }))
        .collect();
    host.put(&seed_image_bytes(&seed)?, &paths.seed(), 0o600)?;
    let vm = spec.qemu(paths);
    let record = InstanceRecord {
        name: spec.name.clone(),
        drv_hash: spec.drv_hash,
        entry_disk: spec.entry_disk.clone(),
        ssh_port: spec.ssh_port,
        mac: spec.mac,
        argv: vm.argv(),
        binary: vm.binary().to_string(),
    };
    let json = serde_json::to_vec_pretty(&record).expect("records serialize");
    host.put(&json, &paths.record(), 0o600)?;
    Ok(record)
}

/// Starts the recorded qemu detached; it outlives farm.
pub fn start(
    host: &dyn Host,
    paths: &InstancePaths,
    record: &InstanceRecord,
) -> Result<(), InstanceError> {
    let argv: Vec<String> = record.argv.iter().map(|a| shell_quote(a)).collect();
    let script = format!(
        "rm -f {pid} {qmp}; : > {serial}; {binary} {argv} 2> {stderr} || {{ cat {stderr} >&2; exit 1; }}",
        pid = shell_quote(&paths.pidfile().display().to_string()),
        qmp = shell_quote(&paths.qmp().display().to_string()),
        serial = shell_quote(&paths.serial_log().display().to_string()),
        stderr = shell_quote(&paths.stderr_log().display().to_string()),
        binary = shell_quote(&record.binary),
        argv = argv.join(" "),
    );
    check(host, &record.name, "Starting qemu", &script).map(|_| ())
}

/// Stops the instance: an ACPI power-down through QMP (and `poweroff` over ssh when an
/// ssh command is given), then, after `timeout`, SIGKILL.
pub fn stop(
    host: &dyn Host,
    paths: &InstancePaths,
    name: &str,
    timeout: Duration,
    ssh_poweroff: Option<&dyn Fn()>,
) -> Result<(), InstanceError> {
    if !is_running(host, paths, name)? {
        return Ok(());
    }
    host.qmp(&paths.qmp(), "system_powerdown")?;
    if let Some(poweroff) = ssh_poweroff {
        poweroff();
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !is_running(host, paths, name)? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let kill = format!(
        "pid=$(cat {}) && kill -9 \"$pid\" && while kill -0 \"$pid\" 2>/dev/null; do sleep 0.1; done",
        shell_quote(&paths.pidfile().display().to_string())
    );
    check(host, name, "Killing qemu", &kill).map(|_| ())
}

/// Removes the instance's state directory (overlay, seed, logs).
pub fn remove(host: &dyn Host, paths: &InstancePaths, name: &str) -> Result<(), InstanceError> {
    check(
        host,
        name,
        "Removing the instance's state",
        &format!("rm -rf {}", shell_quote(&paths.dir.display().to_string())),
    )
    .map(|_| ())
}
