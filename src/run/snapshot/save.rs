//! `farm snapshot save`: pause, save each top-level VM's state, commit it as a store entry.

use super::remote;
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
    let sites = Sites::new(topology, &state.own_ssh_config());
    let vms = top_vms(topology, &sites, &top)?;
    for vm in &vms {
        if !instance::is_running(&*vm.host, &records[&vm.name].spec.paths, &vm.name)? {
            return Err(SnapshotError::Refused(format!(
                "VM `{}` is not running\nhint: `farm up` first: a snapshot saves a running lab",
                vm.name
            )));
        }
    }
    // The qemu of each host that saves a state: only it can load the state again.
    let mut qemus: BTreeMap<String, String> = BTreeMap::new();
    for vm in &vms {
        if let std::collections::btree_map::Entry::Vacant(slot) =
            qemus.entry(vm.host.name().to_string())
        {
            let binary = records[&vm.name].spec.qemu().binary().to_string();
            slot.insert(qemu_version(&*vm.host, &binary)?);
        }
    }
    let local_qemu = match vms.iter().find(|vm| vm.remote_store.is_none()) {
        Some(vm) => qemus[vm.host.name()].clone(),
        None => qemu_version(&local(), "qemu-system-x86_64").unwrap_or_default(),
    };
    let store = Store::open(&project.store_dir).map_err(store_error)?;
    check_space(&store, &vms, &records)?;
    let scratch = tempfile::Builder::new()
        .prefix("snapshot")
        .tempdir_in(store.root().join("tmp"))
        .map_err(io("create a directory in", &store.root().join("tmp")))?;
    let state_file = |vm: &TopVm| match &vm.remote_store {
        Some(remote_store) => remote::state_file(remote_store, name, &vm.name),
        None => scratch.path().join(format!("{}.{STATE_FILE}", vm.name)),
    };

    let started = Instant::now();
    let pidfiles: Vec<PathBuf> = vms
        .iter()
        .map(|vm| records[&vm.name].spec.paths.pidfile())
        .collect();
    let top_qemus: Vec<free_memory::TopQemu<'_>> = vms
        .iter()
        .zip(&pidfiles)
        .map(|(vm, pidfile)| free_memory::TopQemu {
            name: &vm.name,
            host: &vm.host,
            pidfile,
        })
        .collect();
    let freed_kib = free_memory::free_before_save(
        &state.own_ssh_config(),
        topology,
        &top_qemus,
        &by_level(topology, &inside, false),
        &state.records(),
    );
    reporter.status(
        "freed",
        format!(
            "{} of page cache in the guests ({:.1} s)",
            crate::model::text::human_bytes(freed_kib * 1024),
            started.elapsed().as_secs_f64()
        ),
    );

    // Every VM is paused before any is saved: the lab is one moment, across VMs and hosts.
    // The VMs inside hypervisor VMs go first, deepest first (see `tell_inside`).
    let started = Instant::now();
    for level in by_level(topology, &inside, true) {
        tell_inside(project, &state, &level, "stop")?;
    }
    let resume = |paused: &[&TopVm]| {
        for vm in paused {
            let socket = records[&vm.name].spec.paths.qmp();
            let _ = with_qmp(&*vm.host, &socket, Duration::ZERO, |qmp| {
                qmp.command("cont", serde_json::json!({}))
                    .map_err(|e| SnapshotError::Failed(e.to_string()))
            });
        }
        for level in by_level(topology, &inside, false) {
            let _ = tell_inside(project, &state, &level, "cont");
        }
    };
    let mut paused = Vec::new();
    for vm in &vms {
        let socket = records[&vm.name].spec.paths.qmp();
        let stopped = with_qmp(&*vm.host, &socket, Duration::ZERO, |qmp| {
            crate::sys::qmp::pause_for_migration(qmp, MIGRATION_TIMEOUT)
                .map_err(SnapshotError::Failed)
        });
        if let Err(e) = stopped {
            resume(&paused);
            return Err(SnapshotError::Failed(format!(
                "Cannot pause VM `{}`: {e}",
                vm.name
            )));
        }
        paused.push(vm);
    }
    reporter.status(
        "paused",
        format!(
            "{} ({:.1} s)",
            top.join(", "),
            started.elapsed().as_secs_f64()
        ),
    );
    let saved = crate::run::parallel::each(&vms, |vm| {
        let socket = records[&vm.name].spec.paths.qmp();
        with_qmp(&*vm.host, &socket, Duration::ZERO, |qmp| {
            save_state(&vm.name, qmp, &state_file(vm))
        })
    });
    if let Some(Err(e)) = saved.into_iter().find(Result::is_err) {
        // Nothing is lost: the VMs run on where they were.
        resume(&paused);
        return Err(e);
    }
    // Each top-level VM becomes a store entry on the one its overlay backs onto (its layer's,
    // or the snapshot's it was restored from), in its host's store; the
    // manifest names them all and travels in each. They are staged while their qemu still
    // holds them paused: a finished migration has flushed and handed over the disks, so
    // the overlays no longer change, and a staging that fails (a disk that filled up since
    // the space was checked) leaves VMs that run on where they were.
    let digest = topology_digest(topology, top.iter().chain(&inside));
    let staging = || -> Result<(Vec<StagedVm>, Vec<remote::RemoteStaged>), SnapshotError> {
        let mut staged = Vec::new();
        let mut staged_remote = Vec::new();
        for vm in &vms {
            let record = &records[&vm.name];
            let inside_it: Vec<&String> = inside
                .iter()
                .filter(|v| top_level_of(topology, v) == vm.name)
                .collect();
            let stage = StageVm {
                snapshot: name,
                vm: &vm.name,
                record,
                state_file: &state_file(vm),
                inside: &inside_it,
                topology: &digest,
                qemu: &qemus[vm.host.name()],
            };
            match &vm.remote_store {
                None => staged.push(stage_vm(&store, &state, stage)?),
                Some(remote_store) => {
                    // Its records stay on this machine, in the snapshot's directory.
                    for v in std::iter::once(&vm.name).chain(inside_it.iter().copied()) {
                        copy_vm_dir(&state.instance(v).dir, &paths.dir.join(VMS_DIR).join(v))?;
                    }
                    staged_remote.push(remote::stage(
                        &vm.host,
                        remote_store,
                        &state_file(vm),
                        stage,
                    )?);
                }
            }
        }
        Ok((staged, staged_remote))
    };
    let (staged, staged_remote) = match staging() {
        Ok(staged) => staged,
        Err(e) => {
            // The snapshot's directory did not exist before this save.
            let _ = fs_err::remove_dir_all(&paths.dir);
            resume(&paused);
            return Err(e);
        }
    };
    let mut manifest = SnapshotManifest {
        format: SNAPSHOT_FORMAT,
        name: name.to_string(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        topology: digest,
        qemu: local_qemu,
        vms: staged
            .iter()
            .map(|s| s.saved.clone())
            .chain(staged_remote.iter().map(|s| s.saved.clone()))
            .collect(),
        inside: inside.clone(),
    };
    manifest.vms.sort_by(|a, b| a.name.cmp(&b.name));
    let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    // The snapshot is committed while the VMs are still paused, and only then do they quit:
    // a save killed before its manifest is written leaves VMs that `farm up` resumes (and
    // entries nothing names, for `gc`); one killed after it leaves a snapshot that restores.
    if let Err(e) = commit(&store, &paths, staged, staged_remote, &json) {
        let _ = fs_err::remove_dir_all(&paths.dir);
        resume(&paused);
        return Err(e);
    }
    // qemu quits; each overlay's bytes are in its entry now.
    for vm in &vms {
        let disk = records[&vm.name].spec.paths.disk();
        quit(&*vm.host, &records[&vm.name].spec, &vm.name)?;
        let _ = vm
            .host
            .run(&format!("rm -f {}", crate::model::shell::quote_path(&disk)));
    }
    reporter.status(
        "saved",
        format!(
            "snapshot {name}: {} ({:.1} s)",
            manifest
                .vms
                .iter()
                .map(|v| format!(
                    "{}{} state {} disk {}",
                    v.name,
                    v.host
                        .as_ref()
                        .map(|h| format!(" (on {h})"))
                        .unwrap_or_default(),
                    crate::model::text::human_bytes(v.state_bytes),
                    crate::model::text::human_bytes(v.disk_bytes)
                ))
                .collect::<Vec<_>>()
                .join(", "),
            started.elapsed().as_secs_f64()
        ),
    );
    if !stop {
        super::restore::load(project, &state, &store, &manifest, &vms, reporter)?;
    }
    Ok(manifest)
}

