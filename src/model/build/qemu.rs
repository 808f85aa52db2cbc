//! A qemu command line as plain data: what a VM is (disks, boot, NICs, sizing) becomes an
//! argv here, purely, so the same description starts a build VM or an instance on any host
//! and can be snapshot-tested.

use std::path::PathBuf;

use crate::model::values::{Accel, Arch, MacAddr};

/// The accelerator a VM actually gets, after `auto` is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolvedAccel {
    Kvm,
    Tcg,
}

impl std::fmt::Display for ResolvedAccel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResolvedAccel::Kvm => "KVM",
            ResolvedAccel::Tcg => "TCG",
        })
    }
}

/// What a host says about KVM, probed by `hostinfo`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmFacts {
    /// `/dev/kvm` exists and opens read-write.
    pub device_usable: bool,
    /// `kvm_intel` or `kvm_amd` is loaded: hardware virtualisation that runs stock kernels.
    /// (A PVM `/dev/kvm`, as on some cloud machines, opens fine but hangs stock guests.)
    pub hardware_module: bool,
}

/// `auto` picks KVM only where it really runs stock kernels of the guest's architecture;
/// an explicit choice is honoured (the user may know better than the probe).
pub fn choose_accel(requested: Accel, facts: KvmFacts, host: Arch, guest: Arch) -> ResolvedAccel {
    match requested {
        Accel::Kvm => ResolvedAccel::Kvm,
        Accel::Tcg => ResolvedAccel::Tcg,
        Accel::Auto if facts.device_usable && facts.hardware_module && host == guest => {
            ResolvedAccel::Kvm
        }
        Accel::Auto => ResolvedAccel::Tcg,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub format: &'static str,
    pub readonly: bool,
    pub cache: DiskCache,
}

/// How qemu caches a disk's writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskCache {
    /// Guest flushes reach the host's disk: a lab's data survives a host crash once the
    /// guest has synced it. Every instance disk.
    Writeback,
    /// Flushes are ignored: fastest, for build VMs, whose output counts only after a clean
    /// power-off (qemu writes everything out when it exits).
    Unsafe,
}

impl DiskCache {
    fn as_str(self) -> &'static str {
        match self {
            DiskCache::Writeback => "writeback",
            DiskCache::Unsafe => "unsafe",
        }
    }
}

/// Direct kernel boot: faster than firmware + bootloader, and needed for images farm builds
/// from a mirror (they have no bootloader).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortForward {
    pub host_addr: String,
    pub host_port: u16,
    pub guest_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// QEMU user networking (slirp): NAT to the host's network, ports forwarded inward.
    User { forwards: Vec<PortForward> },
    /// A VDE network: a switch's control directory or a vdeplug4 URL.
    Vde { sock: String },
    /// A network of libvirtd's (the libvirt backend only: the domain XML says it; qemu's
    /// own command line has no such thing, and `check` refuses it on the qemu backend).
    LibvirtNetwork { network: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    pub backend: NetBackend,
    pub mac: MacAddr,
}

impl Nic {
    /// `-netdev`'s value for this NIC's backend, as `id`; `None` for a libvirt network,
    /// which is libvirt's to make.
    pub fn netdev(&self, id: &str) -> Option<String> {
        Some(match &self.backend {
            NetBackend::User { forwards } => {
                let mut s = format!("user,id={id}");
                for f in forwards {
                    s.push_str(&format!(
                        ",hostfwd=tcp:{}:{}-:{}",
                        f.host_addr, f.host_port, f.guest_port
                    ));
                }
                s
            }
            NetBackend::Vde { sock } => format!("vde,id={id},sock={sock}"),
            NetBackend::LibvirtNetwork { .. } => return None,
        })
    }
}

/// The virtual machine's hardware: the same for a build VM and an instance of a target.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineSpec {
    pub arch: Arch,
    /// qemu's machine type; q35 (x86_64) or virt (aarch64) when absent.
    pub machine: Option<String>,
    /// qemu's CPU model; `host` under KVM, `max` under TCG when absent.
    pub cpu: Option<String>,
    pub accel: ResolvedAccel,
    pub memory_mib: u64,
    pub cpus: u32,
}

/// The `-name` qemu runs with: the VM's name for QMP and logs, and `farm-NAME` as the
/// process's title, which is how `ps`, farm's liveness checks and the tests tell one VM's
/// qemu from another's.
pub fn qemu_name(vm: &str) -> String {
    format!("{vm},process={}", process_title(vm))
}

