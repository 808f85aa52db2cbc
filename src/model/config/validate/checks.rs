//! Checks on the expanded topology: ports, addresses, where networks live, architectures,
//! remote hosts.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::config::diagnostic::Diagnostic;
use crate::model::config::topology::{Placement, REMOTE_ROOT, Topology};
use crate::model::config::{Config, Located, Origin};
use crate::model::values::IpCidr;

/// Ports forwarded on one hypervisor's 127.0.0.1 must be distinct.
pub(super) fn check_ports(topology: &Topology, config: &Config, problems: &mut Vec<Diagnostic>) {
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
                let (message, hint) = if *other == vm.name {
                    (
                        format!(
                            "Port {port} on `{}` is forwarded twice by `{other}`",
                            vm.placement.name()
                        ),
                        "give each of its forwards its own host port",
                    )
                } else {
                    (
                        format!(
                            "Port {port} on `{}` is forwarded to both `{other}` and `{}`",
                            vm.placement.name(),
                            vm.name
                        ),
                        "give each VM its own port, or leave `ssh_port` out to get a free one",
                    )
                };
                problems.push(
                    Diagnostic::new(message, at)
                        .related(first.clone(), format!("`{other}` takes it here"))
                        .hint(hint),
                );
            } else {
                taken.insert(key, (vm.name.clone(), at));
            }
        }
    }
}

