//! VDE networks as farm runs them, as data.
//!
//! A network lives on a *site*: a host, or the inside of a hypervisor VM. There farm runs
//! what the network needs — a `vde_switch` for a switched network, nothing for a vdeplug4
//! URL such as `vxvde://234.0.0.1` — plus a tap when the site itself attaches (`attach`),
//! so the hypervisor gets an address on the network and can reach VMs that have no user
//! networking. This module decides which networks a site needs, how qemu and the tap plug
//! into each, and how a VM is reached by ssh; `crate::run::vde` carries it out.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::model::config::topology::{Placement, Topology, VmNode};
use crate::model::config::{Config, NetworkKind};
use crate::model::values::mac_for;
use crate::model::values::{IpCidr, MacAddr};

/// How VMs plug into a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VdeBackend {
    /// A `vde_switch` farm starts on the site, its control directory in farm's state.
    Switch,
    /// A vdeplug4 URL (`vxvde://…`, `vde://…`, …): nothing to run.
    Url(String),
}

/// One network on one site, with everything farm starts for it there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteNetwork {
    pub name: String,
    pub backend: VdeBackend,
    /// The site's own address on the network (a tap), from its `attach`.
    pub attach: Option<IpCidr>,
    /// VMs on the site with a NIC on the network.
    pub users: Vec<String>,
}

impl SiteNetwork {
    /// The directory farm keeps the network's switch, pidfiles and logs in, under the
    /// site's state directory.
    pub fn dir(&self, site_state: &Path) -> PathBuf {
        site_state.join("networks").join(&self.name)
    }

    /// The switch's control directory (`-sock` of vde_switch, `sock=` of qemu).
    pub fn control_dir(&self, site_state: &Path) -> PathBuf {
        self.dir(site_state).join("ctl")
    }

    /// What qemu's `-netdev vde,sock=` and `vde_plug` are given to join the network.
    pub fn plug(&self, site_state: &Path) -> String {
        match &self.backend {
            VdeBackend::Switch => self.control_dir(site_state).display().to_string(),
            VdeBackend::Url(url) => url.clone(),
        }
    }

    /// The tap's interface name: short enough for Linux (15 bytes), distinct per state
    /// directory and network so two projects on one host do not collide, and starting
    /// with `tap` because network managers leave `tap*` alone (farm's own Debian images
    /// run systemd-networkd with DHCP on every other Ethernet link, which would take the
    /// tap's address away).
    pub fn tap_name(&self, site_state: &Path) -> String {
        let hash = blake3::hash(format!("{}\0{}", site_state.display(), self.name).as_bytes());
        format!("tapfarm{}", &hash.to_hex()[..8])
    }
}

/// The networks `site` needs for the VMs placed on it and for its own attachments, sorted
/// by name. A network nobody on the site uses is absent: an attachment alone starts
/// nothing (the network comes up with the VMs that use it).
pub fn site_networks(config: &Config, topology: &Topology, site: &Placement) -> Vec<SiteNetwork> {
    let attach = site_attachments(topology, site);
    let mut networks: Vec<SiteNetwork> = Vec::new();
    for vm in topology.children(site) {
        for nic in &vm.nics {
            let position = networks.iter().position(|n| n.name == nic.network);
            let network = match position {
                Some(i) => &mut networks[i],
                None => {
                    let Some(declared) = config.networks.get(&nic.network) else {
                        continue;
                    };
                    let NetworkKind::Vde { url, .. } = &declared.kind;
                    let link = match (site, multicast_links(config, topology, &nic.network)) {
                        (Placement::Vm(hypervisor), Ok(links)) => links.get(hypervisor).cloned(),
                        _ => None,
                    };
                    networks.push(SiteNetwork {
                        name: nic.network.clone(),
                        backend: url.as_ref().map_or(VdeBackend::Switch, |u| {
                            VdeBackend::Url(match &link {
                                Some(interface) => format!("{}/if={interface}", u.value),
                                None => u.value.clone(),
                            })
                        }),
                        attach: attach
                            .iter()
                            .find(|(n, _)| *n == nic.network)
                            .map(|(_, a)| *a),
                        users: Vec::new(),
                    });
                    networks.last_mut().expect("just pushed")
                }
            };
            if !network.users.contains(&vm.name) {
                network.users.push(vm.name.clone());
            }
        }
    }
    networks.sort_by(|a, b| a.name.cmp(&b.name));
    networks
}

