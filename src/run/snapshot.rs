//! Lab snapshots: `farm snapshot save` pauses every top-level VM on this machine (so the lab
//! is consistent across VMs), writes each one's memory and device state to a file through
//! QMP (a hypervisor VM carries its guests, their qemus and networks inside that state),
//! lets qemu quit, and freezes its overlay into the snapshot. `restore` stops what runs,
//! gives each VM a fresh overlay on its frozen disk, starts qemu waiting for the saved state,
//! loads it, and waits for every VM, at every level, to answer ssh with its pinned host key.
//! The snapshot itself is never written again: restoring twice gives two identical starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::model::instance::{InstanceRecord, InstanceSpec};
use crate::model::snapshot::{
    MANIFEST_FILE, SNAPSHOT_FORMAT, STATE_FILE, SavedVm, SnapshotManifest, SnapshotPaths, VMS_DIR,
    entry_derivation, entry_key, entry_name, refusal, snapshot_of, topology_digest, valid_name,
};
use crate::model::topology::{Placement, Topology};
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::host::{Host, LocalHost};
use crate::run::instance::{self, InstanceError};
use crate::run::state::StateDir;
use crate::store::Store;
use crate::sys::qmp::{Qmp, load_command, save_command, wait_for_migration};

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

/// The VMs a snapshot holds: the top-level ones (saved with their state) and those inside
/// them. Refused when a top-level VM is somewhere a snapshot cannot reach yet.
fn lab_vms(topology: &Topology) -> Result<(Vec<String>, Vec<String>), SnapshotError> {
    let mut top = Vec::new();
    let mut inside = Vec::new();
    for vm in topology.vms.values() {
        match &vm.placement {
            Placement::Host(host) => {
                if topology.remote_host(&vm.placement).is_some() {
                    return Err(SnapshotError::Refused(format!(
                        "VM `{}` runs on remote host `{host}`: snapshots hold VMs of this machine only (and the VMs inside them)",
                        vm.name
                    )));
                }
                if !topology.backend_on(&vm.placement).is_qemu() {
                    return Err(SnapshotError::Refused(format!(
                        "VM `{}` is a libvirt domain on `{host}`: snapshots hold VMs of farm's qemu backend only\nhint: VMs inside a hypervisor VM may run under libvirt; its own state holds them",
                        vm.name
                    )));
                }
                top.push(vm.name.clone());
            }
            Placement::Vm(_) => inside.push(vm.name.clone()),
        }
    }
    if top.is_empty() {
        return Err(SnapshotError::Refused(
            "farm.toml declares no VM to snapshot".into(),
        ));
    }
    Ok((top, inside))
}

/// The first line of `binary --version`.
fn qemu_version(binary: &str) -> Result<String, SnapshotError> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(io("run", Path::new(binary)))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
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
        name: crate::model::topology::LOCAL_HOST.to_string(),
    }
}