/// The process title of a VM's qemu (see [`qemu_name`]).
pub fn process_title(vm: &str) -> String {
    format!("farm-{vm}")
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuVm {
    pub name: String,
    pub hw: MachineSpec,
    pub disks: Vec<Disk>,
    pub boot: Option<DirectBoot>,
    /// Boot through UEFI firmware with this VM's own copy of the variable store (the
    /// firmware code itself is the host's, read-only); `None` is SeaBIOS (x86_64).
    pub uefi_vars: Option<PathBuf>,
    pub nics: Vec<Nic>,
    pub serial_log: PathBuf,
    pub qmp_socket: Option<PathBuf>,
    pub pidfile: Option<PathBuf>,
    /// Detach after start-up (instances); build VMs stay children of farm.
    pub daemonize: bool,
    /// Environment that marks the process as farm's (instances), so it is found again
    /// without farm's state directory.
    pub tag: Option<ProcessTag>,
    /// Start paused, waiting for a saved machine state through QMP (`-incoming defer`,
    /// then `migrate-incoming`): a build VM resumed from a checkpoint runs on from there
    /// instead of booting.
    pub incoming: bool,
    /// A standard VGA display (x86_64 instances), which `farm screenshot` dumps through QMP;
    /// build VMs have none.
    pub display: bool,
}

/// What farm's long-lived processes (instances' qemu, VDE switches and taps) carry in their
/// environment: the project's state directory and what they are, so `farm down` finds them
/// even when `.farm/` is gone, and `farm up` never starts a second copy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessTag {
    /// The project's local state directory, absolute (`/home/me/lab/.farm`).
    pub project: String,
    /// `vm:NAME`, or `net:NAME:switch` / `net:NAME:tap`.
    pub what: String,
}

/// The environment variable naming the project.
pub const TAG_PROJECT: &str = "FARM_PROJECT";
/// The environment variable naming the VM or network.
pub const TAG_WHAT: &str = "FARM_PROCESS";

impl ProcessTag {
    pub fn vm(project: &str, name: &str) -> Self {
        Self {
            project: project.to_string(),
            what: format!("vm:{name}"),
        }
    }

    /// A network's daemon: `kind` is `switch` or `tap`.
    pub fn network(project: &str, name: &str, kind: &str) -> Self {
        Self {
            project: project.to_string(),
            what: format!("net:{name}:{kind}"),
        }
    }

    /// `FARM_PROJECT=… FARM_PROCESS=…`, as `env` takes them.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            (TAG_PROJECT, self.project.clone()),
            (TAG_WHAT, self.what.clone()),
        ]
    }
}

/// A balloon that never inflates, there for free page reporting: the guest hands back the
/// 2 MiB blocks it frees, qemu discards them, and a saved machine state writes them as zero
/// pages instead of what was last in them. A hypervisor VM's state is mostly its guests' and
/// its own freed memory (the bundle's L1: 449 MiB of state, 246 MiB with its free memory
/// zeroed), and a restore decompresses all of it. A guest without the driver ignores it.
pub const FREE_PAGE_REPORTING: &str = "virtio-balloon-pci,free-page-reporting=on";

/// The display of an instance: the standard VGA (its BIOS comes with SeaBIOS and the OVMF
/// firmware drives it), with 4 MiB of video memory, enough for a 1024x768 console, rather
/// than 16 MiB in every saved state.
pub const DISPLAY: &str = "VGA,vgamem_mb=4";

/// The QMP name of the `i`th NIC's network backend (`set_link` takes it): `net{i}` in a
/// qemu farm starts, `farmnet{i}` among the NICs farm passes through to a libvirt domain's
/// qemu (user and VDE NICs, which come before libvirt's own networks).
pub fn netdev_id(i: usize, through_libvirt: bool) -> String {
    if through_libvirt {
        format!("farmnet{i}")
    } else {
        format!("net{i}")
    }
}

