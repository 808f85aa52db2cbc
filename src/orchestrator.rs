//! Applying `farm up` and `farm down`: build what is missing, compare what farm.toml wants
//! with what runs (`model::instance::plan_up`), then start, restart or replace VMs — a
//! level's VMs in parallel — and wait until each answers ssh through the generated
//! ssh_config, the same file users get.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::builder::BootFiles;
use crate::host::{Host, LocalHost};
use crate::instance::{self, InstanceRecord, InstanceSpec};
use crate::model::derivation::{DrvGraph, DrvId};
use crate::model::instance::{
    DesiredVm, ObservedVm, UpAction, VmState, down_order, plan_up, state_of,
};
use crate::model::plan::plan_build;
use crate::model::qemu::{MachineSpec, choose_accel, mac_for};
use crate::model::ssh_config::SshHost;
use crate::model::topology::{LOCAL_HOST, Placement, VmNode};
use crate::progress::Reporter;
use crate::project::Project;
use crate::realise::{RealiseOptions, present_hashes, realise};
use crate::ssh::Ssh;
use crate::state::StateDir;
use crate::store::{Entry, Store};

/// Default memory for a VM whose platform and table say nothing.
const DEFAULT_MEMORY_MIB: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(
        "VM `{vm}` runs inside `{parent}`; running VMs inside VMs is not supported yet\nhint: bring up its hypervisor alone with `farm up {parent}`"
    )]
    Nested { vm: String, parent: String },
    #[error(
        "VM `{vm}` runs on host `{host}`, which is not this machine; remote hosts are not supported yet"
    )]
    RemoteHost { vm: String, host: String },
    #[error(
        "Port {port} on 127.0.0.1, wanted by VM `{vm}`, is already in use\nhint: stop what uses it, or change `ssh_port`/`forwards` of `{vm}` in farm.toml"
    )]
    PortInUse { vm: String, port: u16 },
    #[error(
        "VM `{vm}` did not answer ssh within {seconds} s ({reason})\nlast lines of its serial console:\n{serial}\nhint: `farm logs {vm}` shows the whole console"
    )]
    NoSsh {
        vm: String,
        seconds: u64,
        reason: String,
        serial: String,
    },
    #[error(transparent)]
    Instance(#[from] instance::InstanceError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Build(#[from] crate::realise::BuildError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error("Cannot check port {port} on 127.0.0.1: {source}")]
    PortCheck { port: u16, source: std::io::Error },
}

#[derive(Clone, Debug)]
pub struct UpOptions {
    /// VMs to bring up; empty means all.
    pub names: Vec<String>,
    pub dry_run: bool,
    pub realise: RealiseOptions,
}

/// One row of `farm up`'s and `farm status`'s tables.
#[derive(Clone, Debug, Serialize)]
pub struct VmStatus {
    pub name: String,
    pub host: String,
    pub level: u32,
    pub platform: String,
    pub state: VmState,
    pub address: Option<String>,
    pub ssh: String,
}

/// The project's state directory: `.farm/` beside farm.toml unless given.
pub fn state_dir_for(project: &Project, state: Option<&Path>) -> PathBuf {
    state
        .map(Path::to_path_buf)
        .unwrap_or_else(|| project.project_dir().join(".farm"))
}

fn platform_id(vm: &VmNode) -> DrvId {
    DrvId::Platform {
        platform: vm.platform.clone(),
        target: vm.target.clone(),
    }
}

/// The boot files `id`'s disk boots with: its own `boot/`, else the nearest ancestor's.
pub fn boot_files(
    graph: &DrvGraph,
    entries: &BTreeMap<DrvId, Entry>,
    id: &DrvId,
) -> Option<BootFiles> {
    let mut current = Some(id.clone());
    while let Some(id) = current {
        if let Some(boot) = entries
            .get(&id)
            .and_then(|e| e.boot_dir())
            .and_then(|dir| BootFiles::in_dir(&dir))
        {
            return Some(boot);
        }
        current = graph.nodes.get(&id).and_then(|n| n.parent.clone());
    }
    None
}

/// What `farm up` will do, as printed by `--dry-run`.
pub fn describe_plan(steps: &[crate::model::instance::UpStep]) -> String {
    steps
        .iter()
        .map(|s| {
            let verb = match s.action {
                UpAction::Keep => "keep",
                UpAction::Create => "create",
                UpAction::Restart => "restart",
                UpAction::Replace => "replace",
            };
            format!("{verb:<8} {} (L{})\n", s.name, s.level)
        })
        .collect()
}