/// Saves the running lab as `name`; it runs on afterwards from the snapshot (a restore, as
/// the overlays it ran on are now the snapshot's), or stays stopped with `stop`.
pub fn save(
    project: &Project,
    state_root: &Path,
    name: &str,
    stop: bool,
    reporter: &Reporter,
) -> Result<SnapshotManifest, SnapshotError> {
    valid_name(name).map_err(SnapshotError::Refused)?;
    let topology = &project.loaded.topology;
    let (top, inside) = lab_vms(topology)?;
    let state = StateDir::open(state_root)?;
    let paths = SnapshotPaths::new(state.root(), name);
    if paths.dir.exists() {
        return Err(SnapshotError::Refused(format!(
            "Snapshot `{name}` exists\nhint: `farm snapshot rm {name}` first, or choose another name"
        )));
    }
    let records = records_of(&state, &top)?;
    let host = local();
    for (vm, record) in &records {
        if !instance::is_running(&host, &record.spec.paths, vm)? {
            return Err(SnapshotError::Refused(format!(
                "VM `{vm}` is not running\nhint: `farm up` first: a snapshot saves a running lab"
            )));
        }
    }
    let qemu = qemu_version(
        records
            .values()
            .next()
            .map_or("qemu-system-x86_64", |r| r.spec.qemu().binary()),
    )?;
    let store = Store::open(&project.store_dir).map_err(store_error)?;
    check_space(&store, &records)?;
    let scratch = tempfile::Builder::new()
        .prefix("snapshot")
        .tempdir_in(store.root().join("tmp"))
        .map_err(io("create a directory in", &store.root().join("tmp")))?;

    // Every VM is paused before any is saved: the lab is one moment, across VMs.
    let started = Instant::now();
    let mut sessions = Vec::new();
    for (vm, record) in &records {
        let mut qmp = Qmp::connect(&record.spec.paths.qmp(), Duration::from_secs(30))
            .map_err(|e| SnapshotError::Failed(format!("Cannot pause VM `{vm}`: {e}")))?;
        qmp.command("stop", serde_json::json!({}))
            .map_err(|e| SnapshotError::Failed(format!("Cannot pause VM `{vm}`: {e}")))?;
        sessions.push((vm.clone(), qmp));
    }
    reporter.status(
        "paused",
        format!(
            "{} ({:.1} s)",
            top.join(", "),
            started.elapsed().as_secs_f64()
        ),
    );
    let saved: Vec<Result<PathBuf, SnapshotError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sessions
            .iter_mut()
            .map(|(vm, qmp)| {
                let state_file = scratch.path().join(format!("{vm}.{STATE_FILE}"));
                scope.spawn(move || save_state(vm, qmp, &state_file).map(|()| state_file))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(SnapshotError::Failed("a save panicked".into())))
            })
            .collect()
    });
    let state_files: Vec<PathBuf> = match saved.into_iter().collect() {
        Ok(files) => files,
        Err(e) => {
            // Nothing is lost: the VMs run on where they were.
            for (_, qmp) in &mut sessions {
                let _ = qmp.command("cont", serde_json::json!({}));
            }
            return Err(e);
        }
    };
    // qemu quits (its disk caches written out); the overlay is then the state's disk.
    for (vm, record) in &records {
        quit(&host, &record.spec, vm)?;
    }
    drop(sessions);

    // Each top-level VM becomes a store entry on its layer's; the manifest names them all
    // and travels in each.
    let digest = topology_digest(topology);
    let mut staged = Vec::new();
    for ((vm, record), state_file) in records.iter().zip(&state_files) {
        let inside_it: Vec<&String> = inside
            .iter()
            .filter(|v| {
                // The chain starts at the host; the first VM in it is the top-level one.
                topology
                    .chain(v)
                    .iter()
                    .find(|p| matches!(p, Placement::Vm(_)))
                    == Some(&Placement::Vm(vm.clone()))
            })
            .collect();
        staged.push(stage_vm(
            &store,
            &state,
            StageVm {
                snapshot: name,
                vm,
                record,
                state_file,
                inside: &inside_it,
                topology: &digest,
                qemu: &qemu,
            },
        )?);
    }
    let manifest = SnapshotManifest {
        format: SNAPSHOT_FORMAT,
        name: name.to_string(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        topology: digest,
        qemu,
        vms: staged.iter().map(|s| s.saved.clone()).collect(),
        inside,
    };
    let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    for vm in staged {
        fs_err::write(vm.staging.dir().join(MANIFEST_FILE), &json)
            .map_err(io("write", vm.staging.dir()))?;
        store.commit(vm.staging, vm.meta).map_err(store_error)?;
        // The overlay's bytes are in the entry now.
        let _ = fs_err::remove_file(records[&vm.saved.name].spec.paths.disk());
    }
    fs_err::create_dir_all(&paths.dir).map_err(io("create", &paths.dir))?;
    let manifest_path = paths.manifest();
    let tmp = manifest_path.with_extension("tmp");
    fs_err::write(&tmp, &json).map_err(io("write", &tmp))?;
    fs_err::rename(&tmp, &manifest_path).map_err(io("write", &manifest_path))?;
    reporter.status(
        "saved",
        format!(
            "snapshot {name}: {} ({:.1} s)",
            manifest
                .vms
                .iter()
                .map(|v| format!(
                    "{} state {} disk {}",
                    v.name,
                    crate::build::realise::human_bytes(v.state_bytes),
                    crate::build::realise::human_bytes(v.disk_bytes)
                ))
                .collect::<Vec<_>>()
                .join(", "),
            started.elapsed().as_secs_f64()
        ),
    );
    if !stop {
        load(project, &state, &store, &manifest, reporter)?;
    }
    Ok(manifest)
}