/// Addresses on a network must lie in its subnet and be unique; MACs likewise.
pub(super) fn check_addresses(
    config: &Config,
    topology: &Topology,
    problems: &mut Vec<Diagnostic>,
) {
    let mut seen_ip: BTreeMap<(String, std::net::IpAddr), Origin> = BTreeMap::new();
    let mut seen_mac: BTreeMap<(String, String), Origin> = BTreeMap::new();
    let mut check_ip = |network: &str, ip: &Located<IpCidr>, problems: &mut Vec<Diagnostic>| {
        if let Some(net) = config.networks.get(network) {
            let crate::model::config::NetworkKind::Vde { subnet, .. } = &net.kind;
            if let Some(subnet) = subnet.as_ref() {
                if !subnet.value.contains(ip.value.addr) {
                    problems.push(
                        Diagnostic::new(
                            format!(
                                "Address {} is outside the subnet {} of network `{network}`",
                                ip.value, subnet.value
                            ),
                            ip.at.clone(),
                        )
                        .related(subnet.at.clone(), "the subnet")
                        .hint(format!("pick an address in {}", subnet.value)),
                    );
                } else if ip.value.prefix != subnet.value.prefix {
                    problems.push(
                        Diagnostic::new(
                            format!(
                                "Address {} has prefix /{}, but network `{network}` is {}",
                                ip.value, ip.value.prefix, subnet.value
                            ),
                            ip.at.clone(),
                        )
                        .related(subnet.at.clone(), "the subnet")
                        .hint(format!(
                            "write it as {}/{}",
                            ip.value.addr, subnet.value.prefix
                        )),
                    );
                }
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
            if let Some(gateway) = &nic.gateway {
                let within = nic.ip.as_ref().map(|ip| ip.value);
                match within {
                    Some(ip) if ip.contains(gateway.value) => {}
                    Some(ip) => problems.push(
                        Diagnostic::new(
                            format!(
                                "Gateway {} is outside the NIC's subnet ({ip})",
                                gateway.value
                            ),
                            gateway.at.clone(),
                        )
                        .hint("a gateway must be reachable on the NIC's own subnet"),
                    ),
                    None => problems.push(
                        Diagnostic::new(
                            format!("Gateway {} is given for a NIC without an `ip`", gateway.value),
                            gateway.at.clone(),
                        )
                        .hint("a NIC configured by DHCP gets its gateway from DHCP: give it an `ip`, or drop `gateway`"),
                    ),
                }
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

/// Every VM must be reachable by ssh, a switched network lives on one site, only a site
/// that runs VMs can attach to their networks, and a `vxvde://` network spanning hypervisor
/// VMs has a link to travel on.
pub(super) fn check_network_sites(
    config: &Config,
    topology: &Topology,
    problems: &mut Vec<Diagnostic>,
) {
    for (name, network) in &config.networks {
        if let Err(why) = crate::model::config::network::multicast_links(config, topology, name) {
            let crate::model::config::NetworkKind::Vde { url, .. } = &network.kind;
            let at = url
                .as_ref()
                .map_or(network.name.at.clone(), |u| u.at.clone());
            problems.push(Diagnostic::new(why, at).hint(
                "give each of those hypervisor VMs a NIC on one shared network (e.g. a switch farm runs: `nics = [{ network = \"backbone\" }]`), which farm then names in the url (`/if=nicN`); or append `/if=IFACE` yourself",
            ));
        }
    }
    let mut switch_sites: BTreeMap<&str, (Placement, &str)> = BTreeMap::new();
    for vm in topology.vms.values() {
        if crate::model::config::network::ssh_route(topology, vm).is_none() {
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
            let crate::model::config::NetworkKind::Vde { url: None, .. } = &network.kind else {
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

/// `backend` on a VM says how the VMs it deploys run; on a VM that deploys none it would
/// be read as the VM's own backend, which its host's or hypervisor's `backend` decides.
pub(super) fn check_backends(config: &Config, topology: &Topology, problems: &mut Vec<Diagnostic>) {
    for decl in config.vms.values() {
        let Some(vm) = topology.vms.get(&decl.name.value) else {
            continue;
        };
        if let Some(nic) = decl.libvirt_nics.first()
            && topology.backend_on(&vm.placement).is_qemu()
        {
            let site = vm.placement.name();
            problems.push(
                Diagnostic::new(
                    format!(
                        "VM `{}` has a NIC on libvirt network `{}`, but `{site}` runs its VMs with farm's qemu backend",
                        vm.name, nic.network.value
                    ),
                    nic.network.at.clone(),
                )
                .hint(format!(
                    "set `backend = \"libvirt\"` on `{site}`, or use a VDE network of farm.toml (`{{ network = \"NAME\" }}`)"
                )),
            );
        }
    }
    for decl in config.vms.values() {
        let (Some(vm), Some(backend)) = (topology.vms.get(&decl.name.value), &decl.backend) else {
            continue;
        };
        if !vm.is_hypervisor {
            let site = vm.placement.name();
            problems.push(
                Diagnostic::new(
                    format!(
                        "VM `{}` sets `backend` but runs no VMs: `backend` says how the VMs on a host or hypervisor VM run",
                        vm.name
                    ),
                    backend.at.clone(),
                )
                .hint(format!(
                    "to run `{}` itself under {}, set `backend` on `{site}`, where it runs",
                    vm.name, backend.value
                )),
            );
        }
    }
}

/// A platform whose base image is for one architecture cannot run on a target of another.
pub(super) fn check_arch(config: &Config, topology: &Topology, problems: &mut Vec<Diagnostic>) {
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
pub fn base_image_of<'a>(
    config: &'a Config,
    platform: &str,
) -> Option<&'a crate::model::config::Image> {
    let mut current = platform;
    for _ in 0..=config.platforms.len() {
        match config.platforms.get(current) {
            Some(p) => current = &p.from.value,
            None => return config.images.get(current),
        }
    }
    None
}

/// How a platform's VMs for `arch` start their bootloader when they boot through firmware:
/// what its base image says, or the architecture's default.
pub fn firmware_of(
    config: &Config,
    platform: &str,
    arch: crate::model::values::Arch,
) -> crate::model::values::Firmware {
    base_image_of(config, platform)
        .and_then(|image| image.firmware)
        .unwrap_or(crate::model::values::Firmware::default_for(arch))
}

/// A remote host's ssh settings only mean something with an address; its root must be
/// absolute (it is used from ssh commands, with no working directory to be relative to);
/// and its name is an ssh_config alias, so it cannot also be a VM's.
pub(super) fn check_remote_hosts(
    config: &Config,
    topology: &Topology,
    problems: &mut Vec<Diagnostic>,
) {
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
