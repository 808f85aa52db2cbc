//! Applying `farm up` and `farm down`: build what is missing, compare what farm.toml wants
//! with what runs (`model::instance::plan_up`), then start, restart or replace VMs — a
//! level's VMs in parallel — and wait until each answers ssh through the generated
//! ssh_config, the same file users get.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::build::layer::BootFiles;
use crate::build::realise::{RealiseOptions, present_hashes, realise};
use crate::model::derivation::{DrvGraph, DrvId};
use crate::model::instance::{
    DesiredVm, ObservedVm, UpAction, VmState, down_order, plan_up, state_of,
};
use crate::model::network::{SiteNetwork, SshRoute, site_networks, ssh_route, vde_nics};
use crate::model::plan::plan_build;
use crate::model::qemu::{MachineSpec, choose_accel, mac_for};
use crate::model::ssh_config::{HostKeys, SshHost};
use crate::model::topology::{LOCAL_HOST, Placement, REMOTE_ROOT, Topology, VmNode};
use crate::model::values::Arch;
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::closure::HostStore;
use crate::run::host::remote::RemoteHost;
use crate::run::host::{Host, LocalHost};
use crate::run::instance::{self, InstancePaths, InstanceRecord, InstanceSpec};
use crate::run::state::StateDir;
use crate::store::{Entry, Store};
use crate::sys::ssh::Ssh;

