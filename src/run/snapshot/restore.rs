//! `farm snapshot restore`: refusals first, then each saved VM started from its entry, and
//! every VM at every level waited for. `plan_restore` finds what it would do, for
//! `--dry-run`, and changes nothing.

use super::*;
use crate::model::build::boot_watch::BootRules;
use crate::model::build::qemu_img::QemuImg;
use crate::model::lab::instance::InstanceSpec;
use crate::model::shell::quote_path;
use crate::run::boot::SiteVm;
use crate::run::host::qmp_over_ssh;
use crate::run::state::StatePaths;
use crate::sys::boot_wait::{self, BootError, SshRoute, Unobserved};
use crate::sys::ssh::Ssh;

/// Stops the snapshot's VMs that run (their state is discarded: qemu is told to quit at
/// once) and starts them again from snapshot `name`, until every VM answers ssh.
pub fn restore(
    project: &Project,
    state_root: &Path,
    name: &str,
    reporter: &Reporter,
) -> Result<SnapshotManifest, SnapshotError> {
    valid_name(name).map_err(SnapshotError::Refused)?;
    let state = StateDir::open(state_root)?;
    let store = Store::open(&project.store_dir).map_err(store_error)?;
    let (manifest, vms) = checked(project, &state, &state.own_ssh_config(), Some(&store), name)?;
    // What runs of the snapshot's VMs goes (refused about before anything stops); the
    // VMs outside it run on.
    let records = state.records();
    for vm in &vms {
        if let Some(record) = records.get(&vm.name) {
            quit(&*vm.host, &record.spec, &vm.name)?;
        }
    }
    load(project, &state, &store, &manifest, &vms, reporter)?;
    Ok(manifest)
}

/// What `restore` would do, found as it finds it (every refusal included), with nothing
/// changed: for `farm snapshot restore --dry-run`.
#[derive(Debug)]
pub struct RestorePlan {
    pub snapshot: String,
    /// The snapshot's top-level VMs, in its order.
    pub vms: Vec<RestoreVm>,
}

/// One top-level VM of a restore.
#[derive(Debug)]
pub struct RestoreVm {
    pub name: String,
    /// The host it runs on, and is started on.
    pub host: String,
    /// It runs now: it is stopped, its state discarded, the VMs inside it with it.
    pub running: bool,
    /// The saved disk its new overlay backs onto, on that host.
    pub disk: PathBuf,
    /// The machine state loaded into it, on that host.
    pub state: PathBuf,
    /// The VMs inside it the snapshot holds: they come back with its state, and are
    /// resumed once it answers.
    pub inside: Vec<String>,
}

impl RestorePlan {
    pub fn render(&self) -> String {
        let mut out = format!("restore of snapshot {}:\n", self.snapshot);
        for vm in self.vms.iter().filter(|vm| vm.running) {
            let inside = match vm.inside.is_empty() {
                true => String::new(),
                false => format!(", and {} inside it", vm.inside.join(", ")),
            };
            out.push_str(&format!(
                "  stop {} on host {} (its state is discarded{inside})\n",
                vm.name, vm.host
            ));
        }
        for vm in &self.vms {
            out.push_str(&format!(
                "  start {} on host {}: a new overlay on `{}`, its state loaded from `{}`\n",
                vm.name,
                vm.host,
                vm.disk.display(),
                vm.state.display()
            ));
            if !vm.inside.is_empty() {
                out.push_str(&format!(
                    "  resume {} inside {} (saved in its state)\n",
                    vm.inside.join(", "),
                    vm.name
                ));
            }
        }
        let count: usize = self.vms.iter().map(|vm| 1 + vm.inside.len()).sum();
        out.push_str(&format!("  wait for the {count} VM(s) to answer ssh\n"));
        out
    }
}

