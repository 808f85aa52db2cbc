//! One VM instance as data: everything that decides what its qemu runs and what its seed
//! tells the guest (`InstanceSpec`, resolved by `up_plan`), where its files are on its site
//! (`InstancePaths`), and what farm remembers about it (`InstanceRecord`: the whole spec, so
//! any change in farm.toml is seen as one).
//!
//! Pure: `run::instance` creates, starts and stops instances from these.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::build::qemu::{
    DirectBoot, Disk, DiskCache, MachineSpec, NetBackend, Nic, PortForward, ProcessTag, QemuVm,
};
use crate::model::build::seed::{SeedNic, SeedSpec};
use crate::model::config::backend::Backend;
use crate::model::hash::{ContentHash, DrvHash};
use crate::model::values::{IpCidr, MacAddr};

/// The version of the instance record's layout. A record of another version is not
/// guessed at: the plan replaces that instance.
pub const RECORD_FORMAT: u32 = 2;

/// The files of one instance, in `<site state>/vms/<name>/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The VM's UEFI variable store (boot entries the guest writes), kept with its disk.
    pub fn efi_vars(&self) -> PathBuf {
        self.dir.join("efivars.fd")
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

/// The store entry an instance's overlay is made on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// The entry's directory name, `<key>-<name>`.
    pub entry: String,
    /// Its disk on the instance's site: the overlay's backing file.
    pub disk: PathBuf,
    /// The blake3 of the layer's bytes, from the entry's metadata (unknown only in a dry
    /// run before the layer is built). An overlay holds block-level differences to exactly
    /// these bytes: a layer rebuilt with other bytes under it would corrupt it.
    pub blake3: Option<ContentHash>,
}

/// QEMU user networking: NAT out, ssh and `forwards` in on the site's 127.0.0.1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNet {
    pub mac: MacAddr,
    pub ssh_port: u16,
    /// `(site port, guest port)`.
    pub forwards: Vec<(u16, u16)>,
}

/// A NIC on a VDE network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdeNicSpec {
    pub network: String,
    pub mac: MacAddr,
    pub address: Option<IpCidr>,
    pub gateway: Option<IpAddr>,
    /// What qemu's `-netdev vde,sock=` is given: a switch's control directory on the site,
    /// or a vdeplug4 URL.
    pub plug: String,
}

/// A NIC on a network of the site's libvirtd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtNicSpec {
    pub network: String,
    pub mac: MacAddr,
    pub address: Option<IpCidr>,
    pub gateway: Option<IpAddr>,
}

/// Everything about one instance that farm.toml, the store and the site decide.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub name: String,
    pub hostname: String,
    /// The store entry name of its platform layer (`<platform>_<target>`), for people.
    pub platform: String,
    pub drv_hash: DrvHash,
    pub layer: LayerRef,
    pub boot: Option<DirectBoot>,
    /// Boots through UEFI firmware (with its variable store in the instance's directory)
    /// rather than SeaBIOS; only when there are no boot files. Absent in older records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uefi: bool,
    pub hw: MachineSpec,
    /// The overlay's virtual size; the layer's when absent.
    pub disk_size: Option<u64>,
    pub user_net: Option<UserNet>,
    pub vde_nics: Vec<VdeNicSpec>,
    /// NICs on networks of the site's libvirtd (the libvirt backend only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub libvirt_nics: Vec<LibvirtNicSpec>,
    pub authorized_keys: Vec<String>,
    pub paths: InstancePaths,
    pub tag: ProcessTag,
    /// How its site runs it; absent in records from before backends (qemu).
    #[serde(default, skip_serializing_if = "Backend::is_qemu")]
    pub backend: Backend,
}

impl InstanceSpec {
    /// The forwarded ssh port on the site, when the VM has user networking.
    pub fn ssh_port(&self) -> Option<u16> {
        self.user_net.as_ref().map(|u| u.ssh_port)
    }

