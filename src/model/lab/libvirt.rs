//! The libvirt backend's domain XML, from the same [`QemuVm`] the qemu backend turns into a
//! command line: disks, direct kernel boot, UEFI, memory and vCPUs, the serial console in the
//! file `farm logs` reads, deterministic MACs.
//!
//! NICs go through `<qemu:commandline>` (QEMU user networking with its ssh forward, VDE), as
//! farm's own backend starts them, with explicit PCI addresses so they never collide with
//! the devices libvirt places itself. farm's metadata element names the project, VM and
//! spec hash: `status`, `down` and the orphan search find exactly farm's domains by it.
//!
//! Pure: text in, text out; `sys::libvirt` talks to libvirtd.

use crate::model::build::qemu::{NetBackend, QemuVm, ResolvedAccel};
use crate::model::lab::instance::InstanceSpec;
use crate::model::values::Arch;

/// The XML namespace of farm's metadata element.
pub const METADATA_NS: &str = "https://farm.invalid/xmlns/instance/1";
/// The element's prefix in the domain XML (libvirt keys metadata by namespace URI).
pub const METADATA_PREFIX: &str = "farm";

/// What makes a domain farm's: the project's state directory, the VM, and the hash of the
/// spec it was defined from (a different hash means the domain must be defined again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainMeta {
    pub project: String,
    pub vm: String,
    pub spec: String,
}

impl DomainMeta {
    /// The metadata of `spec`'s domain: its project tag, name, and the blake3 of the spec
    /// (a different hash means it was defined from another spec).
    pub fn for_spec(spec: &InstanceSpec) -> DomainMeta {
        let json = serde_json::to_vec(spec).unwrap_or_default();
        DomainMeta {
            project: spec.tag.project.clone(),
            vm: spec.name.clone(),
            spec: format!("blake3-{}", blake3::hash(&json).to_hex()),
        }
    }

    /// What finds an existing domain of `vm` in `project` (the spec is not compared).
    pub fn owner(project: &str, vm: &str) -> DomainMeta {
        DomainMeta {
            project: project.to_string(),
            vm: vm.to_string(),
            spec: String::new(),
        }
    }

