//! The topology as a Graphviz DOT graph, for people who would rather look than read: hosts
//! as boxes, VMs as rounded boxes inside the hypervisor that runs them (edges "runs"), VDE
//! networks as ellipses joined to every VM NIC and hypervisor attachment on them, with the
//! addresses as edge labels.

use std::fmt::Write;

use crate::model::config::topology::{Placement, Topology};
use crate::model::config::{Config, NetworkKind};

/// DOT ids are quoted; names in farm.toml are plain, but quote marks must not break out.
fn id(kind: &str, name: &str) -> String {
    format!("\"{kind}:{}\"", name.replace('"', "\\\""))
}

/// A quoted label; line breaks become DOT's `\n` escape.
fn label(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\\\"").replace('\n', "\\n"))
}

pub fn render_dot(config: &Config, topology: &Topology) -> String {
    let mut out = String::from(
        "digraph farm {\n  rankdir=TB;\n  node [fontname=\"Helvetica\", fontsize=11];\n  edge [fontname=\"Helvetica\", fontsize=9];\n",
    );
    for host in topology.hosts.values() {
        let detail = host
            .remote
            .as_ref()
            .map_or_else(|| "this machine".to_string(), |r| r.address.to_string());
        let _ = writeln!(
            out,
            "  {} [shape=box, style=bold, label={}];",
            id("host", &host.name),
            label(&format!("{}\n({detail})", host.name))
        );
    }
    for vm in topology.vms.values() {
        let mut text = format!(
            "{}\n{} on {}, L{}",
            vm.name, vm.platform, vm.target, vm.level
        );
        if let Some(port) = vm.ssh_port {
            let _ = write!(text, "\nssh :{port}");
        }
        let shape = if vm.is_hypervisor {
            "box, style=\"rounded,bold\""
        } else {
            "box, style=rounded"
        };
        let _ = writeln!(
            out,
            "  {} [shape={shape}, label={}];",
            id("vm", &vm.name),
            label(&text)
        );
        let parent = match &vm.placement {
            Placement::Host(h) => id("host", h),
            Placement::Vm(v) => id("vm", v),
        };
        let _ = writeln!(
            out,
            "  {parent} -> {} [label=\"runs\"];",
            id("vm", &vm.name)
        );
    }
    for (name, network) in &config.networks {
        let NetworkKind::Vde { url, subnet } = &network.kind;
        let mut text = format!(
            "{name}\nVDE {}",
            url.as_ref().map_or("switch", |u| u.value.as_str())
        );
        if let Some(subnet) = subnet.as_ref().map(|s| s.value) {
            let _ = write!(text, "\n{subnet}");
        }
        let _ = writeln!(
            out,
            "  {} [shape=ellipse, style=dashed, label={}];",
            id("net", name),
            label(&text)
        );
    }
    let nic_edge = |out: &mut String, from: String, network: &str, address: Option<String>| {
        let _ = writeln!(
            out,
            "  {from} -> {} [dir=none, style=dashed, label={}];",
            id("net", network),
            label(&address.unwrap_or_default())
        );
    };
    for vm in topology.vms.values() {
        for nic in &vm.nics {
            nic_edge(
                &mut out,
                id("vm", &vm.name),
                &nic.network,
                nic.ip.map(|ip| ip.to_string()),
            );
        }
        for (network, ip) in &vm.attach {
            nic_edge(
                &mut out,
                id("vm", &vm.name),
                network,
                Some(format!("{ip} (tap)")),
            );
        }
    }
    for host in topology.hosts.values() {
        for (network, ip) in &host.attach {
            nic_edge(
                &mut out,
                id("host", &host.name),
                network,
                Some(format!("{ip} (tap)")),
            );
        }
    }
    out.push_str("}\n");
    out
}
