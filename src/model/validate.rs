//! Validation: every reference resolves, nothing is defined twice, the platform graph has no
//! cycle, no two VMs on one hypervisor forward the same port. Produces the `Topology`.
//!
//! Pure: all problems are collected (not just the first) and located in the source.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::config::{Attachment, Config, Deploy, Located, Origin, VmDecl};
use super::diagnostic::{Diagnostic, list_names};
use super::topology::{
    HostNode, LOCAL_HOST, NicNode, Placement, REMOTE_ROOT, RemoteHostSpec, Topology, VmNode,
};
use super::values::IpCidr;

/// Checks `config` and expands its topology; every problem found is returned.
pub fn validate(config: &Config) -> Result<Topology, Vec<Diagnostic>> {
    let mut problems = Vec::new();
    check_duplicates(config, &mut problems);
    check_platform_graph(config, &mut problems);
    check_networks_referenced(config, &mut problems);
    let topology = expand_topology(config, &mut problems);
    check_ports(&topology, config, &mut problems);
    check_addresses(config, &topology, &mut problems);
    check_network_sites(config, &topology, &mut problems);
    check_arch(config, &topology, &mut problems);
    check_remote_hosts(config, &topology, &mut problems);
    if problems.is_empty() {
        Ok(topology)
    } else {
        problems.sort_by_key(|d| (d.at.file, d.at.span.start));
        Err(problems)
    }
}

fn check_duplicates(config: &Config, problems: &mut Vec<Diagnostic>) {
    for dup in &config.duplicates {
        problems.push(
            Diagnostic::new(
                format!("The {} `{}` is defined twice", dup.kind, dup.name),
                dup.second.clone(),
            )
            .related(dup.first.clone(), "first defined here")
            .hint("keep one definition: each name may appear in farm.toml or in its own file, not both"),
        );
    }
    for (name, platform) in &config.platforms {
        if let Some(image) = config.images.get(name) {
            problems.push(
                Diagnostic::new(
                    format!("`{name}` names both an image and a platform, so `from = \"{name}\"` would be ambiguous"),
                    platform.name.at.clone(),
                )
                .related(image.name.at.clone(), "the image is defined here")
                .hint("rename one of them"),
            );
        }
    }
}

/// `from` must name an image or a platform, and following `from` must end at an image.
fn check_platform_graph(config: &Config, problems: &mut Vec<Diagnostic>) {
    for platform in config.platforms.values() {
        let from = &platform.from;
        if !config.images.contains_key(&from.value) && !config.platforms.contains_key(&from.value) {
            problems.push(
                Diagnostic::new(
                    format!(
                        "Platform `{}` is built `from` `{}`, which is neither an image nor a platform",
                        platform.name.value, from.value
                    ),
                    from.at.clone(),
                )
                .hint(format!(
                    "images: {}; platforms: {}",
                    list_names(config.images.keys()),
                    list_names(config.platforms.keys())
                )),
            );
        }
    }
    // Cycle detection: walk `from` from every platform; a walk that revisits a platform loops.
    let mut reported: BTreeSet<String> = BTreeSet::new();
    for start in config.platforms.keys() {
        let mut path: Vec<&str> = Vec::new();
        let mut current = start.as_str();
        while let Some(platform) = config.platforms.get(current) {
            if let Some(pos) = path.iter().position(|p| *p == current) {
                let cycle: Vec<&str> = path[pos..].to_vec();
                let key = cycle.iter().min().unwrap_or(&current).to_string();
                if reported.insert(key) {
                    let mut shown = cycle.join(" → ");
                    shown.push_str(&format!(" → {current}"));
                    problems.push(
                        Diagnostic::new(
                            format!("Platforms build `from` each other in a cycle: {shown}"),
                            platform.from.at.clone(),
                        )
                        .hint("one platform of the cycle must be built `from` an image"),
                    );
                }
                break;
            }
            path.push(current);
            current = platform.from.value.as_str();
        }
    }
}