    /// The domain's UUID: the same for a VM of a project every time it is defined, so a
    /// changed spec redefines the domain instead of clashing with it (libvirt would give a
    /// domain without one a new UUID, and refuses a second domain of the same name).
    pub fn uuid(&self) -> String {
        let mut hasher = blake3::Hasher::new_derive_key("farm 2026 libvirt domain uuid");
        hasher.update(self.project.as_bytes());
        hasher.update(&[0]);
        hasher.update(self.vm.as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        // RFC 9562 version 8 (custom), variant 10.
        b[6] = (b[6] & 0x0f) | 0x80;
        b[8] = (b[8] & 0x3f) | 0x80;
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }

    /// The metadata element's content, as `virDomainSetMetadata` and the domain XML take it.
    pub fn element(&self) -> String {
        format!(
            "<{p}:instance xmlns:{p}=\"{METADATA_NS}\"><{p}:project>{}</{p}:project><{p}:vm>{}</{p}:vm><{p}:spec>{}</{p}:spec></{p}:instance>",
            escape(&self.project),
            escape(&self.vm),
            escape(&self.spec),
            p = METADATA_PREFIX
        )
    }

    /// Reads what [`DomainMeta::element`] wrote, as libvirt hands it back when asked by
    /// [`METADATA_NS`] (reformatted, without the namespace) or inside a domain's XML (with a
    /// prefix): `None` when the fields are not there.
    pub fn parse(xml: &str) -> Option<DomainMeta> {
        // `<project>` as the metadata call returns it, `<farm:project>` in a domain's XML.
        let field = |name: &str| -> Option<String> {
            let needle = format!("{name}>");
            let open = xml.match_indices(&needle).find_map(|(at, _)| {
                let tag_start = xml[..at].rfind('<')?;
                let prefix = &xml[tag_start + 1..at];
                let is_open_tag = prefix.is_empty()
                    || (prefix.ends_with(':') && !prefix.starts_with('/') && !prefix.contains(' '));
                is_open_tag.then_some(at + needle.len())
            })?;
            let close = open + xml[open..].find("</")?;
            Some(unescape(&xml[open..close]))
        };
        Some(DomainMeta {
            project: field("project")?,
            vm: field("vm")?,
            spec: field("spec")?,
        })
    }
}

/// The domain XML for `vm`, owned by `meta`. `run_as_root` gives qemu the DAC label
/// `+0:+0` without relabelling, so libvirtd never changes the owner of store layers the
/// overlay backs onto (farm running as root on `qemu:///system`).
pub fn domain_xml(vm: &QemuVm, meta: &DomainMeta, run_as_root: bool) -> String {
    let hw = &vm.hw;
    let mut x = String::new();
    let domain_type = match hw.accel {
        ResolvedAccel::Kvm => "kvm",
        ResolvedAccel::Tcg => "qemu",
    };
    x.push_str(&format!(
        "<domain type='{domain_type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n"
    ));
    x.push_str(&format!("  <name>{}</name>\n", escape(&vm.name)));
    x.push_str(&format!("  <uuid>{}</uuid>\n", meta.uuid()));
    x.push_str(&format!(
        "  <metadata>\n    {}\n  </metadata>\n",
        meta.element()
    ));
    x.push_str(&format!(
        "  <memory unit='MiB'>{}</memory>\n  <vcpu>{}</vcpu>\n",
        hw.memory_mib, hw.cpus
    ));
    let machine = hw.machine.clone().unwrap_or_else(|| match hw.arch {
        Arch::X86_64 => "q35".to_string(),
        Arch::Aarch64 => "virt".to_string(),
    });
    x.push_str("  <os>\n");
    x.push_str(&format!(
        "    <type arch='{}' machine='{}'>hvm</type>\n",
        hw.arch.name(),
        escape(&machine)
    ));
    if let Some(vars) = &vm.uefi_vars {
        let (code, _) = crate::model::values::uefi_files(hw.arch);
        x.push_str(&format!(
            "    <loader readonly='yes' type='pflash'>{}</loader>\n    <nvram>{}</nvram>\n",
            escape(code),
            escape(&vars.display().to_string())
        ));
    }
    if let Some(boot) = &vm.boot {
        x.push_str(&format!(
            "    <kernel>{}</kernel>\n",
            escape(&boot.kernel.display().to_string())
        ));
        if let Some(initrd) = &boot.initrd {
            x.push_str(&format!(
                "    <initrd>{}</initrd>\n",
                escape(&initrd.display().to_string())
            ));
        }
        x.push_str(&format!(
            "    <cmdline>{}</cmdline>\n",
            escape(&vm.kernel_cmdline(boot))
        ));
    }
    x.push_str("  </os>\n");
    if hw.arch == Arch::X86_64 {
        // ACPI: what `virsh shutdown` (and farm's down) asks the guest through.
        x.push_str("  <features><acpi/></features>\n");
    }
    x.push_str(&match (&hw.cpu, hw.accel) {
        (Some(model), _) => format!(
            "  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>{}</model></cpu>\n",
            escape(model)
        ),
        (None, ResolvedAccel::Kvm) => "  <cpu mode='host-passthrough' check='none'/>\n".into(),
        (None, ResolvedAccel::Tcg) => "  <cpu mode='maximum' check='none'/>\n".into(),
    });
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n");
    x.push_str("  <devices>\n");
    x.push_str(&format!(
        "    <emulator>/usr/bin/{}</emulator>\n",
        vm.binary()
    ));
    for (i, disk) in vm.disks.iter().enumerate() {
        let cache = match disk.cache {
            crate::model::build::qemu::DiskCache::Writeback => "writeback",
            crate::model::build::qemu::DiskCache::Unsafe => "unsafe",
        };
        x.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}' cache='{cache}' discard='unmap'/>\n      <source file='{}'/>\n      <target dev='vd{}' bus='virtio'/>\n{}    </disk>\n",
            disk.format,
            escape(&disk.path.display().to_string()),
            (b'a' + i as u8) as char,
            if disk.readonly { "      <readonly/>\n" } else { "" }
        ));
    }
    x.push_str(&format!(
        "    <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    </serial>\n",
        escape(&vm.serial_log.display().to_string())
    ));
    for nic in &vm.nics {
        if let NetBackend::LibvirtNetwork { network } = &nic.backend {
            x.push_str(&format!(
                "    <interface type='network'>\n      <source network='{}'/>\n      <mac address='{}'/>\n      <model type='virtio'/>\n    </interface>\n",
                escape(network),
                nic.mac
            ));
        }
    }
    x.push_str("    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>\n");
    if vm.has_panic_device() {
        // A panicked guest ends (`on_crash`) instead of spinning its vCPUs, as with farm's
        // own qemu (`QemuVm::has_panic_device`).
        x.push_str("    <panic model='isa'/>\n");
    }
    // Free page reporting, as with farm's own qemu (`FREE_PAGE_REPORTING`): the guest's
    // freed memory is handed back to its hypervisor VM, which hands it on to its own host,
    // so it is not in that VM's saved state.
    x.push_str("    <memballoon model='virtio' freePageReporting='on'/>\n");
    if vm.has_display() {
        // The same VGA as farm's own qemu (`DISPLAY`): `farm screenshot` dumps it.
        x.push_str("    <video><model type='vga' vram='4096' heads='1'/></video>\n");
    }
    x.push_str("  </devices>\n");
    if run_as_root {
        x.push_str(
            "  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>\n",
        );
    }
    let args = passthrough_args(vm, &machine);
    let env: Vec<(&str, String)> = vm.tag.iter().flat_map(|t| t.env()).collect();
    if !args.is_empty() || !env.is_empty() {
        x.push_str("  <qemu:commandline>\n");
        for arg in args {
            x.push_str(&format!("    <qemu:arg value='{}'/>\n", escape(&arg)));
        }
        for (name, value) in env {
            x.push_str(&format!(
                "    <qemu:env name='{name}' value='{}'/>\n",
                escape(&value)
            ));
        }
        x.push_str("  </qemu:commandline>\n");
    }
    x.push_str("</domain>\n");
    x
}

