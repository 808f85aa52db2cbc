//! The configuration as farm understands it, after parsing and before validation.
//!
//! Every name and reference remembers where it was written (`Origin`), so validation, which
//! is pure, can report file, line and column without touching the files again.

pub mod backend;
pub mod diagnostic;
pub mod limits;
pub mod network;
pub mod topology;
pub mod validate;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;

use crate::model::config::backend::Backend;
use crate::model::hash::ExpectedHash;
use crate::model::values::{
    Accel, Arch, ByteSize, DiskFormat, Firmware, IpCidr, MacAddr, SshAddress,
};

/// Index of a source file in the loaded configuration's file list.
pub type FileId = usize;

/// Where something was written: a file and a byte range in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    pub file: FileId,
    pub span: Range<usize>,
}

/// A value and where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub at: Origin,
}

impl<T> Located<T> {
    pub fn new(value: T, at: Origin) -> Self {
        Self { value, at }
    }
}

impl<T> std::ops::Deref for Located<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// The whole farm.toml (and its `images/`, `platforms/` files).
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub images: BTreeMap<String, Image>,
    pub targets: BTreeMap<String, Target>,
    pub platforms: BTreeMap<String, Platform>,
    pub networks: BTreeMap<String, Network>,
    pub hosts: BTreeMap<String, Host>,
    pub vms: BTreeMap<String, VmDecl>,
    /// Binary caches and whom to trust (farm.toml's top-level `substituters` and
    /// `trusted-public-keys`).
    pub cache: CacheSettings,
    /// farm.toml's `[lab]`: how `farm up` starts the lab.
    pub lab: LabSettings,
    /// farm.toml's `[tests.NAME]`: what `farm test` runs against the lab.
    pub tests: BTreeMap<String, TestDecl>,
    /// Definitions found twice (e.g. in farm.toml and in platforms/NAME.toml): kind, name,
    /// first and second place. Parsing keeps the first; validation reports the pair.
    pub duplicates: Vec<DuplicateDefinition>,
}

#[derive(Clone, Debug, Default)]
pub struct CacheSettings {
    /// Cache URLs, in the order they are asked.
    pub substituters: Vec<Located<String>>,
    pub trusted_public_keys: Vec<Located<crate::model::signing::PublicKey>>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct LabSettings {
    /// `converged_snapshot = true`: `up` keeps the snapshot `converged` of the lab as it
    /// converged from nothing, and starts the lab from it when the whole lab is down and
    /// nothing it was made from changed (`model::lab::converged`).
    pub converged_snapshot: bool,
}

/// A test `farm test` runs: a script, started against the lab restored from a snapshot.
#[derive(Clone, Debug)]
pub struct TestDecl {
    pub name: Located<String>,
    /// The script, resolved against farm.toml's directory.
    pub script: Located<PathBuf>,
    /// The snapshot every run of it starts from (`converged`, which `farm test` makes with
    /// `up` when it is missing, or one the user saved).
    pub start: Located<String>,
    pub timeout: std::time::Duration,
}

/// The snapshot a test starts from when it names none: the lab as `up` converged it.
pub const DEFAULT_TEST_START: &str = "converged";

/// How long a test's script may run when it says nothing.
pub const DEFAULT_TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Clone, Debug)]
pub struct DuplicateDefinition {
    pub kind: &'static str,
    pub name: String,
    pub first: Origin,
    pub second: Origin,
}

/// A base disk from outside farm.
#[derive(Clone, Debug)]
pub struct Image {
    pub name: Located<String>,
    pub source: ImageSource,
    /// The architecture the image is for, when it is fixed (downloaded or local images).
    pub arch: Option<Arch>,
    /// The disk format after decompression; detected when absent.
    pub format: Option<DiskFormat>,
    /// How the image's bootloader is started; `Firmware::default_for(arch)` when absent.
    /// Only images with their own bootloader (`url`, `path`) have one: farm's own images
    /// boot their kernel directly.
    pub firmware: Option<Firmware>,
}