/// Where a network is used: the sites of the VMs with a NIC on it, and the sites that
/// attach to it, by placement.
pub fn network_sites(topology: &Topology, network: &str) -> Vec<Placement> {
    let mut sites: Vec<Placement> = topology
        .vms
        .values()
        .filter(|vm| vm.nics.iter().any(|n| n.network == network))
        .map(|vm| vm.placement.clone())
        .chain(
            topology
                .hosts
                .values()
                .filter(|h| h.attach.iter().any(|(n, _)| n == network))
                .map(|h| Placement::Host(h.name.clone())),
        )
        .chain(
            topology
                .vms
                .values()
                .filter(|vm| vm.attach.iter().any(|(n, _)| n == network))
                .map(|vm| Placement::Vm(vm.name.clone())),
        )
        .collect();
    sites.sort();
    sites.dedup();
    sites
}

/// A `vxvde://` network used inside two or more hypervisor VMs connects only if each sends
/// its multicast out on a link they share: otherwise it leaves through the default route
/// (QEMU user networking) and reaches nobody. When the hypervisor VMs share a network of
/// their own (a NIC of each on it), this gives, per hypervisor VM, that NIC's name in the
/// guest (`nicN`, N its place among the seed's NICs); `Err` says what is missing. Networks
/// on one site, on physical hosts only, not `vxvde://`, or with `if=` already chosen need
/// nothing.
pub fn multicast_links(
    config: &Config,
    topology: &Topology,
    network: &str,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let none = std::collections::BTreeMap::new();
    let Some(declared) = config.networks.get(network) else {
        return Ok(none);
    };
    let NetworkKind::Vde { url: Some(url), .. } = &declared.kind else {
        return Ok(none);
    };
    if !url.value.starts_with("vxvde://") || url.value.contains("if=") {
        return Ok(none);
    }
    let sites = network_sites(topology, network);
    let hypervisors: Vec<&VmNode> = sites
        .iter()
        .filter_map(|s| match s {
            Placement::Vm(vm) => topology.vms.get(vm),
            Placement::Host(_) => None,
        })
        .collect();
    if sites.len() < 2 || hypervisors.is_empty() {
        return Ok(none);
    }
    let names = |vms: &[&VmNode]| -> String {
        vms.iter()
            .map(|v| format!("`{}`", v.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if hypervisors.len() != sites.len() {
        return Err(format!(
            "Network `{network}` ({}) is used on this machine or a host and inside hypervisor VMs {}: its multicast cannot leave a hypervisor VM's user networking",
            url.value,
            names(&hypervisors)
        ));
    }
    // A network every hypervisor VM has a NIC on.
    let shared = hypervisors[0]
        .nics
        .iter()
        .map(|n| &n.network)
        .filter(|m| *m != network)
        .find(|m| {
            hypervisors
                .iter()
                .all(|h| h.nics.iter().any(|n| &n.network == *m))
        });
    let Some(shared) = shared else {
        return Err(format!(
            "Network `{network}` ({}) is used inside hypervisor VMs {}, which share no network its multicast could travel on",
            url.value,
            names(&hypervisors)
        ));
    };
    Ok(hypervisors
        .iter()
        .map(|h| {
            let position = h
                .nics
                .iter()
                .position(|n| &n.network == shared)
                .unwrap_or(0);
            let index = position + usize::from(h.user_network);
            (h.name.clone(), format!("nic{index}"))
        })
        .collect())
}

/// The site's own addresses: a host's `attach`, or the hypervisor VM's.
pub fn site_attachments(topology: &Topology, site: &Placement) -> Vec<(String, IpCidr)> {
    match site {
        Placement::Host(host) => topology
            .hosts
            .get(host)
            .map(|h| h.attach.clone())
            .unwrap_or_default(),
        Placement::Vm(vm) => topology
            .vms
            .get(vm)
            .map(|v| v.attach.clone())
            .unwrap_or_default(),
    }
}

/// One VDE NIC of a VM, resolved: its MAC (given or derived) and how it is configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VdeNic {
    pub network: String,
    pub mac: MacAddr,
    pub address: Option<IpCidr>,
    pub gateway: Option<IpAddr>,
}

/// The VM's VDE NICs in declaration order. MACs not given are derived from the VM's name
/// and the NIC's position (index 0 is the user-networking NIC), so they are stable.
pub fn vde_nics(vm: &VmNode) -> Vec<VdeNic> {
    vm.nics
        .iter()
        .enumerate()
        .map(|(i, nic)| VdeNic {
            network: nic.network.clone(),
            mac: nic.mac.unwrap_or_else(|| mac_for(&vm.name, i + 1)),
            address: nic.ip,
            gateway: nic.gateway,
        })
        .collect()
}

/// How farm reaches a VM with ssh from the site it runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SshRoute {
    /// A port of the site's 127.0.0.1 forwarded by user networking.
    Forwarded,
    /// Port 22 of the VM's address on a network the site attaches.
    Direct(IpAddr),
}

/// The route to `vm`: user networking when it has it, else its first static address on
/// a network its site attaches; `None` when neither exists (validation rejects that).
pub fn ssh_route(topology: &Topology, vm: &VmNode) -> Option<SshRoute> {
    if vm.user_network {
        return Some(SshRoute::Forwarded);
    }
    let attached = site_attachments(topology, &vm.placement);
    vm.nics
        .iter()
        .filter(|nic| attached.iter().any(|(n, _)| *n == nic.network))
        .find_map(|nic| nic.ip.map(|ip| SshRoute::Direct(ip.addr)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::topology::{HostNode, NicNode};
    use crate::model::config::{Located, Network, Origin};

    fn vm(name: &str, placement: Placement, user: bool, nics: &[(&str, &str)]) -> VmNode {
        VmNode {
            name: name.into(),
            platform: "p".into(),
            target: "t".into(),
            placement,
            level: 1,
            hostname: name.into(),
            ssh_port: None,
            forwards: Vec::new(),
            user_network: user,
            nics: nics
                .iter()
                .map(|(net, ip)| NicNode {
                    network: net.to_string(),
                    ip: Some(ip.parse().unwrap()),
                    gateway: None,
                    mac: None,
                })
                .collect(),
            libvirt_nics: Vec::new(),
            attach: Vec::new(),
            resources: Default::default(),
            is_hypervisor: false,
            guest_backend: Default::default(),
            playbook: None,
            origin: Origin::default(),
        }
    }

    fn config() -> Config {
        let mut config = Config::default();
        for (name, url) in [("sw", None), ("vx", Some("vxvde://234.0.0.1"))] {
            config.networks.insert(
                name.into(),
                Network {
                    name: crate::model::config::Located::new(name.into(), Origin::default()),
                    kind: NetworkKind::Vde {
                        url: url.map(|u| Located::new(u.to_string(), Origin::default())),
                        subnet: None,
                    },
                },
            );
        }
        config
    }

    fn topology() -> Topology {
        let host = Placement::Host("local".into());
        let mut t = Topology::default();
        t.hosts.insert(
            "local".into(),
            HostNode {
                name: "local".into(),
                remote: None,
                attach: vec![("sw".into(), "10.1.0.254/24".parse().unwrap())],
                backend: Default::default(),
            },
        );
        for v in [
            vm("a", host.clone(), true, &[("sw", "10.1.0.1/24")]),
            vm("b", host.clone(), false, &[("sw", "10.1.0.2/24")]),
            vm("c", host.clone(), false, &[("vx", "10.2.0.3/24")]),
            vm(
                "inner",
                Placement::Vm("a".into()),
                true,
                &[("vx", "10.2.0.9/24")],
            ),
        ] {
            t.vms.insert(v.name.clone(), v);
        }
        t
    }

    #[test]
    fn a_site_runs_the_networks_of_its_own_vms_with_its_attachments() {
        let nets = site_networks(&config(), &topology(), &Placement::Host("local".into()));
        assert_eq!(
            nets,
            vec![
                SiteNetwork {
                    name: "sw".into(),
                    backend: VdeBackend::Switch,
                    attach: Some("10.1.0.254/24".parse().unwrap()),
                    users: vec!["a".into(), "b".into()],
                },
                SiteNetwork {
                    name: "vx".into(),
                    backend: VdeBackend::Url("vxvde://234.0.0.1".into()),
                    attach: None,
                    users: vec!["c".into()],
                },
            ]
        );
        let inside = site_networks(&config(), &topology(), &Placement::Vm("a".into()));
        assert_eq!(inside.len(), 1);
        assert_eq!(inside[0].users, vec!["inner".to_string()]);
    }

    #[test]
    fn switch_plugs_are_the_control_dir_and_urls_are_themselves() {
        let nets = site_networks(&config(), &topology(), &Placement::Host("local".into()));
        let state = Path::new("/p/.farm");
        assert_eq!(nets[0].plug(state), "/p/.farm/networks/sw/ctl");
        assert_eq!(nets[1].plug(state), "vxvde://234.0.0.1");
        let tap = nets[0].tap_name(state);
        assert!(tap.starts_with("tap") && tap.len() <= 15, "{tap}");
        assert_ne!(tap, nets[0].tap_name(Path::new("/other/.farm")));
    }

    #[test]
    fn vde_only_vms_are_reached_through_the_attached_address() {
        let t = topology();
        assert_eq!(ssh_route(&t, &t.vms["a"]), Some(SshRoute::Forwarded));
        assert_eq!(
            ssh_route(&t, &t.vms["b"]),
            Some(SshRoute::Direct("10.1.0.2".parse().unwrap()))
        );
        // `vx` is not attached on the host: no way in.
        assert_eq!(ssh_route(&t, &t.vms["c"]), None);
    }

    #[test]
    fn vxvde_inside_two_hypervisors_goes_out_on_the_network_they_share() {
        let host = Placement::Host("local".into());
        let mut t = topology();
        t.vms.clear();
        for (hv, inner, ip) in [("h1", "x1", "10.2.0.1/24"), ("h2", "x2", "10.2.0.2/24")] {
            t.vms.insert(hv.into(), vm(hv, host.clone(), true, &[]));
            t.vms.insert(
                inner.into(),
                vm(inner, Placement::Vm(hv.into()), true, &[("vx", ip)]),
            );
        }
        let c = config();
        assert_eq!(
            multicast_links(&c, &t, "vx").unwrap_err(),
            "Network `vx` (vxvde://234.0.0.1) is used inside hypervisor VMs `h1`, `h2`, which share no network its multicast could travel on"
        );
        for (hv, ip) in [("h1", "10.1.0.11/24"), ("h2", "10.1.0.12/24")] {
            t.vms
                .insert(hv.into(), vm(hv, host.clone(), true, &[("sw", ip)]));
        }
        let links = multicast_links(&c, &t, "vx").unwrap();
        assert_eq!(links["h1"], "nic1", "after the user NIC");
        let inside = site_networks(&c, &t, &Placement::Vm("h1".into()));
        assert_eq!(
            inside[0].backend,
            VdeBackend::Url("vxvde://234.0.0.1/if=nic1".into())
        );
    }

    #[test]
    fn nic_macs_are_stable_and_distinct_from_the_user_nic() {
        let t = topology();
        let nics = vde_nics(&t.vms["a"]);
        assert_eq!(nics[0].mac, mac_for("a", 1));
        assert_ne!(nics[0].mac, mac_for("a", 0));
        assert_eq!(nics, vde_nics(&t.vms["a"]));
    }
}