/// What libvirt's XML does not say and farm needs as on its own backend: `-name` with
/// farm's process name (QEMU merges it with libvirt's `-name guest=…`, and `status` tells a
/// VM's qemu by it), farm's own QMP socket (a second monitor beside libvirt's), and the
/// NICs: `-netdev`/`-device` pairs on the root bus at slots libvirt leaves free (0x10 on).
fn passthrough_args(vm: &QemuVm, machine: &str) -> Vec<String> {
    let bus = if machine.starts_with("pc") && !machine.contains("q35") {
        "pci.0"
    } else {
        "pcie.0"
    };
    let mut args = Vec::new();
    if vm.tag.is_some() {
        args.push("-name".to_string());
        args.push(crate::model::build::qemu::qemu_name(&vm.name));
    }
    if let Some(qmp) = &vm.qmp_socket {
        args.push("-qmp".to_string());
        args.push(format!("unix:{},server=on,wait=off", qmp.display()));
    }
    // Numbered among the passed-through NICs only: libvirt networks are libvirt's.
    let passed = vm
        .nics
        .iter()
        .filter(|nic| !matches!(nic.backend, NetBackend::LibvirtNetwork { .. }));
    for (i, nic) in passed.enumerate() {
        let id = crate::model::build::qemu::netdev_id(i, true);
        let Some(netdev) = nic.netdev(&id) else {
            continue;
        };
        args.push("-netdev".to_string());
        args.push(netdev);
        args.push("-device".to_string());
        args.push(format!(
            "virtio-net-pci,netdev={id},mac={},bus={bus},addr={:#x}",
            nic.mac,
            0x10 + i
        ));
    }
    args
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&apos;", "'")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::build::qemu::{DirectBoot, Disk, DiskCache, MachineSpec, Nic, PortForward};
    use crate::model::values::mac_for;
    use std::path::PathBuf;

    fn vm() -> QemuVm {
        QemuVm {
            name: "web".into(),
            hw: MachineSpec {
                arch: Arch::X86_64,
                machine: None,
                cpu: None,
                accel: ResolvedAccel::Tcg,
                memory_mib: 512,
                cpus: 2,
            },
            disks: vec![
                Disk {
                    path: "/lab/.farm/vms/web/disk.qcow2".into(),
                    format: "qcow2",
                    readonly: false,
                    cache: DiskCache::Writeback,
                },
                Disk {
                    path: "/lab/.farm/vms/web/seed.img".into(),
                    format: "raw",
                    readonly: true,
                    cache: DiskCache::Writeback,
                },
            ],
            boot: Some(DirectBoot {
                kernel: "/store/x/boot/vmlinuz".into(),
                initrd: Some("/store/x/boot/initrd.img".into()),
                cmdline: "console=ttyS0 quiet".into(),
            }),
            uefi_vars: None,
            nics: vec![
                Nic {
                    backend: NetBackend::User {
                        forwards: vec![PortForward {
                            host_addr: "127.0.0.1".into(),
                            host_port: 2222,
                            guest_port: 22,
                        }],
                    },
                    mac: mac_for("web", 0),
                },
                Nic {
                    backend: NetBackend::LibvirtNetwork {
                        network: "default".into(),
                    },
                    mac: mac_for("web", 64),
                },
                Nic {
                    backend: NetBackend::Vde {
                        sock: "vxvde://234.0.0.1".into(),
                    },
                    mac: mac_for("web", 1),
                },
            ],
            serial_log: PathBuf::from("/lab/.farm/vms/web/serial.log"),
            qmp_socket: None,
            pidfile: None,
            daemonize: false,
            tag: None,
            incoming: false,
            display: false,
        }
    }

    fn meta() -> DomainMeta {
        DomainMeta {
            project: "/lab/<a&b>/.farm".into(),
            vm: "web".into(),
            spec: "blake3-00ff".into(),
        }
    }

    #[test]
    fn the_domain_carries_the_vms_hardware_boot_disks_console_and_nics() {
        let xml = domain_xml(&vm(), &meta(), true);
        for part in [
            "<domain type='qemu'",
            "<name>web</name>",
            "<memory unit='MiB'>512</memory>",
            "<vcpu>2</vcpu>",
            "<type arch='x86_64' machine='q35'>hvm</type>",
            "<kernel>/store/x/boot/vmlinuz</kernel>",
            "<initrd>/store/x/boot/initrd.img</initrd>",
            "<cmdline>console=ttyS0 quiet no_timer_check</cmdline>",
            "<cpu mode='maximum' check='none'/>",
            "<source file='/lab/.farm/vms/web/disk.qcow2'/>\n      <target dev='vda' bus='virtio'/>",
            "<target dev='vdb' bus='virtio'/>\n      <readonly/>",
            "<source path='/lab/.farm/vms/web/serial.log'/>",
            "<label>+0:+0</label>",
            "<on_crash>destroy</on_crash>",
            "<panic model='isa'/>",
            "<qemu:arg value='user,id=farmnet0,hostfwd=tcp:127.0.0.1:2222-:22'/>",
            "bus=pcie.0,addr=0x10'/>",
            "<qemu:arg value='vde,id=farmnet1,sock=vxvde://234.0.0.1'/>",
            "bus=pcie.0,addr=0x11'/>",
            &format!(
                "<interface type='network'>\n      <source network='default'/>\n      <mac address='{}'/>",
                mac_for("web", 64)
            ),
        ] {
            assert!(xml.contains(part), "missing {part:?} in\n{xml}");
        }
        assert!(!domain_xml(&vm(), &meta(), false).contains("seclabel"));
        assert!(!xml.contains("qemu:env"), "untagged: no environment");
    }

    #[test]
    fn a_tagged_vm_carries_farms_process_tag_name_and_qmp_socket() {
        let mut vm = vm();
        vm.tag = Some(crate::model::build::qemu::ProcessTag::vm(
            "/lab/.farm",
            "web",
        ));
        vm.qmp_socket = Some("/lab/.farm/vms/web/qmp.sock".into());
        let xml = domain_xml(&vm, &meta(), true);
        for part in [
            "<qemu:env name='FARM_PROJECT' value='/lab/.farm'/>",
            "<qemu:env name='FARM_PROCESS' value='vm:web'/>",
            "<qemu:arg value='-name'/>\n    <qemu:arg value='web,process=farm-web'/>",
            "<qemu:arg value='unix:/lab/.farm/vms/web/qmp.sock,server=on,wait=off'/>",
        ] {
            assert!(xml.contains(part), "missing {part:?} in\n{xml}");
        }
    }

    #[test]
    fn metadata_round_trips_and_marks_only_farms_domains() {
        let element = meta().element();
        assert!(element.contains("/lab/&lt;a&amp;b&gt;/.farm"), "{element}");
        assert_eq!(DomainMeta::parse(&element), Some(meta()));
        // As libvirt hands it back: another prefix, whitespace between elements.
        let reformatted = format!(
            "<ns0:instance xmlns:ns0=\"{METADATA_NS}\">\n  <ns0:project>/p</ns0:project>\n  <ns0:vm>a</ns0:vm>\n  <ns0:spec>s</ns0:spec>\n</ns0:instance>"
        );
        assert_eq!(
            DomainMeta::parse(&reformatted),
            Some(DomainMeta {
                project: "/p".into(),
                vm: "a".into(),
                spec: "s".into()
            })
        );
        // As `virDomainGetMetadata` returns it: no namespace, no prefix.
        let default_ns =
            "<instance>\n  <project>/q</project>\n  <vm>b</vm>\n  <spec>t</spec>\n</instance>";
        assert_eq!(
            DomainMeta::parse(default_ns).map(|m| (m.project, m.vm, m.spec)),
            Some(("/q".into(), "b".into(), "t".into()))
        );
        assert_eq!(DomainMeta::parse("<mine:x xmlns:mine='urn:other'/>"), None);
    }

    #[test]
    fn a_vm_keeps_its_uuid_across_specs_and_projects_differ() {
        let uuid = meta().uuid();
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "8", "{uuid}");
        let respecced = DomainMeta {
            spec: "blake3-other".into(),
            ..meta()
        };
        assert_eq!(respecced.uuid(), uuid);
        assert_ne!(DomainMeta::owner("/other/.farm", "web").uuid(), uuid);
        assert!(domain_xml(&vm(), &meta(), true).contains(&format!("<uuid>{uuid}</uuid>")));
    }

    #[test]
    fn uefi_kvm_and_a_named_cpu() {
        let mut vm = vm();
        vm.uefi_vars = Some("/lab/.farm/vms/web/vars.fd".into());
        vm.hw.accel = ResolvedAccel::Kvm;
        vm.hw.cpu = Some("Haswell".into());
        vm.hw.machine = Some("pc".into());
        let xml = domain_xml(&vm, &meta(), false);
        assert!(xml.contains("<domain type='kvm'"), "{xml}");
        assert!(
            xml.contains("<nvram>/lab/.farm/vms/web/vars.fd</nvram>"),
            "{xml}"
        );
        assert!(
            xml.contains("<model fallback='forbid'>Haswell</model>"),
            "{xml}"
        );
        assert!(xml.contains("bus=pci.0,addr=0x10"), "{xml}");
    }
}
