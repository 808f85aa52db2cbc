//! Lab snapshots: `farm snapshot save` (`save`) pauses every top-level VM on this machine,
//! or those named (so the lab is consistent across VMs), writes each one's memory and device state through
//! QMP (a hypervisor VM carries its guests, their qemus and networks inside that state),
//! lets qemu quit, and commits each VM as a store entry on its layer's: frozen overlay,
//! state, the records and keys it needs. `restore` starts every VM again from its entry on
//! a fresh overlay and waits for every VM, at every level, to answer ssh with its pinned
//! host key. An entry is never written again: restoring twice gives two identical starts.

pub(crate) mod free_memory;
mod remote;
mod restore;
mod save;

pub use restore::{RestorePlan, RestoreVm, plan_restore, restore};
pub use save::{save, save_state};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::config::topology::{Placement, Topology};
use crate::model::lab::instance::{InstanceRecord, InstanceSpec};
use crate::model::lab::snapshot::{
    IDENTITY_DIR, MANIFEST_FILE, SNAPSHOT_FORMAT, STATE_FILE, SavedVm, Selection, SnapshotManifest,
    SnapshotPaths, VMS_DIR, disk_parent, entry_derivation, entry_key, entry_name, refusal,
    relocate_store, selection, snapshot_of, state_root_of, top_level_of, topology_digest,
    valid_name,
};
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::closure::HostStore;
use crate::run::host::{Host, LocalHost};
use crate::run::instance::{self, InstanceError};
use crate::run::site::Sites;
use crate::run::state::StateDir;
use crate::store::Store;
use crate::sys::qmp::{Qmp, load_command, save_command, wait_for_migration};

/// What one top-level VM's entry is made of, saved here (`save`) or on its remote host
/// (`remote`).
struct StageVm<'a> {
    snapshot: &'a str,
    vm: &'a str,
    record: &'a InstanceRecord,
    state_file: &'a Path,
    inside: &'a [&'a String],
    topology: &'a str,
    qemu: &'a str,
}