fn check_networks_referenced(config: &Config, problems: &mut Vec<Diagnostic>) {
    let unknown = |name: &Located<String>, what: &str| {
        Diagnostic::new(
            format!(
                "{what} refers to the network `{}`, which is not defined",
                name.value
            ),
            name.at.clone(),
        )
        .hint(format!(
            "defined networks: {}; add a `[networks.{}]` table",
            list_names(config.networks.keys()),
            name.value
        ))
    };
    let attachments = |attach: &[Attachment], what: String, problems: &mut Vec<Diagnostic>| {
        for a in attach {
            if !config.networks.contains_key(&a.network.value) {
                problems.push(unknown(&a.network, &what));
            }
        }
    };
    for host in config.hosts.values() {
        attachments(
            &host.attach,
            format!("Host `{}`", host.name.value),
            problems,
        );
    }
    for vm in config.vms.values() {
        attachments(&vm.attach, format!("VM `{}`", vm.name.value), problems);
        for nic in &vm.nics {
            if !config.networks.contains_key(&nic.network.value) {
                problems.push(unknown(
                    &nic.network,
                    &format!("A NIC of VM `{}`", vm.name.value),
                ));
            }
        }
    }
}

/// A VM generated by a `deploy` or declared alone, before merging its `[vms]` table.
struct Pending {
    name: String,
    platform: String,
    target: String,
    placement: Placement,
    level: u32,
    origin: Origin,
}

fn expand_topology(config: &Config, problems: &mut Vec<Diagnostic>) -> Topology {
    let mut topology = Topology::default();
    if config.hosts.is_empty() {
        topology.hosts.insert(
            LOCAL_HOST.to_string(),
            HostNode {
                name: LOCAL_HOST.to_string(),
                remote: None,
                attach: Vec::new(),
            },
        );
    }
    for host in config.hosts.values() {
        topology.hosts.insert(
            host.name.value.clone(),
            HostNode {
                name: host.name.value.clone(),
                remote: host.address.as_ref().map(|address| RemoteHostSpec {
                    address: address.value.clone(),
                    identity_file: host.identity_file.as_ref().map(|f| f.value.clone()),
                    known_hosts: host.known_hosts.as_ref().map(|f| f.value.clone()),
                    root: host
                        .root
                        .as_ref()
                        .map_or_else(|| PathBuf::from(REMOTE_ROOT), |r| PathBuf::from(&r.value)),
                }),
                attach: attachments(&host.attach),
            },
        );
    }

    // Work list of deployers: hosts first, then VMs that deploy VMs, level by level.
    let mut deployers: Vec<(Placement, &Deploy, u32)> = config
        .hosts
        .values()
        .filter_map(|h| {
            h.deploy
                .as_ref()
                .map(|d| (Placement::Host(h.name.value.clone()), d, 1))
        })
        .collect();
    let mut generated_at: BTreeMap<String, Origin> = BTreeMap::new();
    let mut standalone: Vec<&VmDecl> = Vec::new();
    let mut standalone_collected = false;
    // Fixpoint: expand every deploy; then place `[vms]` tables no deploy generated (they
    // may sit on, or deploy, VMs placed in a later round).
    loop {
        while let Some((placement, deploy, level)) = deployers.pop() {
            for pending in permutations(config, &placement, deploy, level, problems) {
                if let Some(first) = generated_at.get(&pending.name) {
                    problems.push(
                        Diagnostic::new(
                            format!(
                                "The VM `{}` is generated twice (by `{}` and by an earlier deploy)",
                                pending.name,
                                placement.name()
                            ),
                            pending.origin.clone(),
                        )
                        .related(first.clone(), "first generated here")
                        .hint("VM names are `<platform>_<target>`: deploy each platform/target pair once"),
                    );
                    continue;
                }
                generated_at.insert(pending.name.clone(), pending.origin.clone());
                let decl = config.vms.get(&pending.name);
                if let Some(decl) = decl {
                    check_decl_agrees(decl, &pending, problems);
                    if let Some(deploy) = &decl.deploy {
                        deployers.push((Placement::Vm(pending.name.clone()), deploy, level + 1));
                    }
                }
                let node = build_node(config, pending, decl);
                topology.vms.insert(node.name.clone(), node);
            }
        }
        if !standalone_collected {
            standalone = config
                .vms
                .values()
                .filter(|d| !generated_at.contains_key(&d.name.value))
                .collect();
            standalone_collected = true;
        }
        // A deploy expanded this round may have generated some of them.
        standalone.retain(|decl| !generated_at.contains_key(&decl.name.value));
        let before = standalone.len();
        standalone.retain(
            |decl| match place_standalone(config, &topology, decl, problems) {
                Placement_::Placed(pending) => {
                    if let Some(deploy) = &decl.deploy {
                        deployers.push((
                            Placement::Vm(pending.name.clone()),
                            deploy,
                            pending.level + 1,
                        ));
                    }
                    let node = build_node(config, pending, Some(decl));
                    topology.vms.insert(node.name.clone(), node);
                    false
                }
                Placement_::Failed => false,
                Placement_::WaitForParent => true,
            },
        );
        if standalone.len() == before && deployers.is_empty() {
            break;
        }
    }
    for decl in standalone {
        let name = &decl.name.value;
        let Some(host) = decl.host.as_ref().filter(|_| decl.platform.is_some()) else {
            problems.push(
                Diagnostic::new(
                    format!("VM `{name}` is not generated by any `deploy` and names no `platform`"),
                    decl.name.at.clone(),
                )
                .hint(format!(
                    "add `platform = \"…\"` to `[vms.{name}]`, or list its platform and target in a host's `deploy`"
                )),
            );
            continue;
        };
        problems.push(
            Diagnostic::new(
                format!(
                    "VM `{}` runs on `{}`, which is neither a host nor a VM that can be placed",
                    decl.name.value, host.value
                ),
                host.at.clone(),
            )
            .hint(format!(
                "hosts: {}; VMs must not be placed inside each other in a cycle",
                list_names(topology.hosts.keys())
            )),
        );
    }
    // Standalone VMs may deploy VMs too; hypervisor VMs are those with children.
    let parents: BTreeSet<String> = topology
        .vms
        .values()
        .filter_map(|vm| match &vm.placement {
            Placement::Vm(p) => Some(p.clone()),
            Placement::Host(_) => None,
        })
        .collect();
    for vm in topology.vms.values_mut() {
        vm.is_hypervisor = parents.contains(&vm.name);
    }
    topology
}

