//! Booting a store entry as a throwaway guest for tests: an overlay on the entry's disk, a
//! NoCloud seed with a pinned host key, qemu as a child that dies with the test, and ssh
//! with host-key checking on. Failures carry the serial console's tail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use farm::build::layer::BootFiles;
use farm::model::build::boot_watch::BootRules;
use farm::model::build::qemu::{
    DirectBoot, Disk, DiskCache, MachineSpec, NetBackend, Nic, PortForward, QemuVm, ResolvedAccel,
};
use farm::model::build::seed::{SeedNic, SeedSpec, seed_image_bytes};
use farm::model::lab::ssh_config::{SshHost, known_hosts_line, render};
use farm::model::values::Arch;
use farm::model::values::mac_for;
use farm::sys::boot_wait::{self, LocalQemu, SshRoute};
use farm::sys::ssh::{Output, Ssh};
use farm::sys::vm_process::VmProcess;

/// The MAC of a test guest's first (DHCP, ssh-forwarded) NIC.
pub fn test_guest_mac() -> farm::model::values::MacAddr {
    mac_for("test-guest", 0)
}

/// An ed25519 key pair in `dir`, for a test user or a host.
pub struct Key {
    pub private: PathBuf,
    pub public: String,
}

/// The ed25519 key pair `name` kept in the test home, made once: for tests whose layers
/// take a key as an input and should be cached between runs like any other fixture.
pub fn kept_key(name: &str) -> Key {
    let dir = super::test_home::test_home().join("keys");
    let _turn = super::fixture::take_turn(&dir, name);
    let private = dir.join(name);
    if !private.exists() || !private.with_extension("pub").exists() {
        let _ = fs_err::remove_file(&private);
        return keygen(&dir, name);
    }
    key_at(private)
}

pub fn keygen(dir: &Path, name: &str) -> Key {
    let private = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&private)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
    key_at(private)
}

/// The key pair whose private half is at `private` (the public half beside it, `.pub`).
fn key_at(private: PathBuf) -> Key {
    let public = fs_err::read_to_string(private.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string();
    Key { private, public }
}

pub struct Guest {
    pub work: tempfile::TempDir,
    pub process: VmProcess,
    pub ssh: Ssh,
}

impl Guest {
    /// Boots `entry_dir` (a store entry) with `boot` (its own or an ancestor's boot files).
    /// The seed gives only a hostname and the host key: a client key must already be in the
    /// image (put there by an `authorized_keys` step) unless `seed_key` is given.
    pub fn boot(entry_dir: &Path, boot: Option<BootFiles>, client: &Key, seed_key: bool) -> Guest {
        Guest::boot_with(entry_dir, boot, client, seed_key, 1024, Vec::new())
    }

    /// [`Guest::boot`] with `memory_mib` and, after the first (DHCP, ssh-forwarded) NIC,
    /// `extra_nics`, each on its own QEMU user network with the seed's addressing.
    pub fn boot_with(
        entry_dir: &Path,
        boot: Option<BootFiles>,
        client: &Key,
        seed_key: bool,
        memory_mib: u64,
        extra_nics: Vec<SeedNic>,
    ) -> Guest {
        let Prepared { work, vm, config } =
            prepare(entry_dir, boot, client, seed_key, memory_mib, extra_nics);
        let stderr_log = work.path().join("qemu.stderr");
        let mut target = LocalQemu::start(&vm, &stderr_log).unwrap();
        let route = SshRoute {
            config: &config,
            alias: "guest",
            jump: None,
            probe: farm::sys::boot_wait::Probe::Shell,
        };
        let rules = BootRules {
            timeout: Duration::from_secs(300),
            direct_boot: vm.boot.is_some(),
            kvm_inside_tcg: None,
            may_restart: true,
        };
        let (ssh, _) = boot_wait::wait_for_ssh(&mut target, route, rules, &mut |reason, _| {
            eprintln!("the test guest: {reason}")
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let process = target.process;
        Guest { work, process, ssh }
    }
}

/// A guest ready to start: its overlay, seed and ssh_config (host `guest`, host key pinned)
/// in `work`, and the machine as data, for whichever backend starts it.
pub struct Prepared {
    pub work: tempfile::TempDir,
    pub vm: QemuVm,
    pub config: PathBuf,
}

/// Prepares a guest on `entry_dir` (see [`Guest::boot_with`]).
pub fn prepare(
    entry_dir: &Path,
    boot: Option<BootFiles>,
    client: &Key,
    seed_key: bool,
    memory_mib: u64,
    extra_nics: Vec<SeedNic>,
) -> Prepared {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(entry_dir.join("disk.qcow2"))
        .arg(&disk)
        .status()
        .unwrap();
    assert!(status.success());
    let host = keygen(work.path(), "host");
    let mac = test_guest_mac();
    let mut seed = SeedSpec::new("test-guest-1", "test-guest");
    if seed_key {
        seed.authorized_keys = vec![client.public.clone()];
    }
    seed.host_key = Some((
        fs_err::read_to_string(&host.private).unwrap(),
        host.public.clone(),
    ));
    seed.nics = vec![SeedNic {
        mac,
        address: None,
        gateway: None,
    }];
    seed.nics.extend(extra_nics.iter().cloned());
    let seed_path = work.path().join("seed.img");
    fs_err::write(&seed_path, seed_image_bytes(&seed).unwrap()).unwrap();
    let port = farm::sys::hostinfo::free_local_port().unwrap();
    let config = work.path().join("ssh_config");
    fs_err::write(
        work.path().join("known_hosts"),
        known_hosts_line("guest", &host.public),
    )
    .unwrap();
    fs_err::write(
        &config,
        render(
            &[SshHost::vm(
                "guest",
                "127.0.0.1",
                port,
                client.private.clone(),
                work.path().join("known_hosts"),
                vec![],
            )],
            None,
        ),
    )
    .unwrap();
    let vm = QemuVm {
        uefi_vars: None,
        name: "test-guest".into(),
        hw: MachineSpec {
            arch: Arch::X86_64,
            machine: None,
            cpu: None,
            accel: ResolvedAccel::Tcg,
            memory_mib,
            cpus: 1,
        },
        disks: vec![
            Disk {
                path: disk,
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
        boot: boot.map(|b| DirectBoot {
            kernel: b.kernel,
            initrd: b.initrd,
            cmdline: b.cmdline,
        }),
        nics: std::iter::once(Nic {
            backend: NetBackend::User {
                forwards: vec![PortForward {
                    host_addr: "127.0.0.1".into(),
                    host_port: port,
                    guest_port: 22,
                }],
            },
            mac,
        })
        .chain(extra_nics.iter().map(|n| Nic {
            backend: NetBackend::User { forwards: vec![] },
            mac: n.mac,
        }))
        .collect(),
        serial_log: work.path().join("serial.log"),
        qmp_socket: None,
        pidfile: None,
        daemonize: false,
        tag: None,
        incoming: false,
        display: false,
    };
    Prepared { work, vm, config }
}

impl Guest {
    /// Runs `script` and returns its stdout, failing the test (with output) on a non-zero exit.
    pub fn sh(&self, script: &str) -> String {
        let out: Output = self.ssh.run(script, None).unwrap();
        assert!(
            out.success(),
            "`{script}` failed in the guest: {}",
            out.text()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}