/// Commits the staged entries (each with the manifest `json` inside), in this machine's
/// store and remote hosts', then writes the snapshot's manifest: the snapshot exists once
/// that file does.
fn commit(
    store: &Store,
    paths: &SnapshotPaths,
    staged: Vec<StagedVm>,
    staged_remote: Vec<remote::RemoteStaged>,
    json: &[u8],
) -> Result<(), SnapshotError> {
    for vm in staged {
        fs_err::write(vm.staging.dir().join(MANIFEST_FILE), json)
            .map_err(io("write", vm.staging.dir()))?;
        store.commit(vm.staging, vm.meta).map_err(store_error)?;
    }
    for vm in staged_remote {
        vm.commit(json)?;
    }
    fs_err::create_dir_all(&paths.dir).map_err(io("create", &paths.dir))?;
    let manifest_path = paths.manifest();
    let tmp = manifest_path.with_extension("tmp");
    fs_err::write(&tmp, json).map_err(io("write", &tmp))?;
    fs_err::rename(&tmp, &manifest_path).map_err(io("write", &manifest_path))
}

/// Refuses a save a store's filesystem has no room for (this machine's, or a remote
/// host's for its VMs), before anything pauses: each VM's state (compressed, about a
/// quarter of its memory under a booted lab) and a copy of its overlay.
fn check_space(
    store: &Store,
    vms: &[TopVm],
    records: &BTreeMap<String, InstanceRecord>,
) -> Result<(), SnapshotError> {
    let needed = |vm: &TopVm| {
        let spec = &records[&vm.name].spec;
        let overlay = match &vm.remote_store {
            None => fs_err::metadata(spec.paths.disk()).map_or(0, |m| m.len()),
            // Overlays on a remote host: most are small, the state dominates.
            Some(_) => 0,
        };
        (spec.hw.memory_mib << 20) / 4 + overlay
    };
    let local: u64 = vms
        .iter()
        .filter(|vm| vm.remote_store.is_none())
        .map(needed)
        .sum();
    crate::sys::space::ensure(store.root(), local, "the snapshot")
        .map_err(|short| SnapshotError::Refused(short.to_string()))?;
    let short = |place: String, needed: u64, free: u64| {
        SnapshotError::Refused(format!(
            "Not enough space for the snapshot in {place}: about {} needed, {} free\nhint: `farm gc` removes what nothing needs, or point FARM_STORE at a larger disk",
            crate::model::text::human_bytes(needed),
            crate::model::text::human_bytes(free)
        ))
    };
    for vm in vms {
        if let Some(remote_store) = &vm.remote_store {
            let free = remote::prepare(&*vm.host, remote_store, &vm.name)?;
            if free < needed(vm) {
                return Err(short(
                    format!(
                        "`{}` on host `{}`",
                        remote_store.root.display(),
                        vm.host.name()
                    ),
                    needed(vm),
                    free,
                ));
            }
        }
    }
    Ok(())
}