#[derive(Clone, Debug)]
pub enum ImageSource {
    /// Downloaded; the expected hash is of the bytes as served (before decompression).
    Url {
        url: Located<String>,
        hash: ExpectedHash,
    },
    /// A local file, resolved relative to the file that declares it.
    Path {
        path: Located<PathBuf>,
        hash: Option<ExpectedHash>,
    },
    /// Built from a Debian mirror with mmdebstrap.
    Debian(DebianSpec),
    /// farm's tiny image: a Debian cloud kernel, busybox and dropbear, built from the host's
    /// apt sources (see `crate::build::tiny_image`). Boots to ssh in seconds, even nested.
    Tiny,
}

impl ImageSource {
    /// Images farm builds itself are built per target architecture; downloaded and local
    /// files are whatever architecture they are.
    pub fn is_per_arch(&self) -> bool {
        matches!(self, ImageSource::Debian(_) | ImageSource::Tiny)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebianSpec {
    pub suite: String,
    pub mirror: String,
    pub variant: String,
    pub packages: Vec<String>,
    pub init: DebianInit,
}

/// What runs as PID 1 in a Debian image farm builds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DebianInit {
    /// systemd, udev, networkd and OpenSSH, with farm's seed agent as a unit: Debian as
    /// people run it.
    #[default]
    Systemd,
    /// busybox init running the tiny image's boot script, with dropbear and farm's own small
    /// initramfs: no systemd, no udev. For guests inside guests, where nested TCG makes a
    /// systemd boot take ten minutes, that still need apt, dpkg and python (Ansible).
    Busybox,
}

impl DebianInit {
    pub fn is_systemd(&self) -> bool {
        *self == DebianInit::Systemd
    }
}

#[derive(Clone, Debug)]
pub struct Target {
    pub name: Located<String>,
    pub arch: Arch,
    pub machine: Option<String>,
    pub cpu: Option<String>,
    pub accel: Accel,
}

/// A derivation: a parent (image or platform) plus customisation steps.
#[derive(Clone, Debug)]
pub struct Platform {
    pub name: Located<String>,
    pub from: Located<String>,
    pub steps: Steps,
    pub resources: Resources,
}

/// Customisation steps, applied in the order of the fields: keys, upgrade, packages,
/// files, run.
#[derive(Clone, Debug, Default)]
pub struct Steps {
    pub authorized_keys: Vec<KeyGrant>,
    pub upgrade: bool,
    pub packages: Vec<String>,
    /// Guest path → local file.
    pub files: BTreeMap<String, Located<PathBuf>>,
    pub run: Vec<String>,
    /// An Ansible playbook applied to the build VM last; its `roles/` directory, when it
    /// has one beside it, is an input too.
    pub playbook: Option<Located<PathBuf>>,
    /// How the steps reach the image (absent: `boot`).
    pub builder: Option<Located<crate::model::values::Builder>>,
}

impl Steps {
    /// How the steps reach the image.
    pub fn builder(&self) -> crate::model::values::Builder {
        self.builder.as_ref().map(|b| b.value).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.authorized_keys.is_empty()
            && !self.upgrade
            && self.packages.is_empty()
            && self.files.is_empty()
            && self.run.is_empty()
            && self.playbook.is_none()
    }

    /// Number of distinct step kinds present, for plan summaries.
    pub fn count(&self) -> usize {
        [
            !self.authorized_keys.is_empty(),
            self.upgrade,
            !self.packages.is_empty(),
            !self.files.is_empty(),
            !self.run.is_empty(),
            self.playbook.is_some(),
        ]
        .iter()
        .filter(|present| **present)
        .count()
    }
}

/// A public key file to authorise for a guest user.
#[derive(Clone, Debug)]
pub struct KeyGrant {
    pub user: String,
    pub key_file: Located<PathBuf>,
}

/// VM sizing, settable on platform, target-independent; a VM's own values win.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory: Option<ByteSize>,
    pub cpus: Option<u32>,
    pub disk_size: Option<ByteSize>,
}