enum Placement_ {
    Placed(Pending),
    Failed,
    WaitForParent,
}

fn place_standalone(
    config: &Config,
    topology: &Topology,
    decl: &VmDecl,
    problems: &mut Vec<Diagnostic>,
) -> Placement_ {
    let name = &decl.name.value;
    let Some(platform) = &decl.platform else {
        // A deploy on a VM placed later may generate it; reported at the end if none does.
        return Placement_::WaitForParent;
    };
    if !config.platforms.contains_key(&platform.value) {
        problems.push(unknown_platform(config, platform, &format!("VM `{name}`")));
        return Placement_::Failed;
    }
    let target = match &decl.target {
        Some(t) if config.targets.contains_key(&t.value) => t.value.clone(),
        Some(t) => {
            problems.push(unknown_target(config, t, &format!("VM `{name}`")));
            return Placement_::Failed;
        }
        None if config.targets.len() == 1 => {
            config.targets.keys().next().cloned().unwrap_or_default()
        }
        None => {
            problems.push(
                Diagnostic::new(
                    format!("VM `{name}` names no `target`"),
                    decl.name.at.clone(),
                )
                .hint(format!(
                    "add `target = \"…\"`; targets: {}",
                    list_names(config.targets.keys())
                )),
            );
            return Placement_::Failed;
        }
    };
    let (placement, level) = match &decl.host {
        Some(h) if topology.hosts.contains_key(&h.value) => (Placement::Host(h.value.clone()), 1),
        Some(h) => match topology.vms.get(&h.value) {
            Some(parent) => (Placement::Vm(h.value.clone()), parent.level + 1),
            None if config.vms.contains_key(&h.value) && &h.value != name => {
                return Placement_::WaitForParent;
            }
            None => {
                problems.push(
                    Diagnostic::new(
                        format!(
                            "VM `{name}` runs on `{}`, which is neither a host nor a VM",
                            h.value
                        ),
                        h.at.clone(),
                    )
                    .hint(format!(
                        "hosts: {}; VMs: {}",
                        list_names(topology.hosts.keys()),
                        list_names(topology.vms.keys())
                    )),
                );
                return Placement_::Failed;
            }
        },
        None if topology.hosts.len() == 1 => {
            let host = topology.hosts.keys().next().cloned().unwrap_or_default();
            (Placement::Host(host), 1)
        }
        None => {
            problems.push(
                Diagnostic::new(format!("VM `{name}` names no `host`"), decl.name.at.clone()).hint(
                    format!(
                        "add `host = \"…\"` naming a host or a hypervisor VM; hosts: {}",
                        list_names(topology.hosts.keys())
                    ),
                ),
            );
            return Placement_::Failed;
        }
    };
    Placement_::Placed(Pending {
        name: name.clone(),
        platform: platform.value.clone(),
        target,
        placement,
        level,
        origin: decl.name.at.clone(),
    })
}

