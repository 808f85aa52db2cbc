//! Validation: every reference resolves, nothing is defined twice, the platform graph has no
//! cycle, no two VMs on one hypervisor forward the same port. Produces the `Topology`.
//!
//! Pure: all problems are collected (not just the first) and located in the source.

mod checks;
mod expand;

use std::collections::BTreeSet;

use crate::model::config::diagnostic::{Diagnostic, list_names};
use crate::model::config::topology::Topology;
use crate::model::config::{Attachment, Config, Located};

use checks::*;
pub use checks::{base_image_of, firmware_of};
use expand::expand_topology;
pub use expand::hostname_for;

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
    check_backends(config, &topology, &mut problems);
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