/// How long connecting to a hypervisor VM may take (it is already up: this is generous).
const HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Default memory for a VM whose platform and table say nothing.
const DEFAULT_MEMORY_MIB: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(
        "Hypervisor VM `{hypervisor}` is not running, so the VMs inside it cannot start\nhint: `farm up {hypervisor}` first, or `farm up` without names"
    )]
    HypervisorDown { hypervisor: String },
    #[error("Host `{host}` cannot run VMs: it lacks {missing}\nhint: {hint}")]
    HypervisorIncomplete {
        host: String,
        missing: String,
        hint: String,
    },
    #[error("No free port for ssh forwarding on host `{host}` in farm's range")]
    NoFreePort { host: String },
    #[error(transparent)]
    Push(#[from] crate::run::closure::PushError),
    #[error(transparent)]
    Network(#[from] crate::run::vde::VdeError),
    #[error(
        "Cannot reach host `{host}` ({address}) over ssh: {reason}\nhint: check that `ssh -F {} {host} true` works; farm logs in with the `address`, `identity_file` and `known_hosts` of `[hosts.{host}]`",
        ssh_config.display()
    )]
    HostUnreachable {
        host: String,
        address: String,
        reason: String,
        ssh_config: PathBuf,
    },
    #[error(
        "Port {port} on 127.0.0.1 of host `{host}`, wanted by VM `{vm}`, is already in use\nhint: stop what uses it, or change `ssh_port`/`forwards` of `{vm}` in farm.toml"
    )]
    PortInUse { vm: String, port: u16, host: String },
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
    State(#[from] crate::run::state::StateError),
    #[error(transparent)]
    Build(#[from] crate::build::realise::BuildError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Host(#[from] crate::run::host::HostError),
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

/// Where one group of VMs runs: this machine, or a hypervisor VM reached over ssh, with
/// the paths farm uses there.
struct Site {
    host: Box<dyn Host>,
    /// Instance state on that host (`.farm/` here, `/var/lib/farm/state` on a hypervisor).
    state_root: PathBuf,
    /// The host's store when it is not this machine's (entries are pushed there).
    store: Option<HostStore>,
}

impl Site {
    fn local() -> Site {
        Site {
            host: Box::new(LocalHost {
                name: LOCAL_HOST.to_string(),
            }),
            state_root: PathBuf::new(),
            store: None,
        }
    }

    /// A host reached over ssh, with farm's directory `root` there.
    fn remote(host: RemoteHost, root: &Path) -> Site {
        Site {
            host: Box::new(host),
            state_root: root.join("state"),
            store: Some(HostStore::under(root)),
        }
    }

    fn paths(&self, state: &StateDir, name: &str) -> InstancePaths {
        if self.store.is_some() {
            InstancePaths::new(&self.state_root, name)
        } else {
            state.instance(name)
        }
    }

    fn is_remote(&self) -> bool {
        self.store.is_some()
    }

    /// farm's state directory on the site (networks live under it).
    fn state_dir(&self, state: &StateDir) -> PathBuf {
        if self.is_remote() {
            self.state_root.clone()
        } else {
            state.root().to_path_buf()
        }
    }
}

/// Connects to where VMs placed on `placement` run, or `None` when that hypervisor VM is
/// not running (its VMs are then gone or stopped with it). A remote host that does not
/// answer is an error: its VMs may well be running there.
fn site_for(
    placement: &Placement,
    topology: &Topology,
    state: &StateDir,
    reporter: &Reporter,
) -> Result<Option<Site>, UpError> {
    match placement {
        Placement::Host(name) => match topology.remote_host(placement) {
            None => Ok(Some(Site::local())),
            Some(remote) => {
                let host =
                    RemoteHost::connect(name, &state.ssh_config(), name, HOST_CONNECT_TIMEOUT)
                        .map_err(|e| UpError::HostUnreachable {
                            host: name.clone(),
                            address: remote.address.to_string(),
                            reason: crate::sys::ssh::error_chain(&e),
                            ssh_config: state.ssh_config(),
                        })?;
                Ok(Some(Site::remote(host, &remote.root)))
            }
        },
        Placement::Vm(parent) => {
            // farm made it (at whatever depth) if it has local state; it runs if farm's
            // ssh_config reaches it, which is what connecting tries.
            if !state.root().join("vms").join(parent).is_dir() {
                return Ok(None);
            }
            match RemoteHost::connect(parent, &state.ssh_config(), parent, HOST_CONNECT_TIMEOUT) {
                Ok(host) => Ok(Some(Site::remote(host, Path::new(REMOTE_ROOT)))),
                Err(e) => {
                    reporter.line(format!(
                        "{:>12} {parent} does not answer ssh ({e}); its VMs count as missing",
                        "warning"
                    ));
                    Ok(None)
                }
            }
        }
    }
}

/// The VMs to act on: the named ones (all when none) and every hypervisor above them.
fn with_ancestors<'a>(topology: &'a Topology, names: &[String]) -> Vec<&'a VmNode> {
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for vm in topology.vms.values() {
        if names.is_empty() || names.contains(&vm.name) {
            wanted.insert(vm.name.clone());
            for placement in topology.chain(&vm.name) {
                if let Placement::Vm(parent) = placement {
                    wanted.insert(parent);
                }
            }
        }
    }
    topology
        .vms
        .values()
        .filter(|vm| wanted.contains(&vm.name))
        .collect()
}

/// The named VMs (all when none) and every VM running inside them, at any depth.
fn with_descendants(topology: &Topology, names: &[String]) -> BTreeSet<String> {
    topology
        .vms
        .values()
        .filter(|vm| {
            names.is_empty()
                || names.contains(&vm.name)
                || topology
                    .chain(&vm.name)
                    .iter()
                    .any(|p| matches!(p, Placement::Vm(parent) if names.contains(parent)))
        })
        .map(|vm| vm.name.clone())
        .collect()
}