fn permutations(
    config: &Config,
    placement: &Placement,
    deploy: &Deploy,
    level: u32,
    problems: &mut Vec<Diagnostic>,
) -> Vec<Pending> {
    let who = match placement {
        Placement::Host(h) => format!("Host `{h}`"),
        Placement::Vm(v) => format!("VM `{v}`"),
    };
    let targets: Vec<&Located<String>> = deploy
        .targets
        .iter()
        .filter(|t| {
            let known = config.targets.contains_key(&t.value);
            if !known {
                problems.push(unknown_target(config, t, &format!("{who} deploys")));
            }
            known
        })
        .collect();
    let platforms: Vec<&Located<String>> = deploy
        .platforms
        .iter()
        .filter(|p| {
            let known = config.platforms.contains_key(&p.value);
            if !known {
                problems.push(unknown_platform(config, p, &format!("{who} deploys")));
            }
            known
        })
        .collect();
    let mut out = Vec::new();
    for platform in &platforms {
        for target in &targets {
            out.push(Pending {
                name: format!("{}_{}", platform.value, target.value),
                platform: platform.value.clone(),
                target: target.value.clone(),
                placement: placement.clone(),
                level,
                origin: platform.at.clone(),
            });
        }
    }
    out
}

fn unknown_platform(config: &Config, name: &Located<String>, who: &str) -> Diagnostic {
    Diagnostic::new(
        format!("{who} the platform `{}`, which is not defined", name.value),
        name.at.clone(),
    )
    .hint(format!(
        "defined platforms: {}",
        list_names(config.platforms.keys())
    ))
}

fn unknown_target(config: &Config, name: &Located<String>, who: &str) -> Diagnostic {
    Diagnostic::new(
        format!("{who} the target `{}`, which is not defined", name.value),
        name.at.clone(),
    )
    .hint(format!(
        "defined targets: {}; add a `[targets.{}]` table with its `arch`",
        list_names(config.targets.keys()),
        name.value
    ))
}