/// Refuses a save the store's filesystem has no room for, before anything pauses: each
/// VM's state (compressed, about a quarter of its memory under a booted lab) and a copy of
/// its overlay.
fn check_space(
    store: &Store,
    records: &BTreeMap<String, InstanceRecord>,
) -> Result<(), SnapshotError> {
    let needed: u64 = records
        .values()
        .map(|r| {
            (r.spec.hw.memory_mib << 20) / 4
                + fs_err::metadata(r.spec.paths.disk()).map_or(0, |m| m.len())
        })
        .sum();
    let Some(free) = crate::sys::hostinfo::free_bytes(store.root()) else {
        return Ok(());
    };
    if free < needed {
        return Err(SnapshotError::Refused(format!(
            "Not enough space for the snapshot in `{}`: about {} needed, {} free\nhint: `farm gc` removes what nothing needs, or point FARM_STORE at a larger disk",
            store.root().display(),
            crate::build::realise::human_bytes(needed),
            crate::build::realise::human_bytes(free)
        )));
    }
    Ok(())
}

fn store_error(e: crate::store::StoreError) -> SnapshotError {
    SnapshotError::Failed(e.to_string())
}

/// What one top-level VM's entry is made of.
struct StageVm<'a> {
    snapshot: &'a str,
    vm: &'a str,
    record: &'a InstanceRecord,
    state_file: &'a Path,
    inside: &'a [&'a String],
    topology: &'a str,
    qemu: &'a str,
}

/// A saved VM's entry, staged and ready to commit.
struct StagedVm {
    saved: SavedVm,
    staging: crate::store::Staging,
    meta: crate::store::EntryMeta,
}

/// Stages a top-level VM's entry: a copy of its overlay backing onto its layer's entry (the
/// original stays until the entry is committed: a failure loses nothing), its state, and
/// the local directories of it and the VMs inside it.
fn stage_vm(store: &Store, state: &StateDir, v: StageVm<'_>) -> Result<StagedVm, SnapshotError> {
    let started = Instant::now();
    let spec = &v.record.spec;
    let layer = &spec.layer.entry;
    let (disk_hash, _) = crate::store::fsutil::hash_file(&spec.paths.disk())
        .map_err(io("read", &spec.paths.disk()))?;
    let (state_hash, state_bytes) =
        crate::store::fsutil::hash_file(v.state_file).map_err(io("read", v.state_file))?;
    let derivation = entry_derivation(
        v.snapshot,
        v.vm,
        layer,
        &disk_hash.to_hex(),
        &state_hash.to_hex(),
        v.topology,
        v.qemu,
    );
    let key = entry_key(&derivation);
    let label = entry_name(v.vm);
    let lock = store.lock(&key).map_err(store_error)?;
    let staging = store.stage(&lock, &label).map_err(store_error)?;
    let disk = staging.disk_path();
    let copy = std::process::Command::new("cp")
        .args(["--reflink=auto", "--sparse=always"])
        .arg(spec.paths.disk())
        .arg(&disk)
        .status()
        .map_err(io("copy", &spec.paths.disk()))?;
    if !copy.success() {
        return Err(SnapshotError::Failed(format!(
            "Cannot copy `{}` into the store",
            spec.paths.disk().display()
        )));
    }
    let parent = store.entry_by_dir(layer).ok_or_else(|| {
        SnapshotError::Failed(format!(
            "VM `{}` runs on store entry `{layer}`, which is not in `{}`\nhint: `farm store verify`",
            v.vm,
            store.root().display()
        ))
    })?;
    crate::sys::qemu_img::rebase_unsafe(&disk, &crate::store::relative_backing(&parent))
        .map_err(|e| SnapshotError::Failed(e.to_string()))?;
    fs_err::rename(v.state_file, staging.dir().join(STATE_FILE))
        .map_err(io("move", v.state_file))?;
    for vm in std::iter::once(&v.vm.to_string()).chain(v.inside.iter().copied()) {
        copy_vm_dir(
            &state.instance(vm).dir,
            &staging.dir().join(VMS_DIR).join(vm),
        )?;
    }
    let (output, size) = staging.hash_disk().map_err(store_error)?;
    let meta = crate::store::EntryMeta {
        layout: 0,
        name: label,
        drv_hash: key,
        derivation,
        output_blake3: output,
        size,
        parent: Some(layer.clone()),
        built_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        build_seconds: started.elapsed().as_secs_f64(),
        disk_mtime_ns: None,
        files: Default::default(),
        meta_blake3: None,
    };
    Ok(StagedVm {
        saved: SavedVm {
            name: v.vm.to_string(),
            entry: crate::store::entry_dir_name(&key, &meta.name),
            disk_bytes: size,
            state_bytes,
        },
        staging,
        meta,
    })
}

