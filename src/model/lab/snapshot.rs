//! A lab snapshot as data: which VMs were saved (each top-level VM's frozen overlay and its
//! memory and device state; the VMs inside hypervisor VMs are inside their hypervisor's
//! state), and what it was made from (the topology and qemu), so a restore into another
//! farm.toml or another qemu is refused before anything stops.
//!
//! Pure: `run::snapshot` saves and restores.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::config::topology::{Placement, Topology};
use crate::model::lab::instance::InstanceSpec;

/// The version of the manifest's layout and of the machines its states were saved from;
/// another is refused, not guessed at. 2: every VM has a free page reporting balloon
/// (`FREE_PAGE_REPORTING`), which moves other devices' PCI slots, so a state saved without
/// it does not load. 3: every x86_64 instance has a display (`DISPLAY`), whose video memory
/// is in the state.
pub const SNAPSHOT_FORMAT: u32 = 3;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub format: u32,
    pub name: String,
    /// Seconds since the epoch when it was saved.
    pub created: u64,
    /// [`topology_digest`] of the farm.toml it was saved from.
    pub topology: String,
    /// The first line of `qemu-system-… --version` that saved it (a state loads only into
    /// the qemu that wrote it, or a newer one that still reads it: farm asks for the same).
    pub qemu: String,
    /// The top-level VMs, each with its disk and machine state.
    pub vms: Vec<SavedVm>,
    /// VMs saved inside a hypervisor VM's state.
    pub inside: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVm {
    pub name: String,
    /// Its store entry (`<key>-snap-<vm>`): the frozen overlay backing onto the VM's layer
    /// entry, the compressed machine state, and the local directories of the VM and of the
    /// VMs inside it.
    pub entry: String,
    /// Bytes of the frozen overlay and of the compressed machine state.
    pub disk_bytes: u64,
    pub state_bytes: u64,
    /// The remote host it runs on, whose own store holds its entry (saved on its host: a
    /// machine state and disk are gigabytes, and they are restored where they ran). Absent
    /// for this machine's VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// That host's qemu (`--version`'s first line), which alone can load the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_qemu: Option<String>,
}

/// The label of a saved VM's store entry.
pub fn entry_name(vm: &str) -> String {
    let mut name = format!("snap-{vm}");
    name.truncate(64);
    name
}

/// What a saved VM's store entry is, as its metadata keeps it: content-addressed (the hashes
/// of the state and of the frozen overlay are in it), so the same save is the same entry.
#[allow(clippy::too_many_arguments)]
pub fn entry_derivation(
    snapshot: &str,
    vm: &str,
    parent: &str,
    disk: &str,
    state: &str,
    topology: &str,
    qemu: &str,
) -> serde_json::Value {
    serde_json::json!({
        "kind": "snapshot",
        "snapshot": snapshot,
        "vm": vm,
        "parent": parent,
        "disk_blake3": disk,
        "state_blake3": state,
        "topology": topology,
        "qemu": qemu,
    })
}

/// The store entry a saved VM's disk backs onto, from its overlay's backing file
/// (`…/store/<entry>/disk.qcow2`): the VM's layer, or, in a lab restored from a snapshot,
/// that snapshot's entry, which holds everything the lab wrote before it was saved (an
/// entry rebased onto the layer instead would lose it, unseen while the guest's page cache
/// still held the blocks).
pub fn disk_parent(vm: &str, backing: Option<&Path>) -> Result<String, String> {
    let entry = backing
        .filter(|b| {
            b.file_name()
                == Some(std::ffi::OsStr::new(
                    crate::model::build::cache_record::DISK_FILE,
                ))
        })
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|name| name.to_str());
    match entry {
        Some(entry) if !entry.is_empty() && entry != ".." && entry != "." => Ok(entry.to_string()),
        _ => Err(format!(
            "VM `{vm}`'s disk backs onto {}, not a store entry's disk: farm cannot say what the snapshot's disk is made on\nhint: `farm down {vm}` and `farm up` make its overlay anew",
            backing.map_or("nothing".to_string(), |b| format!("`{}`", b.display()))
        )),
    }
}

