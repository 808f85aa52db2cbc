//! farm.toml as written: serde types that keep spans and reject unknown keys.
//! `lower` turns them into the model's `Config`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use toml::Spanned;

use crate::model::values::{
    Accel, Arch, Builder, DiskFormat, Firmware, IpCidr, MacAddr, SshAddress,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    #[serde(default)]
    pub images: BTreeMap<Spanned<String>, RawImage>,
    #[serde(default)]
    pub targets: BTreeMap<Spanned<String>, RawTarget>,
    #[serde(default)]
    pub platforms: BTreeMap<Spanned<String>, RawPlatform>,
    #[serde(default)]
    pub networks: BTreeMap<Spanned<String>, RawNetwork>,
    #[serde(default)]
    pub hosts: BTreeMap<Spanned<String>, RawHost>,
    #[serde(default)]
    pub vms: BTreeMap<Spanned<String>, RawVm>,
    /// Binary caches asked for a derivation before it is built.
    #[serde(default)]
    pub substituters: Vec<Spanned<String>>,
    /// `NAME:BASE64` ed25519 keys whose signatures on cache records are trusted.
    #[serde(default, rename = "trusted-public-keys")]
    pub trusted_public_keys: Vec<Spanned<String>>,
    /// How `farm up` starts the lab.
    #[serde(default)]
    pub lab: RawLab,
    /// `farm test`'s tests, each a script run against the lab.
    #[serde(default)]
    pub tests: BTreeMap<Spanned<String>, RawTest>,
}

/// farm.toml's `[tests.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTest {
    /// The script to run, relative to farm.toml's directory.
    pub script: Spanned<String>,
    /// The snapshot each run starts from: `converged` (the default) or one saved by name.
    pub start: Option<Spanned<String>>,
    /// How long the script may run: `90s`, `5m`, `1h`, or seconds.
    pub timeout: Option<Spanned<String>>,
}

/// farm.toml's `[lab]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLab {
    /// Save the lab once `up` converged it from nothing, and start it from that snapshot
    /// while nothing it was made from changed.
    pub converged_snapshot: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImage {
    pub url: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub debian: Option<Spanned<RawDebian>>,
    /// farm's tiny image (kernel + busybox + dropbear); `false` is the same as absent.
    pub tiny: Option<Spanned<bool>>,
    pub sha256: Option<Spanned<String>>,
    pub sha512: Option<Spanned<String>>,
    pub blake3: Option<Spanned<String>>,
    pub arch: Option<Arch>,
    pub format: Option<DiskFormat>,
    /// `bios` or `uefi`: how the image's own bootloader is started.
    pub firmware: Option<Spanned<Firmware>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDebian {
    pub suite: Spanned<String>,
    pub mirror: Option<Spanned<String>>,
    pub variant: Option<Spanned<String>>,
    #[serde(default)]
    pub packages: Vec<Spanned<String>>,
    /// `systemd` (the default) or `busybox`: see `DebianInit`.
    #[serde(default)]
    pub init: crate::model::config::DebianInit,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub arch: Arch,
    pub machine: Option<Spanned<String>>,
    pub cpu: Option<String>,
    #[serde(default)]
    pub accel: Accel,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlatform {
    pub from: Spanned<String>,
    pub authorized_keys: Option<RawKeys>,
    #[serde(default)]
    pub upgrade: bool,
    #[serde(default)]
    pub packages: Vec<Spanned<String>>,
    #[serde(default)]
    pub files: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    pub run: Vec<String>,
    /// An Ansible playbook applied in the build VM after `run`.
    pub playbook: Option<Spanned<String>>,
    /// `boot` (the default) or `chroot`: see `Builder`.
    pub builder: Option<Spanned<Builder>>,
    pub memory: Option<Spanned<RawSize>>,
    pub cpus: Option<Spanned<i64>>,
    pub disk_size: Option<Spanned<RawSize>>,
}

/// A size as written: `"2G"`, or a bare number, kept as text for lowering to judge (a
/// bare number is refused there, with a hint, rather than guessed to be bytes or MiB).
#[derive(Debug)]
pub struct RawSize(pub String);

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl serde::de::Visitor<'_> for SizeVisitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size such as \"2G\" or \"512M\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawSize, E> {
                Ok(RawSize(v.to_string()))
            }
        }
        d.deserialize_any(SizeVisitor)
    }
}

/// `authorized_keys = ["key.pub"]` (for root) or `{ user = ["key.pub"] }`.
#[derive(Debug)]
pub enum RawKeys {
    ForRoot(Vec<Spanned<String>>),
    PerUser(BTreeMap<Spanned<String>, Vec<Spanned<String>>>),
}

/// Hand-written rather than `#[serde(untagged)]`: untagged enums buffer their input, which
/// loses toml's spans, and every key file must be reported at its own line when missing.
impl<'de> Deserialize<'de> for RawKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeysVisitor;
        impl<'de> serde::de::Visitor<'de> for KeysVisitor {
            type Value = RawKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of public key files, or a table of user = [key files]")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = seq.next_element()? {
                    keys.push(key);
                }
                Ok(RawKeys::ForRoot(keys))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawKeys, A::Error> {
                let mut users = BTreeMap::new();
                while let Some((user, keys)) = map.next_entry()? {
                    users.insert(user, keys);
                }
                Ok(RawKeys::PerUser(users))
            }
        }
        d.deserialize_any(KeysVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    pub kind: RawNetworkKind,
    pub url: Option<Spanned<String>>,
    pub subnet: Option<Spanned<IpCidr>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawNetworkKind {
    Vde,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    pub address: Option<Spanned<SshAddress>>,
    pub identity_file: Option<Spanned<String>>,
    pub known_hosts: Option<Spanned<String>>,
    pub root: Option<Spanned<String>>,
    pub deploy: Option<RawDeploy>,
    #[serde(default)]
    pub attach: BTreeMap<Spanned<String>, Spanned<IpCidr>>,
    /// How the VMs on this host run: `qemu` (default) or `libvirt`.
    pub backend: Option<Spanned<String>>,
    pub libvirt_uri: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeploy {
    #[serde(default)]
    pub targets: Vec<Spanned<String>>,
    #[serde(default)]
    pub platforms: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVm {
    pub platform: Option<Spanned<String>>,
    pub target: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub hostname: Option<Spanned<String>>,
    pub ssh_port: Option<Spanned<u16>>,
    #[serde(default)]
    pub forwards: Vec<Spanned<RawForward>>,
    pub user_network: Option<bool>,
    #[serde(default)]
    pub nics: Vec<Spanned<RawNic>>,
    #[serde(default)]
    pub attach: BTreeMap<Spanned<String>, Spanned<IpCidr>>,
    pub deploy: Option<RawDeploy>,
    pub memory: Option<Spanned<RawSize>>,
    pub cpus: Option<Spanned<i64>>,
    pub disk_size: Option<Spanned<RawSize>>,
    /// An Ansible playbook `farm up` applies to the VM once, after its first boot.
    pub playbook: Option<Spanned<String>>,
    /// How the VMs this VM deploys run on it: `qemu` (default) or `libvirt`.
    pub backend: Option<Spanned<String>>,
    pub libvirt_uri: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForward {
    pub host: u16,
    pub guest: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNic {
    /// A VDE network of farm.toml.
    pub network: Option<Spanned<String>>,
    /// A network of the site's libvirtd (its `backend` must be libvirt).
    pub libvirt_network: Option<Spanned<String>>,
    pub ip: Option<Spanned<IpCidr>>,
    pub gateway: Option<Spanned<IpAddr>>,
    pub mac: Option<Spanned<MacAddr>>,
}