/// Writes one paused VM's machine state to `state_file`.
fn save_state(vm: &str, qmp: &mut Qmp, state_file: &Path) -> Result<(), SnapshotError> {
    let failed = |e: String| SnapshotError::Failed(format!("Cannot save VM `{vm}`: {e}"));
    qmp.command(
        "migrate-set-parameters",
        serde_json::json!({ "max-bandwidth": 64u64 << 30 }),
    )
    .map_err(|e| failed(e.to_string()))?;
    qmp.command(
        "migrate",
        serde_json::json!({ "uri": format!("exec:{}", save_command(state_file)) }),
    )
    .map_err(|e| failed(migration_hint(&e.to_string())))?;
    wait_for_migration(qmp, "query-migrate", MIGRATION_TIMEOUT)
        .map_err(|e| failed(migration_hint(&e)))
}

/// qemu names the device that blocks a migration; farm adds what to do about it.
fn migration_hint(message: &str) -> String {
    if message.contains("migration blocker") || message.contains("not migratable") {
        format!("{message}\nhint: a device of this VM cannot be saved (qemu names it above)")
    } else {
        message.to_string()
    }
}

/// Tells qemu to quit and waits for it (killed after 10 s).
fn quit(host: &dyn Host, spec: &InstanceSpec, vm: &str) -> Result<(), SnapshotError> {
    instance::stop(host, &spec.paths, vm, Duration::ZERO, None)?;
    Ok(())
}

/// Copies a VM's local directory, without its running qemu's files (and the overlay, moved
/// into the snapshot separately).
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