/// Finds what `restore` would do without changing anything: the state directory is only
/// read, the store not created, and hosts are reached through the ssh_config that exists
/// (or one rendered in a temporary directory).
pub fn plan_restore(
    project: &Project,
    state_root: &Path,
    name: &str,
) -> Result<RestorePlan, SnapshotError> {
    valid_name(name).map_err(SnapshotError::Refused)?;
    let paths = StatePaths::new(state_root);
    let store = Store::open_existing(&project.store_dir).map_err(store_error)?;
    let (ssh_config, _scratch) = crate::run::lab::dry_run_ssh_config(project, &paths)
        .map_err(|e| SnapshotError::Failed(e.to_string()))?;
    let (manifest, vms) = checked(project, &paths, &ssh_config, store.as_ref(), name)?;
    let entries: BTreeMap<String, crate::store::Entry> =
        entries_of(store.as_ref(), &project.store_dir, &manifest)?
            .into_iter()
            .collect();
    let records = paths.records();
    let topology = &project.loaded.topology;
    let vms = sources(&vms, &entries, &manifest)?
        .into_iter()
        .map(|source| {
            let (vm, host) = (&source.vm.name, &*source.vm.host);
            let running = match records.get(vm) {
                Some(record) => instance::is_running(host, &record.spec.paths, vm)?,
                None => false,
            };
            Ok(RestoreVm {
                name: vm.clone(),
                host: host.name().to_string(),
                running,
                disk: source.disk,
                state: source.state_file,
                inside: manifest
                    .inside
                    .iter()
                    .filter(|inside| top_level_of(topology, inside) == *vm)
                    .cloned()
                    .collect(),
            })
        })
        .collect::<Result<_, SnapshotError>>()?;
    Ok(RestorePlan {
        snapshot: manifest.name,
        vms,
    })
}

/// Snapshot `name`'s manifest and its top-level VMs on their hosts (reached through
/// `ssh_config`), once every refusal is ruled out: another topology, qemu or format,
/// another state directory, a missing entry here or on a remote host. Changes nothing.
fn checked(
    project: &Project,
    state: &StatePaths,
    ssh_config: &Path,
    store: Option<&Store>,
    name: &str,
) -> Result<(SnapshotManifest, Vec<TopVm>), SnapshotError> {
    let manifest = find_manifest(state, store, name)?;
    let entries = entries_of(store, &project.store_dir, &manifest)?;
    let binary = entries
        .first()
        .and_then(|(vm, entry)| read_record(&entry.dir.join(VMS_DIR).join(vm)))
        .map_or("qemu-system-x86_64".to_string(), |r| {
            r.spec.qemu().binary().to_string()
        });
    let here = qemu_version(&local(), &binary).unwrap_or_default();
    let saved = manifest.vms.iter().map(|v| &v.name).chain(&manifest.inside);
    if let Some(why) = refusal(
        &manifest,
        &topology_digest(&project.loaded.topology, saved),
        &here,
    ) {
        return Err(SnapshotError::Refused(why));
    }
    for (vm, entry) in &entries {
        let saved_for = read_record(&entry.dir.join(VMS_DIR).join(vm))
            .and_then(|r| state_root_of(&r.spec).map(Path::to_path_buf));
        if let Some(saved_for) = saved_for.filter(|p| p != state.root()) {
            return Err(SnapshotError::Refused(format!(
                "Snapshot `{name}` was saved by the project whose state directory is `{}`; this one's is `{}`: the lab's processes, inside its hypervisor VMs too, are tagged with that path\nhint: restore it from a project at `{}` (or with `--state {}`)",
                saved_for.display(),
                state.root().display(),
                saved_for.parent().unwrap_or(&saved_for).display(),
                saved_for.display()
            )));
        }
    }
    let topology = &project.loaded.topology;
    let sites = Sites::new(topology, ssh_config);
    let names: Vec<String> = manifest.vms.iter().map(|v| v.name.clone()).collect();
    let vms = top_vms(topology, &sites, &names)?;
    let snapshot_dir = SnapshotPaths::new(state.root(), name).dir;
    for (vm, saved) in vms.iter().zip(&manifest.vms) {
        let Some(remote_store) = &vm.remote_store else {
            continue;
        };
        let record = read_record(&snapshot_dir.join(VMS_DIR).join(&vm.name)).ok_or_else(|| {
            SnapshotError::Refused(format!(
                "Snapshot `{name}` keeps VM `{}`'s records in `{}`, which is gone\nhint: a snapshot of VMs on remote hosts restores from the project that saved it",
                vm.name,
                snapshot_dir.display()
            ))
        })?;
        let there = qemu_version(&*vm.host, record.spec.qemu().binary())?;
        if saved.host_qemu.as_deref().is_some_and(|q| q != there) {
            return Err(SnapshotError::Refused(format!(
                "Snapshot `{name}`'s VM `{}` was saved by `{}`, host `{}` has `{there}` now: a machine state loads only into the qemu that wrote it\nhint: save a new snapshot",
                vm.name,
                saved.host_qemu.as_deref().unwrap_or_default(),
                vm.host.name()
            )));
        }
        if let Some(why) = remote::missing(&*vm.host, remote_store, saved)? {
            return Err(SnapshotError::Refused(format!("{why} (snapshot `{name}`)")));
        }
    }
    Ok((manifest, vms))
}