/// The store key of a saved VM's entry: its derivation hashed as every entry's is (so an
/// import or a pull checks it the same way).
pub fn entry_key(derivation: &serde_json::Value) -> crate::model::hash::DrvHash {
    crate::model::build::derivation::hash_of_json(derivation)
}

/// The snapshot a store entry belongs to, from its derivation.
pub fn snapshot_of(derivation: &serde_json::Value) -> Option<&str> {
    (derivation["kind"] == "snapshot")
        .then(|| derivation["snapshot"].as_str())
        .flatten()
}

/// Where a snapshot's manifest is, `<state>/snapshots/<name>/`; its files are store entries.
#[derive(Clone, Debug)]
pub struct SnapshotPaths {
    pub dir: PathBuf,
}

impl SnapshotPaths {
    pub fn new(state_dir: &Path, name: &str) -> Self {
        Self {
            dir: state_dir.join("snapshots").join(name),
        }
    }
    pub fn manifest(&self) -> PathBuf {
        self.dir.join("snapshot.json")
    }
}

/// The files of a saved VM's store entry, beside its `disk.qcow2`.
pub const STATE_FILE: &str = "state.zst";
/// The snapshot's manifest, also kept in each of its entries so a store that received them
/// (imported, pulled) can restore the snapshot without the state directory that saved it.
pub const MANIFEST_FILE: &str = "snapshot.json";
/// The local directories of the VM and of the VMs inside it, by VM name.
pub const VMS_DIR: &str = "vms";
/// farm's ssh key pair the lab's VMs authorize (`id_ed25519`, `id_ed25519.pub`): a store
/// that restores the snapshot elsewhere logs in with it.
pub const IDENTITY_DIR: &str = "identity";

/// What a snapshot holds: the top-level VMs saved with their state, and every VM inside
/// them (in their hypervisor's state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub top: Vec<String>,
    pub inside: Vec<String>,
}

impl Selection {
    /// Every VM of the selection, top-level ones first.
    pub fn all(&self) -> impl Iterator<Item = &String> {
        self.top.iter().chain(&self.inside)
    }
}

/// The top-level VM whose state holds `vm` (`vm` itself when it runs on a host).
pub fn top_level_of<'a>(topology: &'a Topology, vm: &'a str) -> &'a str {
    topology
        .chain(vm)
        .into_iter()
        .find_map(|p| match p {
            Placement::Vm(v) => topology.vms.get_key_value(&v).map(|(k, _)| k.as_str()),
            Placement::Host(_) => None,
        })
        .unwrap_or(vm)
}

/// The VMs a snapshot of `names` holds (the whole lab when `names` is empty): each named
/// VM with every VM inside it. A VM inside a hypervisor VM cannot be named alone (its
/// state is part of its hypervisor's), nor can a libvirt domain (libvirt keeps its own
/// saved states).
pub fn selection(topology: &Topology, names: &[String]) -> Result<Selection, String> {
    for name in names {
        let Some(vm) = topology.vms.get(name) else {
            let known: Vec<&str> = topology.vms.keys().map(String::as_str).collect();
            return Err(format!(
                "No VM `{name}` in farm.toml\nhint: its VMs are {}",
                known.join(", ")
            ));
        };
        if let Placement::Vm(_) = vm.placement {
            let top = top_level_of(topology, name);
            return Err(format!(
                "VM `{name}` runs inside `{top}`: its state is part of `{top}`'s\nhint: `farm snapshot save NAME {top}` saves it with the VMs beside it"
            ));
        }
    }
    let mut selection = Selection {
        top: Vec::new(),
        inside: Vec::new(),
    };
    for vm in topology.vms.values() {
        let top = top_level_of(topology, &vm.name);
        if !names.is_empty() && !names.iter().any(|n| n == top) {
            continue;
        }
        match &vm.placement {
            Placement::Host(host) => {
                if !topology.backend_on(&vm.placement).is_qemu() {
                    return Err(format!(
                        "VM `{}` is a libvirt domain on `{host}`: snapshots hold VMs of farm's qemu backend only\nhint: name the other VMs (`farm snapshot save NAME VM…`); VMs inside a hypervisor VM may run under libvirt, its state holds them",
                        vm.name
                    ));
                }
                selection.top.push(vm.name.clone());
            }
            Placement::Vm(_) => selection.inside.push(vm.name.clone()),
        }
    }
    if selection.top.is_empty() {
        return Err("farm.toml declares no VM to snapshot".into());
    }
    Ok(selection)
}