impl Config {
    /// A platform's VM defaults: its own where set, else those of the platform it is built
    /// `from`, and so on up (a platform made from a hypervisor platform runs like it).
    pub fn platform_resources(&self, name: &str) -> Resources {
        let mut resources = Resources::default();
        let mut current = self.platforms.get(name);
        // Bounded: `check` reports cycles, but this must end before it has.
        for _ in 0..=self.platforms.len() {
            let Some(platform) = current else { break };
            resources = resources.or(&platform.resources);
            current = self.platforms.get(&platform.from.value);
        }
        resources
    }
}

impl Resources {
    /// `self` where set, else `fallback`.
    pub fn or(&self, fallback: &Resources) -> Resources {
        Resources {
            memory: self.memory.or(fallback.memory),
            cpus: self.cpus.or(fallback.cpus),
            disk_size: self.disk_size.or(fallback.disk_size),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Network {
    pub name: Located<String>,
    pub kind: NetworkKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkKind {
    /// A VDE network: a farm-run switch when `url` is absent, else a vdeplug4 URL.
    Vde {
        url: Option<Located<String>>,
        subnet: Option<Located<IpCidr>>,
    },
}

/// A machine VMs run on that is not itself a VM of the topology.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: Located<String>,
    /// `user@server[:port]`; absent means this machine.
    pub address: Option<Located<SshAddress>>,
    /// The key to log in with, instead of ssh's defaults (relative to farm.toml).
    pub identity_file: Option<Located<String>>,
    /// The known_hosts file that pins the host's key, instead of the user's own.
    pub known_hosts: Option<Located<String>>,
    /// Where farm keeps its store and VM state on the host (absolute).
    pub root: Option<Located<String>>,
    pub deploy: Option<Deploy>,
    pub attach: Vec<Attachment>,
    /// How the VMs on this host run (`backend`, `libvirt_uri`).
    pub backend: Option<Located<Backend>>,
}

/// The seed's permutations: every platform × every target becomes a VM `<platform>_<target>`.
#[derive(Clone, Debug)]
pub struct Deploy {
    pub targets: Vec<Located<String>>,
    pub platforms: Vec<Located<String>>,
}

/// A hypervisor joining a network with an address of its own.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub network: Located<String>,
    pub address: Located<IpCidr>,
}

/// A `[vms.NAME]` table: either refines a VM generated by a `deploy`, or declares one.
#[derive(Clone, Debug)]
pub struct VmDecl {
    pub name: Located<String>,
    pub platform: Option<Located<String>>,
    pub target: Option<Located<String>>,
    pub host: Option<Located<String>>,
    pub hostname: Option<Located<String>>,
    pub ssh_port: Option<Located<u16>>,
    pub forwards: Vec<Located<Forward>>,
    pub user_network: bool,
    pub nics: Vec<Nic>,
    /// NICs on networks of the site's libvirtd (`libvirt_network = "default"`).
    pub libvirt_nics: Vec<Nic>,
    pub attach: Vec<Attachment>,
    pub deploy: Option<Deploy>,
    pub resources: Resources,
    /// An Ansible playbook `farm up` applies once after the VM's first boot (again after it
    /// is replaced, or when the playbook changes).
    pub playbook: Option<Located<PathBuf>>,
    /// How the VMs this VM deploys run on it (`backend`, `libvirt_uri`).
    pub backend: Option<Located<Backend>>,
}

/// A TCP port forwarded from the hypervisor's 127.0.0.1 to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    pub host: u16,
    pub guest: u16,
}

#[derive(Clone, Debug)]
pub struct Nic {
    pub network: Located<String>,
    pub ip: Option<Located<IpCidr>>,
    pub gateway: Option<Located<std::net::IpAddr>>,
    pub mac: Option<Located<MacAddr>>,
}