/// How long saving or loading one VM's state may take (a 2 GiB L1 under TCG takes seconds).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
/// How long every VM has to answer ssh after its state is loaded.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Refused before anything changed (exit 2).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    State(#[from] crate::run::state::StateError),
    #[error(transparent)]
    Host(#[from] crate::run::host::HostError),
    #[error("Cannot {what} `{}`: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// `vms` (inside hypervisor VMs) by level: deepest first to pause them, shallowest first to
/// resume them.
fn by_level(topology: &Topology, vms: &[String], deepest_first: bool) -> Vec<Vec<String>> {
    let mut levels: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for vm in vms {
        if let Some(node) = topology.vms.get(vm) {
            levels.entry(node.level).or_default().push(vm.clone());
        }
    }
    let mut ordered: Vec<Vec<String>> = levels.into_values().collect();
    if deepest_first {
        ordered.reverse();
    }
    ordered
}

/// Sends `command` (`stop` or `cont`) to the qemu of each VM in `vms`, through the site it
/// runs on (its hypervisor VM, over farm's ssh connection). A hypervisor VM's state is
/// saved with its guests paused: a vCPU caught running a nested guest would be saved in
/// a state qemu refuses to load ("vCPU set in guest-mode inconsistent with migrated kernel
/// nested state").
fn tell_inside(
    project: &Project,
    state: &StateDir,
    vms: &[String],
    command: &str,
) -> Result<(), SnapshotError> {
    let topology = &project.loaded.topology;
    let sites = crate::run::site::Sites::new(topology, &state.own_ssh_config());
    let records = state.records();
    for vm in vms {
        let (Some(node), Some(record)) = (topology.vms.get(vm), records.get(vm)) else {
            continue;
        };
        let host = sites
            .connect(&node.placement)
            .map_err(|e| SnapshotError::Failed(e.to_string()))?;
        host.qmp(&record.spec.paths.qmp(), command)?;
    }
    Ok(())
}

/// The first line of `binary --version` on `host`.
fn qemu_version(host: &dyn Host, binary: &str) -> Result<String, SnapshotError> {
    let out = host.run(&format!("{binary} --version"))?;
    if !out.success() {
        return Err(SnapshotError::Failed(format!(
            "Cannot run `{binary} --version` on host `{}`: {}",
            host.name(),
            out.said().trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// A top-level VM of a snapshot and the host it runs on: this machine, or a remote host
/// whose own store keeps its saved disk and state.
struct TopVm {
    name: String,
    host: Arc<dyn Host>,
    /// farm's store on the remote host; `None` on this machine.
    remote_store: Option<HostStore>,
}

/// The hosts the top-level VMs `names` run on, connected through `sites`.
fn top_vms(
    topology: &Topology,
    sites: &Sites<'_>,
    names: &[String],
) -> Result<Vec<TopVm>, SnapshotError> {
    names
        .iter()
        .map(|name| {
            let placement = topology
                .vms
                .get(name)
                .map(|node| node.placement.clone())
                .ok_or_else(|| SnapshotError::Refused(format!("No VM `{name}` in farm.toml")))?;
            let host = sites
                .connect(&placement)
                .map_err(|e| SnapshotError::Failed(e.to_string()))?;
            let remote_store = topology
                .remote_host(&placement)
                .map(|remote| HostStore::under(&remote.root));
            Ok(TopVm {
                name: name.clone(),
                host,
                remote_store,
            })
        })
        .collect()
}

/// `run::host::with_qmp`, its errors the snapshot's.
fn with_qmp<T>(
    host: &dyn Host,
    socket: &Path,
    connect_for: Duration,
    work: impl FnOnce(&mut Qmp) -> Result<T, SnapshotError>,
) -> Result<T, SnapshotError> {
    crate::run::host::with_qmp(host, socket, connect_for, work, SnapshotError::Failed)
}

fn records_of(
    state: &StateDir,
    names: &[String],
) -> Result<BTreeMap<String, InstanceRecord>, SnapshotError> {
    let records = state.records();
    names
        .iter()
        .map(|name| {
            records
                .get(name)
                .cloned()
                .map(|r| (name.clone(), r))
                .ok_or_else(|| {
                    SnapshotError::Refused(format!(
                        "VM `{name}` has never been brought up\nhint: `farm up` first"
                    ))
                })
        })
        .collect()
}

fn local() -> LocalHost {
    LocalHost {
        name: crate::model::config::topology::LOCAL_HOST.to_string(),
    }
}

fn store_error(e: crate::store::StoreError) -> SnapshotError {
    SnapshotError::Failed(e.to_string())
}

/// The metadata of a saved VM's entry on its layer's: its disk's hash and size, `started`
/// when the entry began to be staged.
fn entry_meta(
    label: String,
    key: crate::model::hash::DrvHash,
    derivation: serde_json::Value,
    (output, size): (crate::model::hash::ContentHash, u64),
    layer: &str,
    started: Instant,
) -> crate::store::EntryMeta {
    crate::store::EntryMeta::made_now(
        label,
        key,
        derivation,
        (output, size),
        Some(layer.to_string()),
        started,
    )
}

/// Tells qemu to quit and waits for it (killed after 10 s).
fn quit(host: &dyn Host, spec: &InstanceSpec, vm: &str) -> Result<(), SnapshotError> {
    crate::run::backend::qemu::stop(host, &spec.paths, vm, Duration::ZERO, None)?;
    Ok(())
}

/// Copies a VM's local directory, without its running qemu's files and its overlay (a
/// saved VM's overlay goes into its store entry as the entry's disk).
fn copy_vm_dir(from: &Path, to: &Path) -> Result<(), SnapshotError> {
    fs_err::create_dir_all(to).map_err(io("create", to))?;
    let Ok(entries) = fs_err::read_dir(from) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let skip = matches!(
            name.to_str(),
            Some("disk.qcow2" | "qemu.pid" | "qmp.sock" | "qemu.stderr" | "serial.log")
        );
        if skip || !entry.path().is_file() {
            continue;
        }
        fs_err::copy(entry.path(), to.join(&name)).map_err(io("copy", &entry.path()))?;
    }
    Ok(())
}

fn read_record(dir: &Path) -> Option<InstanceRecord> {
    let bytes = fs_err::read(dir.join("instance.json")).ok()?;
    InstanceRecord::parse(&bytes).ok()
}

fn parse_manifest(
    bytes: &[u8],
    path: &Path,
    name: &str,
) -> Result<SnapshotManifest, SnapshotError> {
    serde_json::from_slice(bytes).map_err(|e| {
        SnapshotError::Failed(format!(
            "Snapshot `{name}` is damaged (`{}`: {e})",
            path.display()
        ))
    })
}

/// The snapshots of this state directory, oldest first.
pub fn list(state_root: &Path) -> Vec<SnapshotManifest> {
    let mut found: Vec<SnapshotManifest> =
        crate::run::state::subdirectories(&state_root.join("snapshots"))
            .into_iter()
            .filter_map(|name| {
                let path = SnapshotPaths::new(state_root, &name).manifest();
                let bytes = fs_err::read(&path).ok()?;
                parse_manifest(&bytes, &path, &name).ok()
            })
            .collect();
    found.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
    found
}

/// The entries of the latest snapshot saved as `name` in this store (a name saved again,
/// after `rm`, leaves older entries until gc): those its newest manifest lists.
pub fn latest_entries(entries: &[crate::store::Entry], name: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|e| snapshot_of(&e.meta.derivation) == Some(name))
        .filter_map(|e| {
            let path = e.dir.join(MANIFEST_FILE);
            parse_manifest(&fs_err::read(&path).ok()?, &path, name).ok()
        })
        .max_by_key(|m| m.created)
        .map(|m| {
            m.vms
                .into_iter()
                .filter(|v| v.host.is_none())
                .map(|v| v.entry)
                .collect()
        })
        .unwrap_or_default()
}

/// The entries of snapshot `name`: those the manifest in `state_root` lists when the
/// project saved one of that name, since several labs on one store may each have a `base`
/// (their L1s even share a name); else the latest of that name in the store.
pub fn entries_of(
    state_root: Option<&Path>,
    entries: &[crate::store::Entry],
    name: &str,
) -> Vec<String> {
    let own = state_root.and_then(|root| {
        let path = SnapshotPaths::new(root, name).manifest();
        parse_manifest(&fs_err::read(&path).ok()?, &path, name).ok()
    });
    match own {
        Some(manifest) => manifest
            .vms
            .into_iter()
            .filter(|v| v.host.is_none())
            .map(|v| v.entry)
            .filter(|dir| entries.iter().any(|e| e.dir_name() == dir))
            .collect(),
        None => latest_entries(entries, name),
    }
}

/// What a binary cache is told about snapshot `name` (unsigned): its entries
/// ([`entries_of`]), and its `up` key when it is farm's `converged` of `state_root`. `None`
/// when there is no snapshot of that name.
pub fn cache_record(
    entries: &[crate::store::Entry],
    state_root: Option<&Path>,
    name: &str,
) -> Option<crate::model::build::cache_record::SnapshotRecord> {
    let dirs = entries_of(state_root, entries, name);
    let saved: Vec<&crate::store::Entry> = dirs
        .iter()
        .filter_map(|dir| entries.iter().find(|e| e.dir_name() == dir))
        .collect();
    let first = saved.first()?;
    let path = first.dir.join(MANIFEST_FILE);
    let manifest = parse_manifest(&fs_err::read(&path).ok()?, &path, name).ok()?;
    // The state directory's key is this snapshot's only if its manifest is the same save.
    let converged_key = state_root.and_then(|root| {
        let paths = SnapshotPaths::new(root, name);
        let here = parse_manifest(
            &fs_err::read(paths.manifest()).ok()?,
            &paths.manifest(),
            name,
        )
        .ok()?;
        (here.created == manifest.created)
            .then(|| {
                fs_err::read_to_string(paths.dir.join(crate::model::lab::converged::KEY_FILE))
            })?
            .ok()
            .map(|key| key.trim().to_string())
    });
    Some(crate::model::build::cache_record::SnapshotRecord {
        format: crate::model::build::cache_record::CACHE_FORMAT,
        name: name.to_string(),
        created: manifest.created,
        entries: saved.iter().map(|e| e.meta.drv_hash).collect(),
        vms: manifest
            .vms
            .iter()
            .map(|v| v.name.clone())
            .chain(manifest.inside.iter().cloned())
            .collect(),
        converged_key,
        signatures: Vec::new(),
    })
}

/// Makes snapshot `record`, whose entries this store now holds (pulled from a cache), one
/// of `state_root`'s: its manifest, and its `up` key when it is `converged`, so `up` and
/// `farm test` start from it as if it had been saved here. A snapshot of that name saved
/// here is replaced.
pub fn adopt(
    store: &Store,
    state_root: &Path,
    record: &crate::model::build::cache_record::SnapshotRecord,
) -> Result<(), SnapshotError> {
    let entries = store.entries().map_err(store_error)?;
    let entry = entries
        .into_iter()
        .find(|e| record.entries.contains(&e.meta.drv_hash))
        .ok_or_else(|| {
            SnapshotError::Refused(format!(
                "Snapshot `{}` has no entry in this store\nhint: `farm store pull URL {}` brings them",
                record.name, record.name
            ))
        })?;
    let from = entry.dir.join(MANIFEST_FILE);
    let manifest = fs_err::read(&from).map_err(io("read", &from))?;
    let paths = SnapshotPaths::new(state_root, &record.name);
    let write = |path: &Path, bytes: &[u8]| {
        crate::sys::files::replace_file(path, bytes, 0o644).map_err(io("write", path))
    };
    let key = paths.dir.join(crate::model::lab::converged::KEY_FILE);
    let _ = fs_err::remove_file(&key);
    write(&paths.manifest(), &manifest)?;
    if let Some(converged_key) = &record.converged_key {
        write(&key, format!("{converged_key}\n").as_bytes())?;
    }
    Ok(())
}

/// The layers the VMs inside a saved VM boot on, by entry directory: a store that restores
/// the snapshot needs them for `farm up` to see those VMs as they are (their layers are in
/// the hypervisor's disk too, but farm plans from its own store).
pub fn layers_inside(entry: &crate::store::Entry) -> Vec<String> {
    let mut layers: Vec<String> = crate::run::state::subdirectories(&entry.dir.join(VMS_DIR))
        .into_iter()
        .filter_map(|vm| read_record(&entry.dir.join(VMS_DIR).join(vm)))
        .map(|r| r.spec.layer.entry)
        .filter(|layer| Some(layer) != entry.meta.parent.as_ref())
        .collect();
    layers.sort();
    layers.dedup();
    layers
}

/// The store entries of the snapshots of `state_root`, with their snapshot's name: gc roots
/// while the snapshot exists (their closure keeps the layers they back onto).
pub fn saved_entries(state_root: &Path, store: &Store) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for manifest in list(state_root) {
        for saved in manifest.vms.into_iter().filter(|v| v.host.is_none()) {
            if let Some(entry) = store.entry_by_dir(&saved.entry) {
                for layer in layers_inside(&entry) {
                    found.push((manifest.name.clone(), layer));
                }
            }
            found.push((manifest.name.clone(), saved.entry));
        }
    }
    found
}

/// Removes snapshot `name` (its entries here go with the next `farm gc`, those on remote
/// hosts at once). Refused while a running VM's overlay backs onto it.
pub fn remove(project: &Project, state_root: &Path, name: &str) -> Result<(), SnapshotError> {
    valid_name(name).map_err(SnapshotError::Refused)?;
    let state = StateDir::open(state_root)?;
    let paths = SnapshotPaths::new(state.root(), name);
    let bytes = fs_err::read(paths.manifest()).map_err(|_| {
        SnapshotError::Refused(format!(
            "No snapshot `{name}`\nhint: `farm snapshot ls` lists them"
        ))
    })?;
    let manifest = parse_manifest(&bytes, &paths.manifest(), name)?;
    let host = local();
    // Both sides resolved: farm.toml's directory may be `.`, the store named through `..`
    // or a symbolic link, and an overlay names its backing file as it was made.
    let store_dir = project.store_dir.join("store");
    let store_dir = fs_err::canonicalize(&store_dir).unwrap_or(store_dir);
    let records = state.records();
    for (vm, record) in &records {
        let backing = crate::store::qcow2::read_info(&record.spec.paths.disk())
            .ok()
            .flatten()
            .and_then(|info| info.backing)
            .and_then(|b| fs_err::canonicalize(b).ok());
        let on_it = backing.is_some_and(|b| {
            manifest
                .vms
                .iter()
                .any(|v| b.starts_with(store_dir.join(&v.entry)))
        });
        if on_it && instance::is_running(&host, &record.spec.paths, vm)? {
            return Err(in_use(vm, name));
        }
    }
    // The entries of VMs on remote hosts go now: no gc there knows the snapshot.
    let remote: Vec<&SavedVm> = manifest.vms.iter().filter(|v| v.host.is_some()).collect();
    if !remote.is_empty() {
        let topology = &project.loaded.topology;
        let sites = Sites::new(topology, &state.own_ssh_config());
        let names: Vec<String> = remote.iter().map(|v| v.name.clone()).collect();
        let vms = top_vms(topology, &sites, &names)?;
        for (vm, saved) in vms.iter().zip(&remote) {
            if let Some(record) = records.get(&vm.name)
                && remote::in_use(&*vm.host, saved, &record.spec)?
            {
                return Err(in_use(&vm.name, name));
            }
        }
        for (vm, saved) in vms.iter().zip(&remote) {
            if let Some(remote_store) = &vm.remote_store {
                remote::remove(&*vm.host, remote_store, saved)?;
            }
        }
    }
    fs_err::remove_dir_all(&paths.dir).map_err(io("remove", &paths.dir))
}

fn in_use(vm: &str, snapshot: &str) -> SnapshotError {
    SnapshotError::Refused(format!(
        "VM `{vm}` runs on snapshot `{snapshot}`'s disk\nhint: `farm down` first, or restore another snapshot"
    ))
}