/// Brings the selected VMs up, hypervisors before the VMs inside them; returns the status
/// rows of all of them.
pub fn up(
    project: &Project,
    store: &Store,
    state_root: &Path,
    options: &UpOptions,
    reporter: &Reporter,
) -> Result<Vec<VmStatus>, UpError> {
    let topology = &project.loaded.topology;
    let selected = with_ancestors(topology, &options.names);

    // Build what is missing, for every level: layers are built here and pushed down.
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
    let farm_key = state.farm_key()?;
    // Remote hosts are reached through the ssh_config too: their blocks must be there.
    write_ssh_files(project, &state, &BTreeMap::new())?;
    let started = Instant::now();
    let max_level = selected.iter().map(|vm| vm.level).max().unwrap_or(0);
    for level in 1..=max_level {
        // VMs of this level, grouped by where they run.
        let mut groups: BTreeMap<Placement, Vec<&VmNode>> = BTreeMap::new();
        for vm in selected.iter().filter(|vm| vm.level == level) {
            groups.entry(vm.placement.clone()).or_default().push(vm);
        }
        for (placement, vms) in groups {
            let site = if options.dry_run {
                site_for(&placement, topology, &state, reporter)?
            } else {
                Some(
                    site_for(&placement, topology, &state, reporter)?.ok_or_else(|| {
                        UpError::HypervisorDown {
                            hypervisor: placement.name().to_string(),
                        }
                    })?,
                )
            };
            let context = GroupContext {
                project,
                store,
                entries: &entries,
                state: &state,
                farm_public_key: &farm_key.public,
                options,
                reporter,
                started,
            };
            match site {
                Some(site) => up_group(&context, &site, &vms)?,
                None => {
                    // Dry run under a hypervisor that is not up yet: all of it is new.
                    for vm in &vms {
                        println!(
                            "create   {} (L{}, inside {})",
                            vm.name,
                            vm.level,
                            placement.name()
                        );
                    }
                }
            }
        }
    }
    if options.dry_run {
        return Ok(Vec::new());
    }
    status_rows(project, &state, &selected, reporter)
}

/// What every group of `up` shares.
struct GroupContext<'a> {
    project: &'a Project,
    store: &'a Store,
    entries: &'a BTreeMap<DrvId, Entry>,
    state: &'a StateDir,
    farm_public_key: &'a str,
    options: &'a UpOptions,
    reporter: &'a Reporter,
    started: Instant,
}