/// A `[vms.NAME]` table refining a generated VM may not contradict the generation.
fn check_decl_agrees(decl: &VmDecl, pending: &Pending, problems: &mut Vec<Diagnostic>) {
    let checks = [
        (&decl.platform, &pending.platform, "platform"),
        (&decl.target, &pending.target, "target"),
    ];
    for (declared, generated, field) in checks {
        if let Some(declared) = declared
            && &declared.value != generated
        {
            problems.push(
                Diagnostic::new(
                    format!(
                        "VM `{}` is generated with {field} `{generated}`, but its table says `{}`",
                        pending.name, declared.value
                    ),
                    declared.at.clone(),
                )
                .hint(format!("remove `{field}` from `[vms.{}]`", pending.name)),
            );
        }
    }
    if let Some(host) = &decl.host
        && host.value != pending.placement.name()
    {
        problems.push(
            Diagnostic::new(
                format!(
                    "VM `{}` is deployed by `{}`, but its table says `host = \"{}\"`",
                    pending.name,
                    pending.placement.name(),
                    host.value
                ),
                host.at.clone(),
            )
            .hint(format!("remove `host` from `[vms.{}]`", pending.name)),
        );
    }
}

fn attachments(attach: &[Attachment]) -> Vec<(String, IpCidr)> {
    attach
        .iter()
        .map(|a| (a.network.value.clone(), a.address.value))
        .collect()
}