/// The snapshot's manifest: from the state directory that saved it, or else from its
/// entries in the store (imported or pulled from another machine).
fn find_manifest(
    state: &StatePaths,
    store: Option<&Store>,
    name: &str,
) -> Result<SnapshotManifest, SnapshotError> {
    let path = SnapshotPaths::new(state.root(), name).manifest();
    if let Ok(bytes) = fs_err::read(&path) {
        return parse_manifest(&bytes, &path, name);
    }
    let entries = match store {
        Some(store) => store.entries().map_err(store_error)?,
        None => Vec::new(),
    };
    let latest = latest_entries(&entries, name);
    let found = store
        .zip(latest.first())
        .and_then(|(store, dir)| store.entry_by_dir(dir));
    let Some(entry) = found else {
        return Err(SnapshotError::Refused(format!(
            "No snapshot `{name}`\nhint: `farm snapshot ls` lists them"
        )));
    };
    let path = entry.dir.join(MANIFEST_FILE);
    let bytes = fs_err::read(&path).map_err(io("read", &path))?;
    parse_manifest(&bytes, &path, name)
}

/// Each saved VM's store entry (of this machine's VMs); refused when one is missing (removed by gc with its
/// snapshot, or never imported), or when there is no store (`store_dir` names it).
fn entries_of(
    store: Option<&Store>,
    store_dir: &Path,
    manifest: &SnapshotManifest,
) -> Result<Vec<(String, crate::store::Entry)>, SnapshotError> {
    manifest
        .vms
        .iter()
        .filter(|saved| saved.host.is_none())
        .map(|saved| {
            store
                .and_then(|store| store.entry_by_dir(&saved.entry))
                .map(|e| (saved.name.clone(), e))
                .ok_or_else(|| {
                    SnapshotError::Refused(format!(
                        "Snapshot `{}` needs store entry `{}` (VM `{}`), which `{}` does not have\nhint: `farm store import` or `farm store pull` it, or save the snapshot again",
                        manifest.name,
                        saved.entry,
                        saved.name,
                        store.map_or(store_dir, Store::root).display()
                    ))
                })
        })
        .collect()
}