/// What a snapshot of `vms` must be restored into: each one's name, placement, platform
/// and target. Memory, ports and the like are in the saved records and come back with
/// them; VMs outside the snapshot may change freely.
pub fn topology_digest<'a>(
    topology: &Topology,
    vms: impl IntoIterator<Item = &'a String>,
) -> String {
    let wanted: std::collections::BTreeSet<&String> = vms.into_iter().collect();
    let mut hasher = blake3::Hasher::new_derive_key("farm 2026 snapshot topology");
    for name in &wanted {
        let Some(vm) = topology.vms.get(*name) else {
            hasher.update(format!("{name}\0missing\n").as_bytes());
            continue;
        };
        let placement = match &vm.placement {
            Placement::Host(h) => format!("host:{h}"),
            Placement::Vm(v) => format!("vm:{v}"),
        };
        hasher.update(
            format!("{}\0{placement}\0{}\0{}\n", vm.name, vm.platform, vm.target).as_bytes(),
        );
    }
    format!("blake3-{}", hasher.finalize().to_hex())
}

/// Why `manifest` cannot be restored here, if it cannot.
pub fn refusal(manifest: &SnapshotManifest, topology: &str, qemu: &str) -> Option<String> {
    if manifest.format != SNAPSHOT_FORMAT {
        return Some(format!(
            "Snapshot `{}` has format {}, this farm reads format {SNAPSHOT_FORMAT}\nhint: save it again with this farm",
            manifest.name, manifest.format
        ));
    }
    if manifest.topology != topology {
        return Some(format!(
            "Snapshot `{}` was saved from another topology (its VMs, where they run, or their platforms differ from farm.toml's)\nhint: restore it with the farm.toml it was saved from, or save a new one",
            manifest.name
        ));
    }
    if manifest.qemu != qemu {
        return Some(format!(
            "Snapshot `{}` was saved by `{}`, this machine has `{qemu}`: a machine state loads only into the qemu that wrote it\nhint: save a new snapshot with this qemu",
            manifest.name, manifest.qemu
        ));
    }
    None
}

/// The store root a top-level VM's record was made for: its layer's disk is
/// `<root>/store/<entry>/disk.qcow2`.
fn store_root_of(spec: &InstanceSpec) -> Option<PathBuf> {
    Some(spec.layer.disk.parent()?.parent()?.parent()?.to_path_buf())
}

/// Points a saved top-level VM's record at `store_root` (the same store moved, or another
/// store that received the entries): its layer and boot files. A store moves freely, its
/// entries back onto each other by relative paths.
pub fn relocate_store(spec: &mut InstanceSpec, store_root: &Path) {
    let Some(old) = store_root_of(spec) else {
        return;
    };
    if old == store_root {
        return;
    }
    let moved = |path: &Path| -> PathBuf {
        path.strip_prefix(&old)
            .map_or_else(|_| path.to_path_buf(), |rest| store_root.join(rest))
    };
    spec.layer.disk = moved(&spec.layer.disk);
    if let Some(boot) = &mut spec.boot {
        boot.kernel = moved(&boot.kernel);
        boot.initrd = boot.initrd.as_deref().map(moved);
    }
}

/// The state directory a top-level VM's record was made for (`<state>/vms/<vm>`); a lab
/// restores only into that one, since its processes, inside hypervisor VMs too, carry it
/// as their project's tag.
pub fn state_root_of(spec: &InstanceSpec) -> Option<&Path> {
    spec.paths.dir.parent()?.parent()
}