/// Brings the selected VMs up; returns the status rows of all of them.
pub fn up(
    project: &Project,
    store: &Store,
    state_root: &Path,
    options: &UpOptions,
    reporter: &Reporter,
) -> Result<Vec<VmStatus>, UpError> {
    let topology = &project.loaded.topology;
    let selected: Vec<&VmNode> = topology
        .vms
        .values()
        .filter(|vm| options.names.is_empty() || options.names.contains(&vm.name))
        .collect();
    for vm in &selected {
        match &vm.placement {
            Placement::Vm(parent) => {
                return Err(UpError::Nested {
                    vm: vm.name.clone(),
                    parent: parent.clone(),
                });
            }
            Placement::Host(host) => {
                if topology
                    .hosts
                    .get(host)
                    .is_some_and(|h| h.address.is_some())
                {
                    return Err(UpError::RemoteHost {
                        vm: vm.name.clone(),
                        host: host.clone(),
                    });
                }
            }
        }
    }

    // Build what is missing.
    let wanted: Vec<DrvId> = selected.iter().map(|vm| platform_id(vm)).collect();
    let closure = project.graph.closure(&wanted);
    let present = present_hashes(store, closure)?;
    let build_plan = plan_build(&project.loaded.config, &project.graph, &wanted, &present);
    if options.dry_run && !build_plan.is_noop() {
        print!("{build_plan}");
    }
    let entries = if options.dry_run {
        BTreeMap::new()
    } else {
        realise(
            &project.loaded.config,
            &build_plan,
            store,
            &options.realise,
            reporter,
        )?
    };

    let state = StateDir::open(state_root)?;
    let host = LocalHost {
        name: LOCAL_HOST.to_string(),
    };
    let mut records: BTreeMap<String, (InstanceRecord, bool)> = BTreeMap::new();
    for vm in topology.vms.values() {
        if let Some(found) = instance::observe(&host, &state.instance(&vm.name))? {
            records.insert(vm.name.clone(), found);
        }
    }
    let desired: Vec<DesiredVm> = selected
        .iter()
        .map(|vm| DesiredVm {
            name: vm.name.clone(),
            drv_hash: project.graph.nodes[&platform_id(vm)].hash,
            level: vm.level,
        })
        .collect();
    let observed: Vec<ObservedVm> = records
        .values()
        .map(|(r, running)| instance::observed_vm(r, *running))
        .collect();
    let steps = plan_up(&desired, &observed);
    if options.dry_run {
        print!("{}", describe_plan(&steps));
        return Ok(Vec::new());
    }

    // Ports: fixed ones must be free before anything starts.
    let mut ports: BTreeMap<String, u16> = BTreeMap::new();
    for step in &steps {
        let vm = &topology.vms[&step.name];
        let record = records.get(&vm.name).map(|(r, _)| r);
        let starting = step.action != UpAction::Keep;
        let running_now = records.get(&vm.name).is_some_and(|(_, r)| *r);
        let port = match (vm.ssh_port, record.and_then(|r| r.ssh_port)) {
            (Some(fixed), _) => fixed,
            (None, Some(recorded)) if step.action != UpAction::Replace => recorded,
            _ => crate::hostinfo::free_local_port()
                .map_err(|source| UpError::PortCheck { port: 0, source })?,
        };
        if starting && !running_now {
            let mut wanted_ports = vec![port];
            wanted_ports.extend(vm.forwards.iter().map(|f| f.host));
            for p in wanted_ports {
                if std::net::TcpListener::bind(("127.0.0.1", p)).is_err() {
                    return Err(UpError::PortInUse {
                        vm: vm.name.clone(),
                        port: p,
                    });
                }
            }
        }
        ports.insert(vm.name.clone(), port);
    }

    // Replaced VMs go first: their overlays belong to the old layer.
    for step in steps.iter().filter(|s| s.action == UpAction::Replace) {
        reporter.line(format!(
            "{:>12} {} (its platform changed)",
            "replacing", step.name
        ));
        let paths = state.instance(&step.name);
        instance::stop(&host, &paths, &step.name, Duration::from_secs(30), None)?;
        instance::remove(&host, &paths, &step.name)?;
    }

    let farm_key = state.farm_key()?;
    let specs: BTreeMap<String, InstanceSpec> = steps
        .iter()
        .map(|step| {
            let vm = &topology.vms[&step.name];
            let spec = instance_spec(
                project,
                &entries,
                &state,
                vm,
                ports[&vm.name],
                &farm_key.public,
                options,
            )?;
            Ok((vm.name.clone(), spec))
        })
        .collect::<Result<_, UpError>>()?;
    write_ssh_files(project, &state, &ports)?;

    // Start, then wait for ssh, a level at a time; a level's VMs in parallel.
    let started = Instant::now();
    let max_level = steps.iter().map(|s| s.level).max().unwrap_or(0);
    for level in 1..=max_level {
        let level_steps: Vec<_> = steps.iter().filter(|s| s.level == level).collect();
        let results: Vec<Result<(), UpError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = level_steps
                .iter()
                .map(|step| {
                    let spec = &specs[&step.name];
                    let paths = state.instance(&step.name);
                    let host = &host;
                    let state = &state;
                    scope.spawn(move || -> Result<(), UpError> {
                        match step.action {
                            UpAction::Keep => return Ok(()),
                            UpAction::Create | UpAction::Replace => {
                                reporter.line(format!("{:>12} {}", "starting", step.name));
                                let record = instance::create(host, &paths, spec)?;
                                instance::start(host, &paths, &record)?;
                            }
                            UpAction::Restart => {
                                reporter.line(format!(
                                    "{:>12} {} (its qemu was not running)",
                                    "restarting", step.name
                                ));
                                let record = instance::observe(host, &paths)?
                                    .map(|(r, _)| r)
                                    .expect("restarted VMs have a record");
                                instance::start(host, &paths, &record)?;
                            }
                        }
                        wait_for_ssh(host, state, &step.name, options.realise.boot_timeout)?;
                        reporter.line(format!(
                            "{:>12} {} (ssh after {:.0} s)",
                            "ready",
                            step.name,
                            started.elapsed().as_secs_f64()
                        ));
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a VM thread panicked"))
                .collect()
        });
        if let Some(err) = results.into_iter().find_map(Result::err) {
            return Err(err);
        }
    }
    status_rows(project, &state, &host, &selected)
}

#[allow(clippy::too_many_arguments)]
fn instance_spec(
    project: &Project,
    entries: &BTreeMap<DrvId, Entry>,
    state: &StateDir,
    vm: &VmNode,
    ssh_port: u16,
    farm_public_key: &str,
    options: &UpOptions,
) -> Result<InstanceSpec, UpError> {
    let config = &project.loaded.config;
    let target = &config.targets[&vm.target];
    let id = platform_id(vm);
    let entry = &entries[&id];
    let host_key = state.host_key(&vm.name)?;
    let accel = choose_accel(
        options.realise.accel.unwrap_or(target.accel),
        crate::hostinfo::kvm_facts(),
        crate::hostinfo::host_arch().unwrap_or(target.arch),
        target.arch,
    );
    Ok(InstanceSpec {
        name: vm.name.clone(),
        hostname: vm.hostname.clone(),
        drv_hash: project.graph.nodes[&id].hash,
        entry_disk: entry.disk_path(),
        boot: boot_files(&project.graph, entries, &id),
        hw: MachineSpec {
            arch: target.arch,
            machine: target.machine.clone(),
            cpu: target.cpu.clone(),
            accel,
            memory_mib: vm
                .resources
                .memory
                .map(|m| m.mib())
                .unwrap_or(DEFAULT_MEMORY_MIB),
            cpus: vm.resources.cpus.unwrap_or(1),
        },
        disk_size: vm.resources.disk_size.map(|s| s.0),
        ssh_port: Some(ssh_port),
        forwards: vm.forwards.iter().map(|f| (f.host, f.guest)).collect(),
        mac: mac_for(&vm.name, 0),
        authorized_keys: vec![farm_public_key.to_string()],
        host_key: (host_key.private, host_key.public),
    })
}

fn wait_for_ssh(
    host: &LocalHost,
    state: &StateDir,
    name: &str,
    timeout: Duration,
) -> Result<(), UpError> {
    let paths = state.instance(name);
    let deadline = Instant::now() + timeout;
    Ssh::wait_for(
        &state.ssh_config(),
        name,
        deadline,
        || match instance::observe(host, &paths) {
            Ok(Some((_, true))) => Ok(()),
            Ok(_) => Err(format!(
                "qemu is not running; {}",
                crate::hostinfo::tail(&paths.stderr_log(), 5)
            )),
            Err(e) => Err(e.to_string()),
        },
    )
    .map(drop)
    .map_err(|e| UpError::NoSsh {
        vm: name.to_string(),
        seconds: timeout.as_secs(),
        reason: e.to_string(),
        serial: crate::hostinfo::tail(&paths.serial_log(), 25),
    })
}

/// Regenerates ssh_config and known_hosts from the instances that exist.
/// `planned` gives the ports of instances about to be created (they have no record yet).
fn write_ssh_files(
    project: &Project,
    state: &StateDir,
    planned: &BTreeMap<String, u16>,
) -> Result<(), UpError> {
    let mut hosts = Vec::new();
    for vm in project.loaded.topology.vms.values() {
        let paths = state.instance(&vm.name);
        let host_pub = paths.dir.join("host_ed25519.pub");
        let (Ok(key), true) = (fs_err::read_to_string(&host_pub), paths.dir.is_dir()) else {
            continue;
        };
        let port = planned.get(&vm.name).copied().or_else(|| {
            fs_err::read(paths.record())
                .ok()
                .and_then(|b| serde_json::from_slice::<InstanceRecord>(&b).ok())
                .and_then(|r| r.ssh_port)
        });
        let Some(port) = port else { continue };
        hosts.push((
            SshHost {
                alias: vm.name.clone(),
                hostname: "127.0.0.1".to_string(),
                port,
                user: "root".to_string(),
                identity_file: state.identity_file(),
                known_hosts_file: state.known_hosts(),
                proxy_jump: Vec::new(),
            },
            key.trim().to_string(),
        ));
    }
    Ok(state.write_ssh_files(&hosts)?)
}

fn status_rows(
    project: &Project,
    state: &StateDir,
    host: &dyn Host,
    vms: &[&VmNode],
) -> Result<Vec<VmStatus>, UpError> {
    let mut rows = Vec::new();
    for vm in vms {
        let observed = instance::observe(host, &state.instance(&vm.name))?;
        let desired = DesiredVm {
            name: vm.name.clone(),
            drv_hash: project.graph.nodes[&platform_id(vm)].hash,
            level: vm.level,
        };
        let obs = observed
            .as_ref()
            .map(|(r, running)| instance::observed_vm(r, *running));
        let state_now = state_of(&desired, obs.as_ref());
        rows.push(VmStatus {
            name: vm.name.clone(),
            host: vm.placement.name().to_string(),
            level: vm.level,
            platform: format!("{}_{}", vm.platform, vm.target),
            state: state_now,
            address: observed
                .as_ref()
                .and_then(|(r, _)| r.ssh_port)
                .map(|p| format!("127.0.0.1:{p}")),
            ssh: format!("ssh -F {} {}", state.ssh_config().display(), vm.name),
        });
    }
    Ok(rows)
}

/// `farm status`: every VM of the topology.
pub fn status(project: &Project, state_root: &Path) -> Result<Vec<VmStatus>, UpError> {
    let state = StateDir::open(state_root)?;
    let host = LocalHost {
        name: LOCAL_HOST.to_string(),
    };
    let vms: Vec<&VmNode> = project.loaded.topology.vms.values().collect();
    status_rows(project, &state, &host, &vms)
}

/// `farm down`: stops the named VMs (all when empty), deepest first, and removes their
/// overlays unless `keep`.
pub fn down(
    project: &Project,
    state_root: &Path,
    names: &[String],
    keep: bool,
    timeout: Duration,
    reporter: &Reporter,
) -> Result<Vec<String>, UpError> {
    let state = StateDir::open(state_root)?;
    let host = LocalHost {
        name: LOCAL_HOST.to_string(),
    };
    let topology = &project.loaded.topology;
    let mut present: Vec<(String, u32)> = Vec::new();
    for entry in fs_err::read_dir(state.root().join("vms"))
        .map_err(|source| crate::state::StateError::Io {
            path: state.root().join("vms"),
            source,
        })?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if names.is_empty() || names.contains(&name) {
            let level = topology.vms.get(&name).map_or(1, |vm| vm.level);
            present.push((name, level));
        }
    }
    let mut stopped = Vec::new();
    for name in down_order(present) {
        let paths = state.instance(&name);
        let config = state.ssh_config();
        let poweroff = || {
            // Debian minbase has no ACPI daemon: ask the guest itself too.
            let _ = std::process::Command::new("timeout")
                .args(["10", "ssh", "-F"])
                .arg(&config)
                .args([&name, "poweroff"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        };
        instance::stop(&host, &paths, &name, timeout, Some(&poweroff))?;
        if !keep {
            instance::remove(&host, &paths, &name)?;
        }
        reporter.line(format!(
            "{:>12} {name}{}",
            "stopped",
            if keep { " (overlay kept)" } else { "" }
        ));
        stopped.push(name);
    }
    write_ssh_files(project, &state, &BTreeMap::new())?;
    Ok(stopped)
}
