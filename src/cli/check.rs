//! `farm check`: validate farm.toml and show the topology it describes.

use clap::Args;

use crate::model::config::topology::{Placement, Topology};
use crate::model::text::counted;
use crate::project::{Project, ProjectOptions};

#[derive(Debug, Args)]
pub struct CheckArgs {}

pub fn run(options: &ProjectOptions, _args: CheckArgs) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let config = &project.loaded.config;
    println!(
        "`{}` is valid: {}, {}, {}, {}, {}",
        options.config.display(),
        counted(config.images.len(), "image"),
        counted(config.platforms.len(), "platform"),
        counted(config.targets.len(), "target"),
        counted(config.networks.len(), "network"),
        counted(project.loaded.topology.vms.len(), "VM")
    );
    for target in config.targets.values() {
        // The implicit target has no place in the file.
        if target.name.at.span.is_empty() {
            println!(
                "targets: none declared, so `{}` ({}, this machine's architecture)",
                target.name.value, target.arch
            );
        }
    }
    print!("{}", render_tree(&project.loaded.topology));
    Ok(())
}

/// The topology as an indented tree: hosts, then the VMs each runs, at every depth.
pub fn render_tree(topology: &Topology) -> String {
    fn walk(topology: &Topology, placement: &Placement, depth: usize, out: &mut String) {
        for vm in topology.children(placement) {
            let port = vm
                .ssh_port
                .map(|p| format!(", ssh port {p}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "{}{} ({} on {}, L{}{port})\n",
                "  ".repeat(depth),
                vm.name,
                vm.platform,
                vm.target,
                vm.level
            ));
            walk(topology, &Placement::Vm(vm.name.clone()), depth + 1, out);
        }
    }
    let mut out = String::new();
    for host in topology.hosts.keys() {
        out.push_str(&format!("{host} (host)\n"));
        walk(topology, &Placement::Host(host.clone()), 1, &mut out);
    }
    out
}
