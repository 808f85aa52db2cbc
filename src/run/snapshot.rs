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
    SNAPSHOT_FORMAT, SavedVm, SnapshotManifest, SnapshotPaths, refusal, topology_digest, valid_name,
};
use crate::model::topology::{Placement, Topology};
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::host::{Host, LocalHost};
use crate::run::instance::{self, InstanceError};
use crate::run::state::StateDir;
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
    let partial = paths.dir.with_extension("partial");
    let _ = fs_err::remove_dir_all(&partial);
    fs_err::create_dir_all(partial.join("disks")).map_err(io("create", &partial))?;
    let staged = SnapshotPaths {
        dir: partial.clone(),
    };

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
    let saved: Vec<Result<SavedVm, SnapshotError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sessions
            .iter_mut()
            .map(|(vm, qmp)| {
                let state_file = staged.state(vm);
                scope.spawn(move || save_state(vm, qmp, &state_file))
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
    let saved: Vec<SavedVm> = match saved.into_iter().collect() {
        Ok(saved) => saved,
        Err(e) => {
            // Nothing is lost: the VMs run on where they were.
            for (_, qmp) in &mut sessions {
                let _ = qmp.command("cont", serde_json::json!({}));
            }
            let _ = fs_err::remove_dir_all(&partial);
            return Err(e);
        }
    };
    // qemu quits (its disk caches written out); the overlay is then the state's disk.
    for (vm, record) in &records {
        quit(&host, &record.spec, vm)?;
    }
    drop(sessions);
    let mut vms = Vec::new();
    for mut saved_vm in saved {
        let disk = records[&saved_vm.name].spec.paths.disk();
        let frozen = staged.disk(&saved_vm.name);
        fs_err::rename(&disk, &frozen).map_err(io("move", &disk))?;
        saved_vm.disk_bytes = fs_err::metadata(&frozen).map_or(0, |m| m.len());
        vms.push(saved_vm);
    }
    for vm in top.iter().chain(&inside) {
        copy_vm_dir(&state.instance(vm).dir, &staged.vm_dir(vm))?;
    }
    let manifest = SnapshotManifest {
        format: SNAPSHOT_FORMAT,
        name: name.to_string(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        topology: topology_digest(topology),
        qemu,
        vms,
        inside,
    };
    let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    fs_err::write(staged.manifest(), json).map_err(io("write", &staged.manifest()))?;
    let _ = crate::store::fsutil::fsync_dir(&partial);
    fs_err::rename(&partial, &paths.dir).map_err(io("name", &paths.dir))?;
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
        load(project, &state, &paths, &manifest, reporter)?;
    }
    Ok(manifest)
}

/// Writes one paused VM's machine state to `state_file`.
fn save_state(vm: &str, qmp: &mut Qmp, state_file: &Path) -> Result<SavedVm, SnapshotError> {
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
        .map_err(|e| failed(migration_hint(&e)))?;
    Ok(SavedVm {
        name: vm.to_string(),
        disk_bytes: 0,
        state_bytes: fs_err::metadata(state_file).map_or(0, |m| m.len()),
    })
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
    let paths = SnapshotPaths::new(state.root(), name);
    let manifest = read_manifest(&paths, name)?;
    let (top, _) = lab_vms(&project.loaded.topology)?;
    let host = local();
    // What runs goes first (and is refused about before anything stops).
    let running: Vec<(String, InstanceRecord)> = state
        .records()
        .into_iter()
        .filter(|(vm, _)| top.contains(vm))
        .collect();
    let binary = manifest
        .vms
        .first()
        .and_then(|v| read_record(&paths.vm_dir(&v.name)))
        .map_or("qemu-system-x86_64", |r| r.spec.qemu().binary());
    let here = qemu_version(binary)?;
    if let Some(why) = refusal(&manifest, &topology_digest(&project.loaded.topology), &here) {
        return Err(SnapshotError::Refused(why));
    }
    for (vm, record) in &running {
        quit(&host, &record.spec, vm)?;
    }
    load(project, &state, &paths, &manifest, reporter)
}

fn read_record(dir: &Path) -> Option<InstanceRecord> {
    let bytes = fs_err::read(dir.join("instance.json")).ok()?;
    InstanceRecord::parse(&bytes).ok()
}

fn read_manifest(paths: &SnapshotPaths, name: &str) -> Result<SnapshotManifest, SnapshotError> {
    let bytes = fs_err::read(paths.manifest()).map_err(|_| {
        SnapshotError::Refused(format!(
            "No snapshot `{name}`\nhint: `farm snapshot ls` lists them"
        ))
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        SnapshotError::Failed(format!(
            "Snapshot `{name}` is damaged (`{}`: {e})",
            paths.manifest().display()
        ))
    })
}

/// Starts every saved VM from its state on a fresh overlay, and waits for every VM of the
/// snapshot to answer ssh.
fn load(
    project: &Project,
    state: &StateDir,
    paths: &SnapshotPaths,
    manifest: &SnapshotManifest,
    reporter: &Reporter,
) -> Result<Duration, SnapshotError> {
    let started = Instant::now();
    let host = local();
    for vm in manifest.vms.iter().map(|v| &v.name).chain(&manifest.inside) {
        let dir = state.instance(vm).dir;
        let _ = fs_err::remove_dir_all(&dir);
        copy_vm_dir(&paths.vm_dir(vm), &dir)?;
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
        let handles: Vec<_> = manifest
            .vms
            .iter()
            .map(|saved| {
                let host = &host;
                scope.spawn(move || start_from_state(host, state, paths, &saved.name))
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

/// One top-level VM: a new overlay on its frozen disk, qemu waiting for the state, the
/// state loaded, the VM running.
fn start_from_state(
    host: &dyn Host,
    state: &StateDir,
    paths: &SnapshotPaths,
    vm: &str,
) -> Result<(), SnapshotError> {
    let record = read_record(&state.instance(vm).dir).ok_or_else(|| {
        SnapshotError::Failed(format!(
            "Snapshot `{}` has no record of VM `{vm}`",
            paths.dir.display()
        ))
    })?;
    let spec = &record.spec;
    let frozen = paths.disk(vm);
    instance::check(
        host,
        vm,
        "Creating the overlay on the snapshot's disk",
        &format!(
            "qemu-img create -q -f qcow2 -F qcow2 -b {} {}",
            crate::sys::ssh::shell_quote(&frozen.display().to_string()),
            crate::sys::ssh::shell_quote(&spec.paths.disk().display().to_string()),
        ),
    )?;
    let mut qemu = spec.qemu();
    qemu.incoming = true;
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
        serde_json::json!({ "uri": format!("exec:{}", load_command(&paths.state(vm))) }),
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
    let dir = state_root.join("snapshots");
    let mut found: Vec<SnapshotManifest> = fs_err::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let paths = SnapshotPaths::new(state_root, &name);
                    read_manifest(&paths, &name).ok()
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
    found
}

/// Every VM record kept in the snapshots of `state_root`, with its snapshot's name: the
/// layers they name are gc roots while the snapshot exists.
pub fn saved_records(state_root: &Path) -> Vec<(String, InstanceRecord)> {
    list(state_root)
        .into_iter()
        .flat_map(|manifest| {
            let paths = SnapshotPaths::new(state_root, &manifest.name);
            manifest
                .vms
                .iter()
                .filter_map(|v| read_record(&paths.vm_dir(&v.name)))
                .map(|r| (manifest.name.clone(), r))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Removes snapshot `name`. A lab restored from it must not run on it: refused then.
pub fn remove(state_root: &Path, name: &str) -> Result<(), SnapshotError> {
    valid_name(name).map_err(SnapshotError::Refused)?;
    let state = StateDir::open(state_root)?;
    let paths = SnapshotPaths::new(state.root(), name);
    read_manifest(&paths, name)?;
    let host = local();
    for (vm, record) in state.records() {
        let backing = crate::store::qcow2::read_info(&record.spec.paths.disk())
            .ok()
            .flatten()
            .and_then(|info| info.backing);
        if backing.is_some_and(|b| Path::new(&b).starts_with(&paths.dir))
            && instance::is_running(&host, &record.spec.paths, &vm)?
        {
            return Err(SnapshotError::Refused(format!(
                "VM `{vm}` runs on snapshot `{name}`'s disk\nhint: `farm down` first, or restore another snapshot"
            )));
        }
    }
    fs_err::remove_dir_all(&paths.dir).map_err(io("remove", &paths.dir))
}