/// Starts every saved VM from its state on a fresh overlay, and waits for every VM of the
/// snapshot to answer ssh.
pub(super) fn load(
    project: &Project,
    state: &StateDir,
    store: &Store,
    manifest: &SnapshotManifest,
    vms: &[TopVm],
    reporter: &Reporter,
) -> Result<Duration, SnapshotError> {
    let started = Instant::now();
    let topology = &project.loaded.topology;
    let entries: BTreeMap<String, crate::store::Entry> =
        entries_of(Some(store), store.root(), manifest)?
            .into_iter()
            .collect();
    let snapshot_dir = SnapshotPaths::new(state.root(), &manifest.name).dir;
    // The records of each VM and of the VMs inside it: in its entry, or in the snapshot's
    // directory for a VM of a remote host.
    for vm in vms {
        let from = entries
            .get(&vm.name)
            .map_or(snapshot_dir.join(VMS_DIR), |entry| entry.dir.join(VMS_DIR));
        for name in crate::run::state::subdirectories(&from)
            .into_iter()
            .filter(|name| top_level_of(topology, name) == vm.name)
        {
            let dir = state.instance(&name).dir;
            let _ = fs_err::remove_dir_all(&dir);
            copy_vm_dir(&from.join(&name), &dir)?;
            state.stop_shared_connection(&name);
        }
    }
    // The records point at this store (it may have moved, or received the entries).
    for vm in entries.keys() {
        let dir = state.instance(vm).dir;
        if let Some(mut record) = read_record(&dir) {
            relocate_store(&mut record.spec, store.root());
            fs_err::write(dir.join("instance.json"), record.to_json())
                .map_err(io("write", &dir))?;
        }
    }
    crate::run::lab::write_state_ssh_files(project, state, &BTreeMap::new())
        .map_err(|e| SnapshotError::Failed(e.to_string()))?;
    // The networks farm runs on the VMs' hosts, for the VMs that join them.
    let mut sites: BTreeMap<&Placement, &TopVm> = BTreeMap::new();
    for vm in vms {
        if let Some(node) = topology.vms.get(&vm.name) {
            sites.entry(&node.placement).or_insert(vm);
        }
    }
    let project_tag = state.root().display().to_string();
    for (placement, vm) in sites {
        let layout = crate::model::lab::up_plan::SiteLayout::of(
            topology,
            placement,
            state.root(),
            &store.root().join("store"),
        );
        for network in crate::model::config::network::site_networks(
            &project.loaded.config,
            topology,
            placement,
        ) {
            crate::run::vde::ensure_up(&*vm.host, &layout.state_dir, &network, &project_tag)
                .map_err(|e| SnapshotError::Failed(e.to_string()))?;
        }
    }
    let sources = sources(vms, &entries, manifest)?;
    let results = crate::run::parallel::each(&sources, |source| {
        // The state is immutable: a load that failed (qemu died while reading it) is tried
        // once more from scratch before the restore fails.
        start_from_state(state, source).or_else(|first| {
            reporter.warn(format!("{first}\nloading it once more"));
            if let Some(record) = read_record(&state.instance(&source.vm.name).dir) {
                quit(&*source.vm.host, &record.spec, &source.vm.name)?;
            }
            start_from_state(state, source)
        })
    });
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    let loaded = started.elapsed();
    if let Some(entry) = entries.values().next() {
        install_identity(state, &entry.dir.join(IDENTITY_DIR))?;
    }
    // Every VM answers, level by level: the top-level VMs first; each hypervisor VM, once it
    // answers, resumes the VMs inside it (saved paused) over that connection, and they are
    // reached through it (a new login into each hop costs most of a second under TCG).
    let records = state.records();
    let mut levels = vec![manifest.vms.iter().map(|v| v.name.clone()).collect()];
    levels.extend(by_level(topology, &manifest.inside, false));
    let mut sessions: BTreeMap<String, Ssh> = BTreeMap::new();
    for level in &levels {
        let waits: Vec<Wait> = level
            .iter()
            .map(|vm| Wait {
                vm: vm.clone(),
                site: vms
                    .iter()
                    .find(|top| &top.name == vm)
                    .zip(records.get(vm))
                    .map(|(top, record)| (top.host.clone(), record.spec.clone())),
                jump: match topology.vms.get(vm).map(|node| &node.placement) {
                    Some(Placement::Vm(parent)) => sessions.get(parent).map(Ssh::control_socket),
                    _ => None,
                },
                resume: manifest
                    .inside
                    .iter()
                    .filter(|guest| {
                        topology.vms.get(*guest).map(|node| &node.placement)
                            == Some(&Placement::Vm(vm.clone()))
                    })
                    .filter_map(|guest| records.get(guest))
                    .map(|record| record.spec.paths.qmp())
                    .collect(),
            })
            .collect();
        for answered in crate::run::parallel::each(waits, |wait| answer(state, wait)) {
            let (vm, ssh) = answered?;
            sessions.insert(vm, ssh);
        }
    }
    let everyone: Vec<&String> = levels.iter().flatten().collect();
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

/// Makes the snapshot's ssh key pair farm's key in `state`, when it is not already: the
/// restored VMs authorize that key only (a state directory on another machine has its own).
fn install_identity(state: &StateDir, saved: &Path) -> Result<(), SnapshotError> {
    let private = state.identity_file();
    let public = private.with_extension("pub");
    let saved_public = saved.join("id_ed25519.pub");
    let same = match (fs_err::read(&public), fs_err::read(&saved_public)) {
        (Ok(here), Ok(there)) => here == there,
        _ => false,
    };
    if same || !saved_public.exists() {
        return Ok(());
    }
    for (from, to, mode) in [
        (saved.join("id_ed25519"), &private, 0o600),
        (saved_public, &public, 0o644),
    ] {
        let bytes = fs_err::read(&from).map_err(io("read", &from))?;
        let tmp = to.with_extension("snapshot-tmp");
        fs_err::write(&tmp, bytes).map_err(io("write", &tmp))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(io("set permissions of", &tmp))?;
        fs_err::rename(&tmp, to).map_err(io("write", to))?;
    }
    Ok(())
}

/// Where each top-level VM starts from: its entry here (`entries`), or its entry in its
/// remote host's store.
fn sources<'a>(
    vms: &'a [TopVm],
    entries: &BTreeMap<String, crate::store::Entry>,
    manifest: &SnapshotManifest,
) -> Result<Vec<Source<'a>>, SnapshotError> {
    let no_entry = |vm: &TopVm| {
        SnapshotError::Failed(format!(
            "Snapshot `{}` has no entry for VM `{}`",
            manifest.name, vm.name
        ))
    };
    vms.iter()
        .map(|vm| match (entries.get(&vm.name), &vm.remote_store) {
            (Some(entry), _) => Ok(Source {
                vm,
                disk: entry.disk_path(),
                state_file: entry.dir.join(STATE_FILE),
                vm_dir: None,
            }),
            (None, Some(remote_store)) => match manifest.vms.iter().find(|s| s.name == vm.name) {
                Some(saved) => {
                    let dir = remote::entry_dir(remote_store, &saved.entry);
                    Ok(Source {
                        vm,
                        disk: dir.join(crate::store::DISK_FILE),
                        state_file: dir.join(STATE_FILE),
                        vm_dir: Some(dir.join(VMS_DIR).join(&vm.name)),
                    })
                }
                None => Err(no_entry(vm)),
            },
            (None, None) => Err(no_entry(vm)),
        })
        .collect()
}