    /// Every port the VM's qemu listens on at the site's 127.0.0.1.
    pub fn site_ports(&self) -> Vec<u16> {
        self.user_net
            .iter()
            .flat_map(|u| std::iter::once(u.ssh_port).chain(u.forwards.iter().map(|f| f.0)))
            .collect()
    }

    /// The qemu command line, as data.
    pub fn qemu(&self) -> QemuVm {
        let paths = &self.paths;
        let user = self.user_net.as_ref().map(|u| Nic {
            backend: NetBackend::User {
                forwards: std::iter::once((u.ssh_port, 22))
                    .chain(u.forwards.iter().copied())
                    .map(|(host_port, guest_port)| PortForward {
                        host_addr: "127.0.0.1".into(),
                        host_port,
                        guest_port,
                    })
                    .collect(),
            },
            mac: u.mac,
        });
        QemuVm {
            name: self.name.clone(),
            hw: self.hw.clone(),
            disks: vec![
                Disk {
                    path: paths.disk(),
                    format: "qcow2",
                    readonly: false,
                    cache: DiskCache::Writeback,
                },
                Disk {
                    path: paths.seed(),
                    format: "raw",
                    readonly: true,
                    cache: DiskCache::Writeback,
                },
            ],
            boot: self.boot.clone(),
            uefi_vars: (self.uefi && self.boot.is_none()).then(|| paths.efi_vars()),
            nics: user
                .into_iter()
                .chain(
                    self.vde_nics
                        .iter()
                        .zip(self.wires())
                        .map(|(nic, wire)| Nic {
                            // Through its wire (`model::lab::wire`), which `farm link` shapes.
                            backend: NetBackend::Vde {
                                sock: wire.files.qemu_plug(),
                            },
                            mac: nic.mac,
                        }),
                )
                .chain(self.libvirt_nics.iter().map(|nic| Nic {
                    backend: NetBackend::LibvirtNetwork {
                        network: nic.network.clone(),
                    },
                    mac: nic.mac,
                }))
                .collect(),
            serial_log: paths.serial_log(),
            qmp_socket: Some(paths.qmp()),
            pidfile: Some(paths.pidfile()),
            daemonize: true,
            tag: Some(self.tag.clone()),
            incoming: false,
            display: true,
        }
    }

    /// The QMP name of the network backend of the NIC on `network` (`user` for QEMU's user
    /// network), as its qemu was started; `Err` says which NICs it has.
    pub fn netdev_of(&self, network: &str) -> Result<String, String> {
        let names: Vec<&str> = self
            .user_net
            .iter()
            .map(|_| "user")
            .chain(self.vde_nics.iter().map(|n| n.network.as_str()))
            .collect();
        match names.iter().position(|name| *name == network) {
            Some(i) => Ok(crate::model::build::qemu::netdev_id(
                i,
                !self.backend.is_qemu(),
            )),
            None if self.libvirt_nics.iter().any(|n| n.network == network) => Err(format!(
                "VM `{}`'s NIC on `{network}` is libvirt's: farm cannot switch its link yet",
                self.name
            )),
            None => Err(format!(
                "VM `{}` has no NIC on `{network}`; its NICs: {}",
                self.name,
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )),
        }
    }

    /// The seed's NICs: the user NIC by DHCP, VDE NICs with their static addresses, matched
    /// by MAC in the guest, so a VM only on VDE is configured without being reached first.
    fn seed_nics(&self) -> Vec<SeedNic> {
        self.user_net
            .iter()
            .map(|u| SeedNic {
                mac: u.mac,
                address: None,
                gateway: None,
            })
            .chain(self.vde_nics.iter().map(|nic| SeedNic {
                mac: nic.mac,
                address: nic.address,
                gateway: nic.gateway,
            }))
            .chain(self.libvirt_nics.iter().map(|nic| SeedNic {
                mac: nic.mac,
                address: nic.address,
                gateway: nic.gateway,
            }))
            .collect()
    }