/// Brings up the VMs of one level that run on one site: checks and fills the site when it
/// is a hypervisor, then keeps, restarts, replaces or creates each, in parallel.
fn up_group(cx: &GroupContext, site: &Site, vms: &[&VmNode]) -> Result<(), UpError> {
    let (project, state, options, reporter) = (cx.project, cx.state, cx.options, cx.reporter);
    let config = &project.loaded.config;
    let host = site.host.as_ref();

    let mut records: BTreeMap<String, (InstanceRecord, bool)> = BTreeMap::new();
    for vm in vms {
        if let Some(found) = instance::observe(host, &site.paths(state, &vm.name))? {
            records.insert(vm.name.clone(), found);
        }
    }
    let desired: Vec<DesiredVm> = vms
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
        return Ok(());
    }

    // A hypervisor VM: it must have what the VMs need, and their layers.
    let mut accel_facts = (
        crate::sys::hostinfo::kvm_facts(),
        crate::sys::hostinfo::host_arch(),
    );
    if let Some(host_store) = &site.store {
        let arches: BTreeSet<Arch> = vms
            .iter()
            .map(|vm| config.targets[&vm.target].arch)
            .collect();
        let facts = crate::run::hypervisor::probe(host, &arches)?;
        if !facts.missing.is_empty() {
            let packages = crate::run::hypervisor::packages_for(&facts.missing);
            let hint = match &vms[0].placement {
                Placement::Vm(vm) => format!(
                    "add `packages = [\"{}\"]` to the platform of `{vm}`",
                    packages.join("\", \"")
                ),
                Placement::Host(host) => format!(
                    "install them on `{host}`: `apt-get install {}`",
                    packages.join(" ")
                ),
            };
            return Err(UpError::HypervisorIncomplete {
                host: host.name().to_string(),
                missing: facts.missing.join(", "),
                hint,
            });
        }
        accel_facts = (facts.kvm, facts.arch);
        let wanted: Vec<DrvId> = steps
            .iter()
            .filter(|s| s.action != UpAction::Keep)
            .map(|s| platform_id(vms.iter().find(|vm| vm.name == s.name).expect("planned")))
            .collect();
        let needed: Vec<&Entry> = project
            .graph
            .closure(&wanted)
            .iter()
            .map(|node| &cx.entries[&node.id])
            .collect();
        let pushed = crate::run::closure::push_closure(host, host_store, &needed, reporter)?;
        if !pushed.pushed.is_empty() {
            reporter.line(format!(
                "{:>12} {} layer(s) to {} ({}, {:.1} s; {} already there)",
                "pushed",
                pushed.pushed.len(),
                host.name(),
                crate::build::realise::human_bytes(pushed.bytes),
                pushed.elapsed.as_secs_f64(),
                pushed.present
            ));
        }
    }

    // VDE networks the group's VMs use: checked, then started (idempotent) before qemu.
    let placement = &vms[0].placement;
    let site_state = site.state_dir(state);
    let networks: Vec<SiteNetwork> = site_networks(config, &project.loaded.topology, placement)
        .into_iter()
        .filter(|n| vms.iter().any(|vm| n.users.contains(&vm.name)))
        .collect();
    if steps.iter().any(|s| s.action != UpAction::Keep) {
        let arches: BTreeSet<Arch> = vms
            .iter()
            .map(|vm| config.targets[&vm.target].arch)
            .collect();
        crate::run::vde::check(host, &networks, &arches)?;
        for network in &networks {
            crate::run::vde::ensure_up(host, &site_state, network)?;
            let attach = network
                .attach
                .map(|a| format!(", {} on tap {}", a, network.tap_name(&site_state)))
                .unwrap_or_default();
            reporter.line(format!(
                "{:>12} {} on {} ({}{attach})",
                "network",
                network.name,
                host.name(),
                network.plug(&site_state)
            ));
        }
    }

    // Ports: fixed ones must be free before anything starts.
    let used_remote: BTreeSet<u16> = if site.is_remote() {
        crate::run::hypervisor::listening_ports(host)?
    } else {
        BTreeSet::new()
    };
    let mut ports: BTreeMap<String, Option<u16>> = BTreeMap::new();
    for step in &steps {
        let vm = vms.iter().find(|vm| vm.name == step.name).expect("planned");
        if !vm.user_network {
            ports.insert(vm.name.clone(), None);
            continue;
        }
        let record = records.get(&vm.name).map(|(r, _)| r);
        let running_now = records.get(&vm.name).is_some_and(|(_, r)| *r);
        let taken: BTreeSet<u16> = ports.values().flatten().copied().collect();
        let port = match (vm.ssh_port, record.and_then(|r| r.ssh_port)) {
            (Some(fixed), _) => fixed,
            (None, Some(recorded)) if step.action != UpAction::Replace => recorded,
            _ if site.is_remote() => {
                crate::run::hypervisor::pick_port(&vm.name, &used_remote, &taken).ok_or_else(
                    || UpError::NoFreePort {
                        host: host.name().to_string(),
                    },
                )?
            }
            _ => crate::sys::hostinfo::free_local_port()
                .map_err(|source| UpError::PortCheck { port: 0, source })?,
        };
        if step.action != UpAction::Keep && !running_now {
            let mut wanted_ports = vec![port];
            wanted_ports.extend(vm.forwards.iter().map(|f| f.host));
            for p in wanted_ports {
                let busy = if site.is_remote() {
                    used_remote.contains(&p)
                } else {
                    std::net::TcpListener::bind(("127.0.0.1", p)).is_err()
                };
                if busy {
                    return Err(UpError::PortInUse {
                        vm: vm.name.clone(),
                        port: p,
                        host: host.name().to_string(),
                    });
                }
            }
        }
        ports.insert(vm.name.clone(), Some(port));
    }

    // Replaced VMs go first: their overlays belong to the old layer.
    for step in steps.iter().filter(|s| s.action == UpAction::Replace) {
        reporter.line(format!(
            "{:>12} {} (its platform changed)",
            "replacing", step.name
        ));
        let paths = site.paths(state, &step.name);
        instance::stop(host, &paths, &step.name, Duration::from_secs(30), None)?;
        instance::remove(host, &paths, &step.name)?;
    }

    let specs: BTreeMap<String, InstanceSpec> = steps
        .iter()
        .map(|step| {
            let vm = vms.iter().find(|vm| vm.name == step.name).expect("planned");
            let spec = instance_spec(cx, site, vm, ports[&vm.name], accel_facts, &networks)?;
            Ok((vm.name.clone(), spec))
        })
        .collect::<Result<_, UpError>>()?;
    write_ssh_files(project, state, &ports)?;

    // Start, then wait for ssh; the group's VMs in parallel.
    let results: Vec<Result<(), UpError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = steps
            .iter()
            .map(|step| {
                let spec = &specs[&step.name];
                let paths = site.paths(state, &step.name);
                scope.spawn(move || -> Result<(), UpError> {
                    match step.action {
                        UpAction::Keep => return Ok(()),
                        UpAction::Create | UpAction::Replace => {
                            reporter.line(format!("{:>12} {}", "starting", step.name));
                            let record = instance::create(host, &paths, spec)?;
                            if site.is_remote() {
                                // ssh_config and `farm status` read the record here.
                                save_local_record(state, &record)?;
                            }
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
                    wait_for_ssh(
                        host,
                        state,
                        &paths,
                        &step.name,
                        options.realise.boot_timeout,
                    )?;
                    reporter.line(format!(
                        "{:>12} {} (ssh after {:.0} s)",
                        "ready",
                        step.name,
                        cx.started.elapsed().as_secs_f64()
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
    results
        .into_iter()
        .find_map(Result::err)
        .map_or(Ok(()), Err)
}

fn save_local_record(state: &StateDir, record: &InstanceRecord) -> Result<(), UpError> {
    let paths = state.instance(&record.name);
    let json = serde_json::to_vec_pretty(record).expect("records serialize");
    LocalHost {
        name: LOCAL_HOST.to_string(),
    }
    .put(&json, &paths.record(), 0o600)?;
    Ok(())
}

fn instance_spec(
    cx: &GroupContext,
    site: &Site,
    vm: &VmNode,
    ssh_port: Option<u16>,
    (kvm, host_arch): (crate::model::qemu::KvmFacts, Option<Arch>),
    networks: &[SiteNetwork],
) -> Result<InstanceSpec, UpError> {
    let project = cx.project;
    let config = &project.loaded.config;
    let target = &config.targets[&vm.target];
    let id = platform_id(vm);
    let entry = &cx.entries[&id];
    let host_key = cx.state.host_key(&vm.name)?;
    let accel = choose_accel(
        cx.options.realise.accel.unwrap_or(target.accel),
        kvm,
        host_arch.unwrap_or(target.arch),
        target.arch,
    );
    // On a hypervisor VM, the same files in its own copy of the store.
    let local_store = cx.store.root().join("store");
    let on_site = |path: PathBuf| match &site.store {
        Some(host_store) => host_store.translate(&local_store, &path),
        None => path,
    };
    let boot = boot_files(&project.graph, cx.entries, &id).map(|b| BootFiles {
        kernel: on_site(b.kernel),
        initrd: b.initrd.map(on_site),
        cmdline: b.cmdline,
    });
    Ok(InstanceSpec {
        name: vm.name.clone(),
        hostname: vm.hostname.clone(),
        drv_hash: project.graph.nodes[&id].hash,
        entry_disk: on_site(entry.disk_path()),
        boot,
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
        ssh_port,
        forwards: vm.forwards.iter().map(|f| (f.host, f.guest)).collect(),
        mac: mac_for(&vm.name, 0),
        vde_nics: vde_nics(vm)
            .into_iter()
            .map(|nic| {
                let sock = networks
                    .iter()
                    .find(|n| n.name == nic.network)
                    .expect("a NIC's network is on its site")
                    .plug(&site.state_dir(cx.state));
                (nic, sock)
            })
            .collect(),
        authorized_keys: vec![cx.farm_public_key.to_string()],
        host_key: (host_key.private, host_key.public),
    })
}

fn wait_for_ssh(
    host: &dyn Host,
    state: &StateDir,
    paths: &InstancePaths,
    name: &str,
    timeout: Duration,
) -> Result<(), UpError> {
    let deadline = Instant::now() + timeout;
    Ssh::wait_for(
        &state.ssh_config(),
        name,
        deadline,
        || match instance::observe(host, paths) {
            Ok(Some((_, true))) => Ok(()),
            Ok(_) => Err(format!(
                "qemu is not running; {}",
                host_tail(host, &paths.stderr_log(), 5)
            )),
            Err(e) => Err(e.to_string()),
        },
    )
    .map(drop)
    .map_err(|e| UpError::NoSsh {
        vm: name.to_string(),
        seconds: timeout.as_secs(),
        reason: e.to_string(),
        serial: host_tail(host, &paths.serial_log(), 25),
    })
}

/// The last lines of a log on whichever host has it.
fn host_tail(host: &dyn Host, path: &Path, lines: usize) -> String {
    match host.get(path) {
        Ok(Some(bytes)) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Ok(None) => format!("(no `{}` on {})", path.display(), host.name()),
        Err(e) => format!("(cannot read `{}`: {e})", path.display()),
    }
}

/// Regenerates ssh_config and known_hosts from the instances that exist: every VM with its
/// full jump chain through the hypervisors above it.
/// `planned` gives the ports of instances about to be created (they have no record yet).
fn write_ssh_files(
    project: &Project,
    state: &StateDir,
    planned: &BTreeMap<String, Option<u16>>,
) -> Result<(), UpError> {
    let topology = &project.loaded.topology;
    let mut hosts = Vec::new();
    for vm in topology.vms.values() {
        let paths = state.instance(&vm.name);
        let host_pub = paths.dir.join("host_ed25519.pub");
        let (Ok(key), true) = (fs_err::read_to_string(&host_pub), paths.dir.is_dir()) else {
            continue;
        };
        let forwarded = planned.get(&vm.name).copied().flatten().or_else(|| {
            fs_err::read(paths.record())
                .ok()
                .and_then(|b| serde_json::from_slice::<InstanceRecord>(&b).ok())
                .and_then(|r| r.ssh_port)
        });
        let (hostname, port) = match ssh_route(topology, vm) {
            Some(SshRoute::Forwarded) => match forwarded {
                Some(port) => ("127.0.0.1".to_string(), port),
                None => continue,
            },
            Some(SshRoute::Direct(ip)) => (ip.to_string(), 22),
            None => continue,
        };
        let proxy_jump = topology
            .chain(&vm.name)
            .into_iter()
            .filter(|p| topology.reached_through(p))
            .map(|p| p.name().to_string())
            .collect();
        hosts.push((
            SshHost::vm(
                &vm.name,
                &hostname,
                port,
                state.identity_file(),
                state.known_hosts(),
                proxy_jump,
            ),
            Some(key.trim().to_string()),
        ));
    }
    // Remote hosts: the user's own login, with paths relative to farm.toml (absolute in
    // the file: users run `ssh -F` from anywhere).
    let project_dir = fs_err::canonicalize(project.project_dir())
        .unwrap_or_else(|_| project.project_dir().to_path_buf());
    let from_project = |path: &String| match path.starts_with('~') {
        true => PathBuf::from(path),
        false => project_dir.join(path),
    };
    for host in topology.hosts.values() {
        let Some(remote) = &host.remote else { continue };
        hosts.push((
            SshHost {
                alias: host.name.clone(),
                hostname: remote.address.hostname.clone(),
                port: remote.address.port,
                user: remote.address.user.clone(),
                identity_file: remote.identity_file.as_ref().map(from_project),
                host_keys: HostKeys::Users(remote.known_hosts.as_ref().map(from_project)),
                proxy_jump: Vec::new(),
            },
            None,
        ));
    }
    Ok(state.write_ssh_files(&hosts)?)
}

/// Observes every VM in `vms`, connecting once to each hypervisor whose VMs are asked for.
fn observe_all(
    topology: &Topology,
    state: &StateDir,
    vms: &[&VmNode],
    reporter: &Reporter,
) -> Result<BTreeMap<String, Option<(InstanceRecord, bool)>>, UpError> {
    let mut sites: BTreeMap<Placement, Option<Site>> = BTreeMap::new();
    let mut found = BTreeMap::new();
    let mut by_level: Vec<&&VmNode> = vms.iter().collect();
    by_level.sort_by_key(|vm| vm.level);
    for vm in by_level {
        if !sites.contains_key(&vm.placement) {
            // Status shows an unreachable remote host's VMs as missing, with a warning.
            let site = match site_for(&vm.placement, topology, state, reporter) {
                Err(e @ UpError::HostUnreachable { .. }) => {
                    reporter.line(format!("{:>12} {e}", "warning"));
                    None
                }
                other => other?,
            };
            sites.insert(vm.placement.clone(), site);
        }
        let observed = match &sites[&vm.placement] {
            Some(site) => instance::observe(site.host.as_ref(), &site.paths(state, &vm.name))?,
            None => None,
        };
        found.insert(vm.name.clone(), observed);
    }
    Ok(found)
}

fn status_rows(
    project: &Project,
    state: &StateDir,
    vms: &[&VmNode],
    reporter: &Reporter,
) -> Result<Vec<VmStatus>, UpError> {
    let topology = &project.loaded.topology;
    let observed_all = observe_all(topology, state, vms, reporter)?;
    let mut rows = Vec::new();
    for vm in vms {
        let observed = &observed_all[&vm.name];
        let desired = DesiredVm {
            name: vm.name.clone(),
            drv_hash: project.graph.nodes[&platform_id(vm)].hash,
            level: vm.level,
        };
        let obs = observed
            .as_ref()
            .map(|(r, running)| instance::observed_vm(r, *running));
        let state_now = state_of(&desired, obs.as_ref());
        let endpoint = match ssh_route(&project.loaded.topology, vm) {
            Some(SshRoute::Direct(ip)) => observed.as_ref().map(|_| format!("{ip}:22")),
            _ => observed
                .as_ref()
                .and_then(|(r, _)| r.ssh_port)
                .map(|p| format!("127.0.0.1:{p}")),
        };
        let address = endpoint.map(|e| {
            if topology.reached_through(&vm.placement) {
                format!("{}:{e}", vm.placement.name())
            } else {
                e
            }
        });
        rows.push(VmStatus {
            name: vm.name.clone(),
            host: vm.placement.name().to_string(),
            level: vm.level,
            platform: format!("{}_{}", vm.platform, vm.target),
            state: state_now,
            address,
            ssh: format!("ssh -F {} {}", state.ssh_config().display(), vm.name),
        });
    }
    Ok(rows)
}

/// `farm status`: every VM of the topology, hypervisors before the VMs inside them.
/// Warnings (a host that does not answer) go to `reporter`, the rows to the caller.
pub fn status(
    project: &Project,
    state_root: &Path,
    reporter: &Reporter,
) -> Result<Vec<VmStatus>, UpError> {
    let state = StateDir::open(state_root)?;
    write_ssh_files(project, &state, &BTreeMap::new())?;
    let mut vms: Vec<&VmNode> = project.loaded.topology.vms.values().collect();
    vms.sort_by_key(|vm| tree_key(project, vm));
    status_rows(project, &state, &vms, reporter)
}

/// Sorts a VM under its hypervisor: the names along its chain, then its own.
fn tree_key(project: &Project, vm: &VmNode) -> Vec<String> {
    let mut key: Vec<String> = project
        .loaded
        .topology
        .chain(&vm.name)
        .iter()
        .filter_map(|p| match p {
            Placement::Vm(parent) => Some(parent.clone()),
            Placement::Host(_) => None,
        })
        .collect();
    key.push(vm.name.clone());
    key
}

/// `farm down`: stops the named VMs (all when empty) and every VM inside them, deepest
/// first, and removes their overlays unless `keep`.
pub fn down(
    project: &Project,
    state_root: &Path,
    names: &[String],
    keep: bool,
    timeout: Duration,
    reporter: &Reporter,
) -> Result<Vec<String>, UpError> {
    let state = StateDir::open(state_root)?;
    write_ssh_files(project, &state, &BTreeMap::new())?;
    let topology = &project.loaded.topology;
    let wanted = with_descendants(topology, names);
    let mut present: Vec<(String, u32)> = Vec::new();
    for entry in fs_err::read_dir(state.root().join("vms"))
        .map_err(|source| crate::run::state::StateError::Io {
            path: state.root().join("vms"),
            source,
        })?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        // A VM farm.toml no longer names is still farm's to stop (at level 1).
        if wanted.contains(&name) || (names.is_empty() && !topology.vms.contains_key(&name)) {
            let level = topology.vms.get(&name).map_or(1, |vm| vm.level);
            present.push((name, level));
        }
    }
    let mut sites: BTreeMap<Placement, Option<Site>> = BTreeMap::new();
    let mut stopped = Vec::new();
    for name in down_order(present) {
        let placement = topology
            .vms
            .get(&name)
            .map_or(Placement::Host(LOCAL_HOST.to_string()), |vm| {
                vm.placement.clone()
            });
        if !sites.contains_key(&placement) {
            let site = site_for(&placement, topology, &state, reporter)?;
            sites.insert(placement.clone(), site);
        }
        let local_paths = state.instance(&name);
        let note = match &sites[&placement] {
            Some(site) => {
                let paths = site.paths(&state, &name);
                let config = state.ssh_config();
                let poweroff = || {
                    // Debian minbase and the tiny image have no ACPI daemon: ask the
                    // guest itself too.
                    let _ = std::process::Command::new("timeout")
                        .args(["10", "ssh", "-F"])
                        .arg(&config)
                        .args([&name, "poweroff"])
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .status();
                };
                let host = site.host.as_ref();
                instance::stop(host, &paths, &name, timeout, Some(&poweroff))?;
                if !keep && site.is_remote() {
                    instance::remove(host, &paths, &name)?;
                }
                ""
            }
            None => " (its hypervisor is not running)",
        };
        if !keep {
            instance::remove(
                &LocalHost {
                    name: LOCAL_HOST.to_string(),
                },
                &local_paths,
                &name,
            )?;
        }
        reporter.line(format!(
            "{:>12} {name}{}{note}",
            "stopped",
            if keep { " (overlay kept)" } else { "" }
        ));
        stopped.push(name);
    }
    tear_down_unused_networks(project, &state, &sites, &stopped)?;
    write_ssh_files(project, &state, &BTreeMap::new())?;
    Ok(stopped)
}

/// After `down`: a site's network goes when none of its VMs runs any more. Sites inside a
/// hypervisor VM that was just stopped went with it.
fn tear_down_unused_networks(
    project: &Project,
    state: &StateDir,
    sites: &BTreeMap<Placement, Option<Site>>,
    stopped: &[String],
) -> Result<(), UpError> {
    let topology = &project.loaded.topology;
    for (placement, site) in sites {
        let Some(site) = site else { continue };
        if matches!(placement, Placement::Vm(parent) if stopped.contains(parent)) {
            continue;
        }
        for network in site_networks(&project.loaded.config, topology, placement) {
            let mut in_use = false;
            for user in network.users.iter().filter(|u| !stopped.contains(u)) {
                let paths = site.paths(state, user);
                in_use |= instance::observe(site.host.as_ref(), &paths)?
                    .is_some_and(|(_, running)| running);
            }
            if !in_use {
                crate::run::vde::tear_down(site.host.as_ref(), &site.state_dir(state), &network)?;
            }
        }
    }
    Ok(())
}