impl QemuVm {
    pub fn binary(&self) -> &'static str {
        match self.hw.arch {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    pub fn argv(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
        let hw = &self.hw;
        push(&["-name", &qemu_name(&self.name)]);
        let machine = hw.machine.clone().unwrap_or_else(|| match hw.arch {
            Arch::X86_64 => "q35".to_string(),
            Arch::Aarch64 => "virt".to_string(),
        });
        push(&["-machine", &machine]);
        match hw.accel {
            ResolvedAccel::Kvm => push(&["-accel", "kvm"]),
            // One host thread per vCPU: several times faster for SMP guests.
            ResolvedAccel::Tcg => push(&["-accel", "tcg,thread=multi"]),
        }
        let cpu = hw.cpu.clone().unwrap_or_else(|| match hw.accel {
            ResolvedAccel::Kvm => "host".to_string(),
            ResolvedAccel::Tcg => "max".to_string(),
        });
        push(&["-cpu", &cpu]);
        push(&["-m", &format!("{}M", hw.memory_mib)]);
        push(&["-smp", &hw.cpus.to_string()]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        push(&["-serial", &format!("file:{}", self.serial_log.display())]);
        if let Some(qmp) = &self.qmp_socket {
            push(&[
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp.display()),
            ]);
        }
        if let Some(pidfile) = &self.pidfile {
            push(&["-pidfile", &pidfile.display().to_string()]);
        }
        if self.daemonize {
            push(&["-daemonize"]);
        }
        if self.incoming {
            push(&["-incoming", "defer"]);
        }
        if let Some(vars) = &self.uefi_vars {
            let (code, _) = crate::model::values::uefi_files(hw.arch);
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"),
                "-drive",
                &format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
            ]);
        }
        if let Some(boot) = &self.boot {
            push(&["-kernel", &boot.kernel.display().to_string()]);
            if let Some(initrd) = &boot.initrd {
                push(&["-initrd", &initrd.display().to_string()]);
            }
            push(&["-append", &self.kernel_cmdline(boot)]);
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let mut drive = format!(
                "file={},if=virtio,format={},index={i},cache={},discard=unmap",
                disk.path.display(),
                disk.format,
                disk.cache.as_str()
            );
            if disk.readonly {
                drive.push_str(",readonly=on");
            }
            push(&["-drive", &drive]);
        }
        for (i, nic) in self.nics.iter().enumerate() {
            let id = netdev_id(i, false);
            let Some(netdev) = nic.netdev(&id) else {
                continue;
            };
            push(&["-netdev", &netdev]);
            push(&[
                "-device",
                &format!("virtio-net-pci,netdev={id},mac={}", nic.mac),
            ]);
        }
        push(&["-device", "virtio-rng-pci"]);
        if self.has_panic_device() {
            push(&["-device", "pvpanic"]);
        }
        // Last, so the devices before it keep their PCI slots: a state saved before it
        // existed still loads (its guest never probed it).
        push(&["-device", FREE_PAGE_REPORTING]);
        if self.has_display() {
            push(&["-device", DISPLAY]);
        }
        a
    }

    /// Whether the VM has a display to take screenshots of: asked for, and an x86_64
    /// machine (aarch64's `virt` has no VGA).
    pub fn has_display(&self) -> bool {
        self.display && self.hw.arch == Arch::X86_64
    }

    /// The kernel command line of a direct boot: the boot's own, and `no_timer_check` for an
    /// x86_64 guest under TCG. Early in its boot Linux checks that the IO-APIC delivers the
    /// 8254 timer's interrupt within a few ticks of its own delay loop; under TCG on a busy
    /// host it now and then does not, and the kernel panics ("IO-APIC + timer doesn't
    /// work!") before any of the guest runs (seen in loaded test runs). A guest on kvmclock
    /// skips that check by itself.
    pub fn kernel_cmdline(&self, boot: &DirectBoot) -> String {
        let tcg_pc = self.hw.arch == Arch::X86_64 && self.hw.accel == ResolvedAccel::Tcg;
        if tcg_pc
            && !boot
                .cmdline
                .split_whitespace()
                .any(|a| a == "no_timer_check")
        {
            format!("{} no_timer_check", boot.cmdline)
        } else {
            boot.cmdline.clone()
        }
    }

    /// Whether the VM gets QEMU's panic device (x86_64 PCs: `q35`, the default, and `pc`).
    /// A guest kernel that panics tells qemu through it, and qemu's default action then
    /// ends the process: a panicked kernel otherwise spins every vCPU in its delay loop
    /// (under TCG, a host core each) until someone stops it, and ssh through it times out
    /// instead of being refused. Its console still ends in the panic, which is how farm
    /// tells a panic from a power-off (`run::recover`). The device has no migration state,
    /// so snapshots saved with and without it load into each other.
    pub fn has_panic_device(&self) -> bool {
        self.hw.arch == Arch::X86_64
            && self
                .hw
                .machine
                .as_deref()
                .is_none_or(|m| m.starts_with("q35") || m.starts_with("pc"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> QemuVm {
        QemuVm {
            name: "web".into(),
            hw: MachineSpec {
                arch: Arch::X86_64,
                machine: None,
                cpu: None,
                accel: ResolvedAccel::Tcg,
                memory_mib: 1024,
                cpus: 2,
            },
            disks: vec![
                Disk {
                    path: "/s/disk.qcow2".into(),
                    format: "qcow2",
                    readonly: false,
                    cache: DiskCache::Writeback,
                },
                Disk {
                    path: "/s/seed.img".into(),
                    format: "raw",
                    readonly: true,
                    cache: DiskCache::Unsafe,
                },
            ],
            boot: Some(DirectBoot {
                kernel: "/b/vmlinuz".into(),
                initrd: Some("/b/initrd.img".into()),
                cmdline: "root=/dev/vda console=ttyS0".into(),
            }),
            uefi_vars: None,
            nics: vec![Nic {
                backend: NetBackend::User {
                    forwards: vec![PortForward {
                        host_addr: "127.0.0.1".into(),
                        host_port: 2201,
                        guest_port: 22,
                    }],
                },
                mac: "52:54:00:00:00:01".parse().unwrap(),
            }],
            serial_log: "/s/serial.log".into(),
            qmp_socket: Some("/s/qmp.sock".into()),
            pidfile: None,
            daemonize: false,
            tag: None,
            incoming: false,
            display: false,
        }
    }

    #[test]
    fn argv_snapshot() {
        assert_eq!(
            vm().argv().join(" "),
            "-name web,process=farm-web -machine q35 -accel tcg,thread=multi -cpu max -m 1024M -smp 2 \
             -nodefaults -no-user-config -display none -serial file:/s/serial.log \
             -qmp unix:/s/qmp.sock,server=on,wait=off \
             -kernel /b/vmlinuz -initrd /b/initrd.img -append root=/dev/vda console=ttyS0 no_timer_check \
             -drive file=/s/disk.qcow2,if=virtio,format=qcow2,index=0,cache=writeback,discard=unmap \
             -drive file=/s/seed.img,if=virtio,format=raw,index=1,cache=unsafe,discard=unmap,readonly=on \
             -netdev user,id=net0,hostfwd=tcp:127.0.0.1:2201-:22 \
             -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01 -device virtio-rng-pci \
             -device pvpanic -device virtio-balloon-pci,free-page-reporting=on"
        );
    }

    #[test]
    fn uefi_boot_maps_the_hosts_firmware_read_only_and_the_vms_own_variables() {
        let mut uefi = vm();
        uefi.boot = None;
        uefi.uefi_vars = Some("/s/efivars.fd".into());
        let argv = uefi.argv().join(" ");
        assert!(
            argv.contains(
                "-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
                 -drive if=pflash,format=raw,unit=1,file=/s/efivars.fd"
            ),
            "{argv}"
        );
        assert!(!argv.contains("-kernel"), "{argv}");
        uefi.hw.arch = Arch::Aarch64;
        assert!(
            uefi.argv()
                .join(" ")
                .contains("file=/usr/share/AAVMF/AAVMF_CODE.fd")
        );
    }

    #[test]
    fn auto_accel_needs_hardware_kvm_and_a_matching_arch() {
        let pvm = KvmFacts {
            device_usable: true,
            hardware_module: false,
        };
        let metal = KvmFacts {
            device_usable: true,
            hardware_module: true,
        };
        let x86 = Arch::X86_64;
        assert_eq!(choose_accel(Accel::Auto, pvm, x86, x86), ResolvedAccel::Tcg);
        assert_eq!(
            choose_accel(Accel::Auto, metal, x86, x86),
            ResolvedAccel::Kvm
        );
        assert_eq!(
            choose_accel(Accel::Auto, metal, x86, Arch::Aarch64),
            ResolvedAccel::Tcg
        );
        assert_eq!(choose_accel(Accel::Kvm, pvm, x86, x86), ResolvedAccel::Kvm);
        assert_eq!(
            choose_accel(Accel::Tcg, metal, x86, x86),
            ResolvedAccel::Tcg
        );
    }
}