/// Stops the lab that runs (its state is discarded: qemu is told to quit at once) and
/// starts it again from snapshot `name`; the time until every VM answers ssh.
pub fn restore(
    project: &Project,
    state_root: &Path,
    name: &str,
    reporter: &Reporter,
) -> Result<Duration, SnapshotError> {
    valid_name(name).map_err(SnapshotError::Refused)?;
    let state = StateDir::open(state_root)?;
    let store = Store::open(&project.store_dir).map_err(store_error)?;
    let manifest = find_manifest(&state, &store, name)?;
    let (top, _) = lab_vms(&project.loaded.topology)?;
    let entries = entries_of(&store, &manifest)?;
    let binary = entries
        .first()
        .and_then(|(vm, entry)| read_record(&entry.dir.join(VMS_DIR).join(vm)))
        .map_or("qemu-system-x86_64", |r| r.spec.qemu().binary());
    let here = qemu_version(binary)?;
    if let Some(why) = refusal(&manifest, &topology_digest(&project.loaded.topology), &here) {
        return Err(SnapshotError::Refused(why));
    }
    // What runs goes (refused about before anything stops).
    let host = local();
    for (vm, record) in state
        .records()
        .into_iter()
        .filter(|(vm, _)| top.contains(vm))
    {
        quit(&host, &record.spec, &vm)?;
    }
    load(project, &state, &store, &manifest, reporter)
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

/// The snapshot's manifest: from the state directory that saved it, or else from its
/// entries in the store (imported or pulled from another machine).
fn find_manifest(
    state: &StateDir,
    store: &Store,
    name: &str,
) -> Result<SnapshotManifest, SnapshotError> {
    let path = SnapshotPaths::new(state.root(), name).manifest();
    if let Ok(bytes) = fs_err::read(&path) {
        return parse_manifest(&bytes, &path, name);
    }
    let mut found: Vec<crate::store::Entry> = store
        .entries()
        .map_err(store_error)?
        .into_iter()
        .filter(|e| snapshot_of(&e.meta.derivation) == Some(name))
        .collect();
    found.sort_by_key(|e| std::cmp::Reverse(e.meta.built_at_unix));
    let Some(entry) = found.first() else {
        return Err(SnapshotError::Refused(format!(
            "No snapshot `{name}`\nhint: `farm snapshot ls` lists them"
        )));
    };
    let path = entry.dir.join(MANIFEST_FILE);
    let bytes = fs_err::read(&path).map_err(io("read", &path))?;
    parse_manifest(&bytes, &path, name)
}

/// Each saved VM's store entry; refused when one is missing (removed by gc with its
/// snapshot, or never imported).
fn entries_of(
    store: &Store,
    manifest: &SnapshotManifest,
) -> Result<Vec<(String, crate::store::Entry)>, SnapshotError> {
    manifest
        .vms
        .iter()
        .map(|saved| {
            store
                .entry_by_dir(&saved.entry)
                .map(|e| (saved.name.clone(), e))
                .ok_or_else(|| {
                    SnapshotError::Refused(format!(
                        "Snapshot `{}` needs store entry `{}` (VM `{}`), which `{}` does not have\nhint: `farm store import` or `farm store pull` it, or save the snapshot again",
                        manifest.name,
                        saved.entry,
                        saved.name,
                        store.root().display()
                    ))
                })
        })
        .collect()
}

/// Starts every saved VM from its state on a fresh overlay, and waits for every VM of the
/// snapshot to answer ssh.
fn load(
    project: &Project,
    state: &StateDir,
    store: &Store,
    manifest: &SnapshotManifest,
    reporter: &Reporter,
) -> Result<Duration, SnapshotError> {
    let started = Instant::now();
    let host = local();
    let entries = entries_of(store, manifest)?;
    for (_, entry) in &entries {
        for vm in list_dirs(&entry.dir.join(VMS_DIR)) {
            let dir = state.instance(&vm).dir;
            let _ = fs_err::remove_dir_all(&dir);
            copy_vm_dir(&entry.dir.join(VMS_DIR).join(&vm), &dir)?;
        }
    }
    // The networks farm runs on this machine, for the VMs that join them.
    let topology = &project.loaded.topology;
    let project_tag = state.root().display().to_string();
    for placement in topology.hosts.keys().map(|h| Placement::Host(h.clone())) {
        for network in
            crate::model::network::site_networks(&project.loaded.config, topology, &placement)
        {
            crate::run::vde::ensure_up(&host, state.root(), &network, &project_tag)
                .map_err(|e| SnapshotError::Failed(e.to_string()))?;
        }
    }
    let results: Vec<Result<(), SnapshotError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = entries
            .iter()
            .map(|(vm, entry)| {
                let host = &host;
                scope.spawn(move || {
                    // The state is immutable: a load that failed (qemu died while reading
                    // it) is tried once more from scratch before the restore fails.
                    start_from_state(host, state, entry, vm).or_else(|first| {
                        reporter.warn(format!("{first}\nloading it once more"));
                        if let Some(record) = read_record(&state.instance(vm).dir) {
                            quit(host, &record.spec, vm)?;
                        }
                        start_from_state(host, state, entry, vm)
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(SnapshotError::Failed("a restore panicked".into())))
            })
            .collect()
    });
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    let loaded = started.elapsed();
    crate::run::up::write_state_ssh_files(project, state, &BTreeMap::new())
        .map_err(|e| SnapshotError::Failed(e.to_string()))?;
    let everyone: Vec<&String> = manifest
        .vms
        .iter()
        .map(|v| &v.name)
        .chain(&manifest.inside)
        .collect();
    let answered: Vec<Result<(), SnapshotError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = everyone
            .iter()
            .map(|vm| scope.spawn(move || answer(state, vm)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(SnapshotError::Failed("a wait panicked".into())))
            })
            .collect()
    });
    answered.into_iter().collect::<Result<Vec<()>, _>>()?;
    let took = started.elapsed();
    reporter.status(
        "restored",
        format!(
            "snapshot {}: states loaded in {:.1} s, {} VM(s) answering ssh after {:.1} s",
            manifest.name,
            loaded.as_secs_f64(),
            everyone.len(),
            took.as_secs_f64()
        ),
    );
    Ok(took)
}