    /// A new instance id whenever what the seed says changes, so cloud-init applies it
    /// again on the next boot (farm's own agents apply the seed at every boot anyway).
    pub fn instance_id(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.drv_hash.to_hex().as_bytes());
        hasher.update(self.hostname.as_bytes());
        for key in &self.authorized_keys {
            hasher.update(b"\0key ");
            hasher.update(key.as_bytes());
        }
        for nic in self.seed_nics() {
            hasher.update(
                format!("\0nic {} {:?} {:?}", nic.mac, nic.address, nic.gateway).as_bytes(),
            );
        }
        format!("{}-{}", self.name, &hasher.finalize().to_hex()[..12])
    }

    /// The seed volume's content, with the instance's pinned host key (private, public).
    pub fn seed(&self, host_key: (String, String)) -> SeedSpec {
        let mut seed = SeedSpec::new(self.instance_id(), self.hostname.clone());
        seed.authorized_keys = self.authorized_keys.clone();
        seed.host_key = Some(host_key);
        seed.nics = self.seed_nics();
        seed
    }
}

/// What farm keeps in `instance.json` beside the overlay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub format: u32,
    /// How the instance was last started.
    pub spec: InstanceSpec,
    /// It answered ssh after its last start. A VM that never did is not kept as it is.
    pub ready: bool,
    /// `farm down --keep` stopped it on purpose: its overlay holds data the user asked to
    /// keep, so farm never replaces it silently.
    pub kept: bool,
}

impl InstanceRecord {
    pub fn new(spec: InstanceSpec) -> Self {
        Self {
            format: RECORD_FORMAT,
            spec,
            ready: false,
            kept: false,
        }
    }

    /// Parses a record; `Err` with a reason for one farm cannot use (unreadable, or another
    /// format).
    pub fn parse(bytes: &[u8]) -> Result<InstanceRecord, String> {
        #[derive(Deserialize)]
        struct Version {
            format: Option<u32>,
        }
        let version: Version =
            serde_json::from_slice(bytes).map_err(|e| format!("unreadable ({e})"))?;
        match version.format {
            Some(RECORD_FORMAT) => {
                serde_json::from_slice(bytes).map_err(|e| format!("unreadable ({e})"))
            }
            Some(other) => Err(format!("written in record format {other}")),
            None => Err("written by an older farm".to_string()),
        }
    }

    /// One line of JSON: what the observation script reads back with `cat`.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records serialize")
    }
}