/// A snapshot name: a file name of letters, digits, `-`, `_` and `.` (not leading).
pub fn valid_name(name: &str) -> Result<(), String> {
    if crate::model::config::limits::is_snapshot_name(name) {
        Ok(())
    } else {
        Err(format!(
            "Invalid snapshot name `{name}`\nhint: use letters, digits, `-`, `_` and `.` (at most 64, not starting with `.`)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> SnapshotManifest {
        SnapshotManifest {
            format: SNAPSHOT_FORMAT,
            name: "booted".into(),
            created: 1,
            topology: "blake3-aa".into(),
            qemu: "QEMU emulator version 7.2.22".into(),
            vms: vec![SavedVm {
                name: "hv".into(),
                entry: "00-snap-hv".into(),
                disk_bytes: 1,
                state_bytes: 2,
                host: None,
                host_qemu: None,
            }],
            inside: vec!["leaf".into()],
        }
    }

    #[test]
    fn a_saved_disk_backs_onto_the_entry_its_overlay_was_made_on() {
        let on = |p: &str| disk_parent("hv", Some(Path::new(p)));
        assert_eq!(on("/s/store/ab-hv/disk.qcow2").unwrap(), "ab-hv");
        assert_eq!(on("../cd-snap-hv/disk.qcow2").unwrap(), "cd-snap-hv");
        for not_an_entry in ["/tmp/other.qcow2", "disk.qcow2", "../disk.qcow2"] {
            let e = on(not_an_entry).unwrap_err();
            assert!(e.contains("`hv`") && e.contains("hint:"), "{e}");
        }
        assert!(disk_parent("hv", None).unwrap_err().contains("nothing"));
    }

    #[test]
    fn another_topology_or_qemu_is_refused_with_a_hint() {
        let m = manifest();
        assert_eq!(refusal(&m, "blake3-aa", &m.qemu.clone()), None);
        let other = refusal(&m, "blake3-bb", &m.qemu.clone()).unwrap();
        assert!(
            other.contains("another topology") && other.contains("hint:"),
            "{other}"
        );
        let qemu = refusal(&m, "blake3-aa", "QEMU emulator version 8.2.0").unwrap();
        assert!(qemu.contains("7.2.22") && qemu.contains("8.2.0"), "{qemu}");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<SnapshotManifest>(&json).unwrap(), m);
    }

    #[test]
    fn entries_are_keyed_by_content_and_name_their_snapshot() {
        let d = entry_derivation("booted", "hv", "aa-layer", "d1", "s1", "t", "q");
        let same = entry_derivation("booted", "hv", "aa-layer", "d1", "s1", "t", "q");
        let other = entry_derivation("booted", "hv", "aa-layer", "d1", "s2", "t", "q");
        assert_eq!(entry_key(&d), entry_key(&same));
        assert_ne!(entry_key(&d), entry_key(&other));
        assert_eq!(snapshot_of(&d), Some("booted"));
        assert_eq!(snapshot_of(&serde_json::json!({"kind": "platform"})), None);
        assert_eq!(entry_name(&"v".repeat(70)).len(), 64);
    }

    #[test]
    fn a_record_moves_with_its_store_but_keeps_its_state_directory() {
        let mut spec = crate::model::lab::instance::tests::spec();
        spec.boot = Some(crate::model::build::qemu::DirectBoot {
            kernel: "/s/store/0101-plain_amd64/boot/vmlinuz".into(),
            initrd: Some("/s/store/0101-plain_amd64/boot/initrd.img".into()),
            cmdline: "console=ttyS0".into(),
        });
        relocate_store(&mut spec, Path::new("/ci/cache"));
        assert_eq!(
            spec.layer.disk,
            Path::new("/ci/cache/store/0101-plain_amd64/disk.qcow2")
        );
        let boot = spec.boot.as_ref().unwrap();
        assert_eq!(
            boot.kernel,
            Path::new("/ci/cache/store/0101-plain_amd64/boot/vmlinuz")
        );
        assert_eq!(
            boot.initrd.as_deref(),
            Some(Path::new(
                "/ci/cache/store/0101-plain_amd64/boot/initrd.img"
            ))
        );
        assert_eq!(state_root_of(&spec), Some(Path::new("/p/.farm")));
    }

    fn lab(extra: &str) -> Topology {
        let text = format!(
            r#"
[images.tiny]
tiny = true
[targets.amd64]
arch = "x86_64"
[platforms.plain]
from = "tiny"
[hosts.here]
[vms.alpha]
platform = "plain"
host = "here"
[vms.hyper]
platform = "plain"
host = "here"
[vms.inner]
platform = "plain"
host = "hyper"
[vms.deep]
platform = "plain"
host = "inner"
{extra}"#
        );
        let map = crate::config::SourceMap::new(vec![crate::config::SourceFile {
            path: PathBuf::from("/p/farm.toml"),
            text,
        }]);
        crate::config::parse_sources(&map, &[crate::config::SourceKind::Main], None)
            .unwrap_or_else(|d| panic!("{}", map.render_all(&d)))
            .1
    }

    #[test]
    fn a_selection_is_top_level_vms_with_everything_inside_them() {
        let topology = lab("");
        let all = selection(&topology, &[]).unwrap();
        assert_eq!(all.top, ["alpha", "hyper"]);
        assert_eq!(all.inside, ["deep", "inner"]);
        let part = selection(&topology, &["hyper".into()]).unwrap();
        assert_eq!(part.top, ["hyper"]);
        assert_eq!(part.inside, ["deep", "inner"]);
        assert_eq!(top_level_of(&topology, "deep"), "hyper");
        let inner = selection(&topology, &["deep".into()]).unwrap_err();
        assert!(
            inner.contains("runs inside `hyper`") && inner.contains("save NAME hyper"),
            "{inner}"
        );
        let unknown = selection(&topology, &["nope".into()]).unwrap_err();
        assert!(
            unknown.contains("No VM `nope`") && unknown.contains("alpha, deep"),
            "{unknown}"
        );
    }

    #[test]
    fn the_digest_covers_the_saved_vms_only() {
        let topology = lab("");
        let part = selection(&topology, &["hyper".into()]).unwrap();
        let before = topology_digest(&topology, part.all());
        let whole = topology_digest(&topology, topology.vms.keys());
        // Another VM beside the snapshot's changes nothing; one of its own does.
        let more = lab("[vms.gamma]\nplatform = \"plain\"\n");
        assert_eq!(topology_digest(&more, part.all()), before);
        assert_ne!(topology_digest(&more, more.vms.keys()), whole);
        let mut without = topology.clone();
        without.vms.remove("deep");
        assert_ne!(topology_digest(&without, part.all()), before);
    }

    #[test]
    fn remote_vms_are_selected_and_libvirt_domains_refused() {
        let topology = lab(
            "[hosts.far]\naddress = \"root@192.0.2.1\"\n[vms.away]\nplatform = \"plain\"\nhost = \"far\"\n",
        );
        assert_eq!(
            selection(&topology, &[]).unwrap().top,
            ["alpha", "away", "hyper"]
        );
        let libvirt = lab(
            "[hosts.virt]\nbackend = \"libvirt\"\n[vms.domain]\nplatform = \"plain\"\nhost = \"virt\"\n",
        );
        let refused = selection(&libvirt, &[]).unwrap_err();
        assert!(
            refused.contains("libvirt domain on `virt`") && refused.contains("hint:"),
            "{refused}"
        );
        assert_eq!(
            selection(&libvirt, &["alpha".into()]).unwrap().top,
            ["alpha"]
        );
    }

    #[test]
    fn names_are_file_names() {
        assert!(valid_name("booted-1.2_x").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(valid_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths_live_under_the_state_directory() {
        let p = SnapshotPaths::new(Path::new("/lab/.farm"), "booted");
        assert_eq!(
            p.manifest(),
            Path::new("/lab/.farm/snapshots/booted/snapshot.json")
        );
    }
}