/// One top-level VM: a new overlay on its entry's frozen disk, qemu waiting for the state,
/// the state loaded, the VM running.
fn start_from_state(
    host: &dyn Host,
    state: &StateDir,
    entry: &crate::store::Entry,
    vm: &str,
) -> Result<(), SnapshotError> {
    let record = read_record(&state.instance(vm).dir).ok_or_else(|| {
        SnapshotError::Failed(format!(
            "Store entry `{}` has no record of VM `{vm}`",
            entry.dir.display()
        ))
    })?;
    let spec = &record.spec;
    instance::check(
        host,
        vm,
        "Creating the overlay on the snapshot's disk",
        &format!(
            "qemu-img create -q -f qcow2 -F qcow2 -b {} {}",
            crate::sys::ssh::shell_quote(&entry.disk_path().display().to_string()),
            crate::sys::ssh::shell_quote(&spec.paths.disk().display().to_string()),
        ),
    )?;
    let mut qemu = spec.qemu();
    qemu.incoming = true;
    qemu.daemonize = false;
    instance::start_qemu_vm(host, spec, &qemu)?;
    let failed = |e: String| {
        SnapshotError::Failed(format!(
            "Cannot load VM `{vm}`'s saved state: {e}\n{}",
            crate::sys::hostinfo::tail(&spec.paths.stderr_log(), 5)
        ))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut qmp = loop {
        match Qmp::connect(&spec.paths.qmp(), Duration::from_secs(60)) {
            Ok(qmp) => break qmp,
            Err(e) if Instant::now() > deadline => return Err(failed(e.to_string())),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    qmp.command(
        "migrate-incoming",
        serde_json::json!({ "uri": format!("exec:{}", load_command(&entry.dir.join(STATE_FILE))) }),
    )
    .map_err(|e| failed(e.to_string()))?;
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let status = qmp
            .command("query-status", serde_json::json!({}))
            .map_err(|e| failed(e.to_string()))?;
        match status["status"].as_str() {
            Some("inmigrate") if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Some("running") => return Ok(()),
            Some("paused") | Some("postmigrate") | Some("prelaunch") => {
                qmp.command("cont", serde_json::json!({}))
                    .map_err(|e| failed(e.to_string()))?;
                return Ok(());
            }
            other => return Err(failed(format!("qemu is {other:?}"))),
        }
    }
}

/// Waits for `vm` to answer ssh (host key pinned), then sets its clock, which stood still
/// while it was saved.
fn answer(state: &StateDir, vm: &str) -> Result<(), SnapshotError> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let ssh = crate::sys::ssh::Ssh::wait_for(&state.ssh_config(), vm, deadline, || Ok(()))
        .map_err(|e| {
            SnapshotError::Failed(format!(
                "VM `{vm}` did not answer ssh after its snapshot was restored: {e}\nhint: `farm logs {vm}` shows its console"
            ))
        })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let _ = ssh.run(&format!("date -u -s @{now} >/dev/null 2>&1"), None);
    Ok(())
}

/// The snapshots of this state directory, oldest first.
pub fn list(state_root: &Path) -> Vec<SnapshotManifest> {
    let mut found: Vec<SnapshotManifest> = list_dirs(&state_root.join("snapshots"))
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

/// The store entries of the snapshots of `state_root`, with their snapshot's name: gc roots
/// while the snapshot exists (their closure keeps the layers they back onto).
pub fn saved_entries(state_root: &Path) -> Vec<(String, String)> {
    list(state_root)
        .into_iter()
        .flat_map(|m| {
            m.vms
                .into_iter()
                .map(move |v| (m.name.clone(), v.entry))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Removes snapshot `name` (its entries go with the next `farm gc`). Refused while a
/// running VM's overlay backs onto it.
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
    let store_dir = project.store_dir.join("store");
    for (vm, record) in state.records() {
        let backing = crate::store::qcow2::read_info(&record.spec.paths.disk())
            .ok()
            .flatten()
            .and_then(|info| info.backing);
        let on_it = backing.is_some_and(|b| {
            manifest
                .vms
                .iter()
                .any(|v| Path::new(&b).starts_with(store_dir.join(&v.entry)))
        });
        if on_it && instance::is_running(&host, &record.spec.paths, &vm)? {
            return Err(SnapshotError::Refused(format!(
                "VM `{vm}` runs on snapshot `{name}`'s disk\nhint: `farm down` first, or restore another snapshot"
            )));
        }
    }
    fs_err::remove_dir_all(&paths.dir).map_err(io("remove", &paths.dir))
}

/// Names of the directories in `dir`, sorted; none when it does not exist.
fn list_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs_err::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