/// Where a top-level VM starts from: its saved disk and state, on its host.
struct Source<'a> {
    vm: &'a TopVm,
    disk: PathBuf,
    state_file: PathBuf,
    /// On a remote host: the entry's copy of the VM's directory there (seed, firmware
    /// variables), put back before qemu starts.
    vm_dir: Option<PathBuf>,
}

/// One top-level VM: a new overlay on its entry's frozen disk, qemu waiting for the state,
/// the state loaded, the VM running.
fn start_from_state(state: &StateDir, source: &Source<'_>) -> Result<(), SnapshotError> {
    let (vm, host) = (&source.vm.name, &*source.vm.host);
    let record = read_record(&state.instance(vm).dir).ok_or_else(|| {
        SnapshotError::Failed(format!(
            "Snapshot has no record of VM `{vm}` (`{}`)",
            state.instance(vm).dir.display()
        ))
    })?;
    let spec = &record.spec;
    let put_back = source.vm_dir.as_ref().map_or(String::new(), |from| {
        format!(
            "mkdir -p {dir} && cp -rp {from}/. {dir}/ && ",
            dir = quote_path(&spec.paths.dir),
            from = quote_path(from)
        )
    });
    instance::check(
        host,
        vm,
        "Creating the overlay on the snapshot's disk",
        &format!(
            "{put_back}{}",
            QemuImg::CreateOverlay {
                disk: &spec.paths.disk(),
                backing: &source.disk,
                size: None,
            }
            .script()
        ),
    )?;
    let mut qemu = spec.qemu();
    qemu.incoming = true;
    qemu.daemonize = false;
    crate::run::backend::qemu::start_vm(host, spec, &qemu)?;
    let failed = |e: String| {
        let tail = host.tail(&spec.paths.stderr_log(), 5);
        SnapshotError::Failed(format!("Cannot load VM `{vm}`'s saved state: {e}\n{tail}"))
    };
    let load = format!("exec:{}", load_command(&source.state_file));
    with_qmp(host, &spec.paths.qmp(), Duration::from_secs(20), |qmp| {
        qmp.command("migrate-incoming", serde_json::json!({ "uri": load }))
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
                // `io-error`: saved while qemu held it on a full disk; `cont` retries the
                // write.
                Some("paused") | Some("postmigrate") | Some("prelaunch") | Some("io-error") => {
                    qmp.command("cont", serde_json::json!({}))
                        .map_err(|e| failed(e.to_string()))?;
                    return Ok(());
                }
                other => return Err(failed(format!("qemu is {other:?}"))),
            }
        }
    })
    .map_err(|e| match e {
        SnapshotError::Failed(message) if !message.starts_with("Cannot load") => failed(message),
        other => other,
    })
}

