//! `farm snapshot save`: pause, save each top-level VM's state, commit it as a store entry.

use super::*;

/// Saves the running lab as `name` (the top-level VMs in `vms` and the VMs inside them, or
/// the whole lab when `vms` is empty); it runs on afterwards from the snapshot (a restore,
/// as the overlays it ran on are now the snapshot's), or stays stopped with `stop`.
pub fn save(
    project: &Project,
    state_root: &Path,
    name: &str,
    vms: &[String],
    stop: bool,
    reporter: &Reporter,
) -> Result<SnapshotManifest, SnapshotError> {
    valid_name(name).map_err(SnapshotError::Refused)?;
    let topology = &project.loaded.topology;
    let Selection { top, inside } = selection(topology, vms).map_err(SnapshotError::Refused)?;
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

    // Every VM is paused before any is saved: the lab is one moment, across VMs. The VMs
    // inside hypervisor VMs go first, deepest first (see `tell_inside`).
    let started = Instant::now();
    for level in by_level(topology, &inside, true) {
        tell_inside(project, &state, &level, "stop")?;
    }
    let resume_inside = || {
        for level in by_level(topology, &inside, false) {
            let _ = tell_inside(project, &state, &level, "cont");
        }
    };
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
    let saved = crate::run::parallel::each(sessions.iter_mut(), |(vm, qmp)| {
        let state_file = scratch.path().join(format!("{vm}.{STATE_FILE}"));
        save_state(vm, qmp, &state_file).map(|()| state_file)
    });
    let state_files: Vec<PathBuf> = match saved.into_iter().collect() {
        Ok(files) => files,
        Err(e) => {
            // Nothing is lost: the VMs run on where they were.
            for (_, qmp) in &mut sessions {
                let _ = qmp.command("cont", serde_json::json!({}));
            }
            resume_inside();
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
    let digest = topology_digest(topology, top.iter().chain(&inside));
    let mut staged = Vec::new();
    for ((vm, record), state_file) in records.iter().zip(&state_files) {
        let inside_it: Vec<&String> = inside
            .iter()
            .filter(|v| top_level_of(topology, v) == vm)
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
        super::restore::load(project, &state, &store, &manifest, reporter)?;
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
    let identity = staging.dir().join(IDENTITY_DIR);
    fs_err::create_dir_all(&identity).map_err(io("create", &identity))?;
    for key in [
        state.identity_file(),
        state.identity_file().with_extension("pub"),
    ] {
        if let Some(file) = key.file_name() {
            fs_err::copy(&key, identity.join(file)).map_err(io("copy", &key))?;
        }
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