fn build_node(config: &Config, pending: Pending, decl: Option<&VmDecl>) -> VmNode {
    let platform_resources = config
        .platforms
        .get(&pending.platform)
        .map(|p| p.resources.clone())
        .unwrap_or_default();
    let resources = decl
        .map(|d| d.resources.or(&platform_resources))
        .unwrap_or(platform_resources);
    VmNode {
        hostname: decl
            .and_then(|d| d.hostname.clone())
            .unwrap_or_else(|| hostname_for(&pending.name)),
        ssh_port: decl.and_then(|d| d.ssh_port.as_ref().map(|p| p.value)),
        forwards: decl
            .map(|d| d.forwards.iter().map(|f| f.value).collect())
            .unwrap_or_default(),
        user_network: decl.is_none_or(|d| d.user_network),
        nics: decl
            .map(|d| {
                d.nics
                    .iter()
                    .map(|n| NicNode {
                        network: n.network.value.clone(),
                        ip: n.ip.as_ref().map(|i| i.value),
                        gateway: n.gateway,
                        mac: n.mac.as_ref().map(|m| m.value),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        attach: decl.map(|d| attachments(&d.attach)).unwrap_or_default(),
        resources,
        is_hypervisor: false,
        name: pending.name,
        platform: pending.platform,
        target: pending.target,
        placement: pending.placement,
        level: pending.level,
        origin: pending.origin,
    }
}

/// A valid hostname from a VM name: underscores are not allowed in hostnames.
pub fn hostname_for(vm_name: &str) -> String {
    vm_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Ports forwarded on one hypervisor's 127.0.0.1 must be distinct.
fn check_ports(topology: &Topology, config: &Config, problems: &mut Vec<Diagnostic>) {
    let mut taken: BTreeMap<(Placement, u16), (String, Origin)> = BTreeMap::new();
    for decl in config.vms.values() {
        let Some(vm) = topology.vms.get(&decl.name.value) else {
            continue;
        };
        let ports = decl
            .ssh_port
            .iter()
            .map(|p| (p.value, p.at.clone()))
            .chain(decl.forwards.iter().map(|f| (f.value.host, f.at.clone())));
        for (port, at) in ports {
            let key = (vm.placement.clone(), port);
            if let Some((other, first)) = taken.get(&key) {
                problems.push(
                    Diagnostic::new(
                        format!(
                            "Port {port} on `{}` is forwarded to both `{other}` and `{}`",
                            vm.placement.name(),
                            vm.name
                        ),
                        at,
                    )
                    .related(first.clone(), format!("`{other}` takes it here"))
                    .hint("give each VM its own port, or leave `ssh_port` out to get a free one"),
                );
            } else {
                taken.insert(key, (vm.name.clone(), at));
            }
        }
    }
}

/// Addresses on a network must lie in its subnet and be unique; MACs likewise.
fn check_addresses(config: &Config, topology: &Topology, problems: &mut Vec<Diagnostic>) {
    let mut seen_ip: BTreeMap<(String, std::net::IpAddr), Origin> = BTreeMap::new();
    let mut seen_mac: BTreeMap<(String, String), Origin> = BTreeMap::new();
    let mut check_ip = |network: &str, ip: &Located<IpCidr>, problems: &mut Vec<Diagnostic>| {
        if let Some(net) = config.networks.get(network) {
            let super::config::NetworkKind::Vde { subnet, .. } = &net.kind;
            if let Some(subnet) = subnet
                && !subnet.contains(ip.value.addr)
            {
                problems.push(
                    Diagnostic::new(
                        format!(
                            "Address {} is outside the subnet {subnet} of network `{network}`",
                            ip.value
                        ),
                        ip.at.clone(),
                    )
                    .hint(format!("pick an address in {subnet}")),
                );
            }
        }
        let key = (network.to_string(), ip.value.addr);
        if let Some(first) = seen_ip.get(&key) {
            problems.push(
                Diagnostic::new(
                    format!(
                        "Address {} is used twice on network `{network}`",
                        ip.value.addr
                    ),
                    ip.at.clone(),
                )
                .related(first.clone(), "first used here"),
            );
        } else {
            seen_ip.insert(key, ip.at.clone());
        }
    };
    for host in config.hosts.values() {
        for a in &host.attach {
            check_ip(&a.network.value, &a.address, problems);
        }
    }
    for decl in config.vms.values() {
        if !topology.vms.contains_key(&decl.name.value) {
            continue;
        }
        for a in &decl.attach {
            check_ip(&a.network.value, &a.address, problems);
        }
        for nic in &decl.nics {
            if let Some(ip) = &nic.ip {
                check_ip(&nic.network.value, ip, problems);
            }
            if let Some(mac) = &nic.mac {
                let key = (nic.network.value.clone(), mac.value.to_string());
                if let Some(first) = seen_mac.get(&key) {
                    problems.push(
                        Diagnostic::new(
                            format!(
                                "MAC address {} is used twice on network `{}`",
                                mac.value, nic.network.value
                            ),
                            mac.at.clone(),
                        )
                        .related(first.clone(), "first used here"),
                    );
                } else {
                    seen_mac.insert(key, mac.at.clone());
                }
            }
        }
    }
}

/// Every VM must be reachable by ssh, a switched network lives on one site, and only a
/// site that runs VMs can attach to their networks.
fn check_network_sites(config: &Config, topology: &Topology, problems: &mut Vec<Diagnostic>) {
    let mut switch_sites: BTreeMap<&str, (Placement, &str)> = BTreeMap::new();
    for vm in topology.vms.values() {
        if super::network::ssh_route(topology, vm).is_none() {
            let site = vm.placement.name();
            let hint = match vm.nics.iter().find(|n| n.ip.is_some()) {
                Some(nic) => format!(
                    "attach `{site}` to `{net}` (`attach = {{ {net} = \"ADDRESS/PREFIX\" }}` on `{site}`), or drop `user_network = false`",
                    net = nic.network
                ),
                None => "give it a NIC with a static address (`nics = [{ network = \"NAME\", ip = \"ADDRESS/PREFIX\" }]`) on a network its hypervisor attaches, or drop `user_network = false`".to_string(),
            };
            problems.push(
                Diagnostic::new(
                    format!(
                        "VM `{}` has no user networking and no static address on a network `{site}` attaches, so nothing can reach it by ssh",
                        vm.name
                    ),
                    vm.origin.clone(),
                )
                .hint(hint),
            );
        }
        for nic in &vm.nics {
            let Some(network) = config.networks.get(&nic.network) else {
                continue;
            };
            let super::config::NetworkKind::Vde { url: None, .. } = &network.kind else {
                continue;
            };
            match switch_sites.get(nic.network.as_str()) {
                Some((site, other)) if *site != vm.placement => problems.push(
                    Diagnostic::new(
                        format!(
                            "Network `{}` is a switch farm runs on one host, but `{}` (on `{}`) and `{}` (on `{}`) both use it",
                            nic.network,
                            other,
                            site.name(),
                            vm.name,
                            vm.placement.name()
                        ),
                        network.name.at.clone(),
                    )
                    .hint("give the network a `url = \"vxvde://…\"` to span hosts, or declare one network per host"),
                ),
                Some(_) => {}
                None => {
                    switch_sites.insert(&nic.network, (vm.placement.clone(), &vm.name));
                }
            }
        }
    }
    for decl in config.vms.values() {
        let (Some(vm), Some(first)) = (topology.vms.get(&decl.name.value), decl.attach.first())
        else {
            continue;
        };
        if !vm.is_hypervisor {
            problems.push(
                Diagnostic::new(
                    format!(
                        "VM `{}` attaches to `{}` but runs no VMs: `attach` joins a hypervisor to the networks of its own VMs",
                        vm.name, first.network.value
                    ),
                    first.network.at.clone(),
                )
                .hint(format!(
                    "to put `{}` itself on the network, give it a NIC: `nics = [{{ network = \"{}\", ip = \"…\" }}]`",
                    vm.name, first.network.value
                )),
            );
        }
    }
}

/// A platform whose base image is for one architecture cannot run on a target of another.
fn check_arch(config: &Config, topology: &Topology, problems: &mut Vec<Diagnostic>) {
    let mut reported = BTreeSet::new();
    for vm in topology.vms.values() {
        let (Some(target), Some(image)) = (
            config.targets.get(&vm.target),
            base_image_of(config, &vm.platform),
        ) else {
            continue;
        };
        if let Some(arch) = image.arch
            && arch != target.arch
            && reported.insert((vm.platform.clone(), vm.target.clone()))
        {
            problems.push(
                Diagnostic::new(
                    format!(
                        "VM `{}` runs platform `{}` on target `{}` ({}), but its image `{}` is for {arch}",
                        vm.name, vm.platform, vm.target, target.arch, image.name.value
                    ),
                    vm.origin.clone(),
                )
                .hint("deploy the platform on a target of the image's architecture"),
            );
        }
    }
}

/// Follows `from` to the image at the bottom of a platform's chain (None on cycles/unknowns).
pub fn base_image_of<'a>(config: &'a Config, platform: &str) -> Option<&'a super::config::Image> {
    let mut current = platform;
    for _ in 0..=config.platforms.len() {
        match config.platforms.get(current) {
            Some(p) => current = &p.from.value,
            None => return config.images.get(current),
        }
    }
    None
}

/// A remote host's ssh settings only mean something with an address; its root must be
/// absolute (it is used from ssh commands, with no working directory to be relative to);
/// and its name is an ssh_config alias, so it cannot also be a VM's.
fn check_remote_hosts(config: &Config, topology: &Topology, problems: &mut Vec<Diagnostic>) {
    for host in config.hosts.values() {
        let name = &host.name.value;
        if host.address.is_none() {
            let settings = [
                ("identity_file", &host.identity_file),
                ("known_hosts", &host.known_hosts),
                ("root", &host.root),
            ];
            for (key, value) in settings {
                if let Some(value) = value {
                    problems.push(
                        Diagnostic::new(
                            format!("Host `{name}` has `{key}` but no `address`: it is this machine, which farm does not reach over ssh"),
                            value.at.clone(),
                        )
                        .hint(format!("add `address = \"user@server\"` to `[hosts.{name}]`, or remove `{key}`")),
                    );
                }
            }
        }
        if let Some(root) = &host.root
            && !root.value.starts_with('/')
        {
            problems.push(
                Diagnostic::new(
                    format!("Host `{name}` has a relative `root` `{}`", root.value),
                    root.at.clone(),
                )
                .hint(format!(
                    "give an absolute path on the host, such as `{REMOTE_ROOT}`"
                )),
            );
        }
        if host.address.is_some() && topology.vms.contains_key(name) {
            problems.push(
                Diagnostic::new(
                    format!("Host `{name}` has the same name as a VM; both would be `{name}` in the generated ssh_config"),
                    host.name.at.clone(),
                )
                .hint("rename the host or the VM"),
            );
        }
    }
}