/// A restored VM that did not answer ssh.
fn not_answered<E: std::fmt::Display>(vm: &str, error: BootError<E>) -> SnapshotError {
    SnapshotError::Failed(match error {
        BootError::Failed(failure) => failure.render(
            &format!("VM `{vm}`, restored from its snapshot,"),
            &format!("`farm logs {vm}` shows its console"),
        ),
        BootError::Restart(e) => e.to_string(),
    })
}

/// One VM to wait for after a restore.
struct Wait {
    vm: String,
    /// The host a top-level VM runs on, and its spec: its qemu and console are looked at
    /// while it is waited for. A VM inside a hypervisor VM is only waited for over ssh.
    site: Option<(Arc<dyn Host>, InstanceSpec)>,
    /// The control socket of farm's connection to the hypervisor VM it runs in.
    jump: Option<PathBuf>,
    /// The QMP sockets, inside it, of the VMs it runs (saved paused).
    resume: Vec<PathBuf>,
}

/// Waits for a VM to answer ssh (host key pinned), resumes the VMs inside it, then sets
/// its clock, which stood still while it was saved. The connection stays open for the
/// VMs inside it to be reached through.
fn answer(state: &StateDir, wait: Wait) -> Result<(String, Ssh), SnapshotError> {
    let Wait {
        vm,
        site,
        jump,
        resume,
    } = wait;
    let config = state.own_ssh_config();
    let route = SshRoute {
        config: &config,
        alias: &vm,
        jump: jump.as_deref(),
        probe: crate::sys::boot_wait::Probe::SetClock,
    };
    let rules = BootRules {
        timeout: ANSWER_TIMEOUT,
        direct_boot: false,
        kvm_inside_tcg: None,
        may_restart: false,
    };
    let waited = match &site {
        Some((host, spec)) => {
            let mut target = SiteVm {
                host: &**host,
                spec,
            };
            boot_wait::wait_for_ssh(&mut target, route, rules, &mut |_, _| {})
                .map_err(|e| not_answered(&vm, e))
        }
        None => boot_wait::wait_for_ssh(&mut Unobserved, route, rules, &mut |_, _| {})
            .map_err(|e| not_answered(&vm, e)),
    };
    let (ssh, _) = waited?;
    // The guests resume at once, over the one connection (its clock was set as it
    // answered): each is a round trip into a guest that TCG makes slow.
    crate::run::parallel::each(&resume, |socket| {
        qmp_over_ssh(&ssh, socket, "cont").map_err(|e| {
            SnapshotError::Failed(format!(
                "Cannot resume a VM inside `{vm}` (`{}`): {e}",
                socket.display()
            ))
        })
    })
    .into_iter()
    .collect::<Result<(), _>>()?;
    Ok((vm, ssh))
}