/// A VM's state, as `farm status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Running what farm.toml asks for, and answering ssh.
    Running,
    /// Its qemu runs, but nothing answers ssh.
    Unreachable,
    /// Has an overlay, but its qemu is not running.
    Stopped,
    /// Never started, or taken down.
    Missing,
    /// Exists, but farm.toml now asks for something else: `farm up` restarts or replaces it.
    Changed,
    /// A qemu farm started runs for it, but farm has no state for it (`.farm/` was lost).
    Orphaned,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Unreachable => "unreachable",
            VmState::Stopped => "stopped",
            VmState::Missing => "missing",
            VmState::Changed => "changed",
            VmState::Orphaned => "orphaned",
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::build::qemu::ResolvedAccel;
    use crate::model::values::Arch;

    pub(crate) fn spec() -> InstanceSpec {
        InstanceSpec {
            name: "web".into(),
            hostname: "web".into(),
            platform: "plain_amd64".into(),
            drv_hash: DrvHash([1; 32]),
            layer: LayerRef {
                entry: "0101-plain_amd64".into(),
                disk: "/s/store/0101-plain_amd64/disk.qcow2".into(),
                blake3: Some(ContentHash([2; 32])),
            },
            boot: None,
            uefi: false,
            hw: MachineSpec {
                arch: Arch::X86_64,
                machine: None,
                cpu: None,
                accel: ResolvedAccel::Tcg,
                memory_mib: 256,
                cpus: 1,
            },
            disk_size: None,
            user_net: Some(UserNet {
                mac: "52:54:00:00:00:01".parse().unwrap(),
                ssh_port: 2201,
                forwards: vec![(8080, 80)],
            }),
            vde_nics: vec![VdeNicSpec {
                network: "lab".into(),
                mac: "52:54:00:00:00:02".parse().unwrap(),
                address: Some("10.0.0.2/24".parse().unwrap()),
                gateway: None,
                plug: "vxvde://234.0.0.1".into(),
            }],
            libvirt_nics: Vec::new(),
            authorized_keys: vec!["ssh-ed25519 AAAA farm".into()],
            paths: InstancePaths::new(Path::new("/p/.farm"), "web"),
            tag: ProcessTag::vm("/p/.farm", "web"),
            backend: Backend::Qemu,
        }
    }

    #[test]
    fn a_nic_is_named_by_its_network_as_its_qemu_knows_it() {
        let qemu = spec();
        assert_eq!(qemu.netdev_of("user").unwrap(), "net0");
        assert_eq!(qemu.netdev_of("lab").unwrap(), "net1");
        let argv = qemu.qemu().argv().join(" ");
        assert!(
            argv.contains("user,id=net0,") && argv.contains("vde,id=net1,"),
            "{argv}"
        );
        let e = qemu.netdev_of("nowhere").unwrap_err();
        assert!(
            e.contains("`web` has no NIC on `nowhere`; its NICs: user, lab"),
            "{e}"
        );
        let mut domain = spec();
        domain.backend = Backend::Libvirt {
            uri: "qemu:///system".into(),
        };
        domain.user_net = None;
        assert_eq!(domain.netdev_of("lab").unwrap(), "farmnet0");
    }

    #[test]
    fn instance_argv_tags_the_process_and_honours_flushes() {
        let vm = spec().qemu();
        let argv = vm.argv().join(" ");
        assert!(argv.contains("-name web,process=farm-web"), "{argv}");
        assert!(argv.contains("hostfwd=tcp:127.0.0.1:2201-:22,hostfwd=tcp:127.0.0.1:8080-:80"));
        assert!(argv.contains("-netdev vde,id=net1,sock=ptp:///p/.farm/vms/web/wire0.ptp"));
        assert!(argv.contains("disk.qcow2,if=virtio,format=qcow2,index=0,cache=writeback"));
        assert!(!argv.contains("cache=unsafe"), "{argv}");
        assert!(argv.contains("-pidfile /p/.farm/vms/web/qemu.pid -daemonize"));
        assert_eq!(
            vm.tag.unwrap().env(),
            [
                ("FARM_PROJECT", "/p/.farm".to_string()),
                ("FARM_PROCESS", "vm:web".to_string())
            ]
        );
        assert_eq!(spec().site_ports(), [2201, 8080]);
    }

    #[test]
    fn the_instance_id_follows_what_the_seed_says() {
        let a = spec();
        let mut b = spec();
        b.hw.memory_mib = 512;
        assert_eq!(
            a.instance_id(),
            b.instance_id(),
            "hardware is not in the seed"
        );
        b.hostname = "other".into();
        assert_ne!(a.instance_id(), b.instance_id());
        let seed = a.seed(("private".into(), "public".into()));
        assert_eq!(seed.nics.len(), 2);
        assert_eq!(seed.nics[1].address, Some("10.0.0.2/24".parse().unwrap()));
    }

    #[test]
    fn records_round_trip_and_other_formats_are_refused() {
        let record = InstanceRecord::new(spec());
        let json = record.to_json();
        assert!(!json.contains(&b'\n'), "one line");
        assert_eq!(InstanceRecord::parse(&json).unwrap(), record);
        let old = br#"{"name":"web","drv_hash":"x","argv":[]}"#;
        assert_eq!(
            InstanceRecord::parse(old).unwrap_err(),
            "written by an older farm"
        );
        assert!(
            InstanceRecord::parse(b"{not json")
                .unwrap_err()
                .starts_with("unreadable")
        );
        let future = br#"{"format":9}"#;
        assert_eq!(
            InstanceRecord::parse(future).unwrap_err(),
            "written in record format 9"
        );
    }
}