/// A saved VM's entry, staged and ready to commit.
struct StagedVm {
    saved: SavedVm,
    staging: crate::store::Staging,
    meta: crate::store::EntryMeta,
}

/// Stages a top-level VM's entry: a copy of its overlay backing onto the entry the overlay
/// was made on, its layer's or a snapshot's (`disk_parent`; the
/// original stays until the entry is committed: a failure loses nothing), its state, and
/// the local directories of it and the VMs inside it.
fn stage_vm(store: &Store, state: &StateDir, v: StageVm<'_>) -> Result<StagedVm, SnapshotError> {
    let started = Instant::now();
    let spec = &v.record.spec;
    let backing = crate::store::qcow2::read_info(&spec.paths.disk())
        .map_err(io("read", &spec.paths.disk()))?
        .and_then(|info| info.backing);
    let parent_dir =
        disk_parent(v.vm, backing.as_deref().map(Path::new)).map_err(SnapshotError::Failed)?;
    let (disk_hash, _) = crate::store::fsutil::hash_file(&spec.paths.disk())
        .map_err(io("read", &spec.paths.disk()))?;
    let (state_hash, state_bytes) =
        crate::store::fsutil::hash_file(v.state_file).map_err(io("read", v.state_file))?;
    let derivation = entry_derivation(
        v.snapshot,
        v.vm,
        &parent_dir,
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
    let parent = store.entry_by_dir(&parent_dir).ok_or_else(|| {
        SnapshotError::Failed(format!(
            "VM `{}` runs on store entry `{parent_dir}`, which is not in `{}`\nhint: `farm store verify`",
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
    let meta = entry_meta(label, key, derivation, (output, size), &parent_dir, started);
    Ok(StagedVm {
        saved: SavedVm {
            name: v.vm.to_string(),
            entry: crate::store::entry_dir_name(&key, &meta.name),
            disk_bytes: size,
            state_bytes,
            host: None,
            host_qemu: None,
        },
        staging,
        meta,
    })
}

/// Writes one paused VM's machine state to `state_file` (zstd), through QMP; a device that
/// cannot migrate fails it with qemu's name for the device.
pub fn save_state(vm: &str, qmp: &mut Qmp, state_file: &Path) -> Result<(), SnapshotError> {
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
    wait_for_migration(qmp, "query-migrate", MIGRATION_TIMEOUT).map_err(|e| {
        // qemu sees only a broken pipe when the state's disk fills up.
        match crate::sys::space::full_at(state_file) {
            Some(full) => failed(format!("{e}\n{full}")),
            None => failed(migration_hint(&e)),
        }
    })
}

/// qemu names the device that blocks a migration; farm adds what to do about it.
fn migration_hint(message: &str) -> String {
    let blocked = [
        "migration blocker",
        "not migratable",
        "non-migratable",
        "blocked by",
    ]
    .iter()
    .any(|sign| message.contains(sign));
    if blocked {
        format!(
            "{message}\nhint: a device of this VM cannot be saved (qemu names it above): leave that VM out (`farm snapshot save NAME VM…` naming the others) or remove the device"
        )
    } else {
        message.to_string()
    }
}
