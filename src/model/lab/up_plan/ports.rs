//! Ports on a site's 127.0.0.1 for its VMs' forwarded ssh: fixed ones from farm.toml, the
//! port a VM already had while it is still free (so ssh_config stays valid), otherwise a
//! free port chosen stably from the project and the VM's name. And the check that every
//! port a starting VM needs is free or about to be freed by farm itself.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use super::{Desired, SiteLayout, VmAction, VmStep};
use crate::model::config::topology::VmNode;
use crate::model::lab::observation::SiteObservation;

/// Where farm picks ssh forward ports when farm.toml fixes none.
pub const PORT_RANGE: Range<u16> = 20000..30000;

/// A free port for `key` (project and VM): the same one while it stays free, skipping
/// `used` ports.
pub fn pick_port(key: &str, used: &BTreeSet<u16>) -> Option<u16> {
    let span = (PORT_RANGE.end - PORT_RANGE.start) as u32;
    let hash = blake3::hash(key.as_bytes());
    let start = u32::from_le_bytes(hash.as_bytes()[..4].try_into().expect("4 bytes")) % span;
    (0..span)
        .map(|i| PORT_RANGE.start + ((start + i) % span) as u16)
        .find(|p| !used.contains(p))
}

/// The ssh port of every VM with user networking on the site.
pub fn choose(
    desired: &Desired,
    layout: &SiteLayout,
    vms: &[&VmNode],
    seen: &SiteObservation,
) -> BTreeMap<String, u16> {
    let fixed: BTreeSet<u16> = vms
        .iter()
        .flat_map(|vm| {
            vm.ssh_port
                .into_iter()
                .chain(vm.forwards.iter().map(|f| f.host))
        })
        .collect();
    let mut chosen: BTreeMap<String, u16> = BTreeMap::new();
    for vm in vms.iter().filter(|vm| vm.user_network) {
        if let Some(port) = vm.ssh_port {
            chosen.insert(vm.name.clone(), port);
        }
    }
    for vm in vms
        .iter()
        .filter(|vm| vm.user_network && vm.ssh_port.is_none())
    {
        let mut taken: BTreeSet<u16> = fixed.clone();
        taken.extend(chosen.values().copied());
        let observed = seen.instances.get(&vm.name);
        let recorded = observed
            .and_then(|o| o.record.as_ref().ok())
            .and_then(|r| r.spec.ssh_port());
        // The port it had, unless something else took it: its own running qemu holds it.
        let keeps = recorded.filter(|p| {
            !taken.contains(p)
                && (!seen.listening.contains(p) || observed.is_some_and(|o| o.running()))
        });
        let port = keeps.or_else(|| {
            taken.extend(seen.listening.iter().copied());
            let key = format!(
                "{}\0{}\0{}",
                desired.project_tag(),
                layout.state_dir.display(),
                vm.name
            );
            pick_port(&key, &taken)
        });
        if let Some(port) = port {
            chosen.insert(vm.name.clone(), port);
        }
    }
    chosen
}

/// A problem for each port a starting VM needs that something else listens on. A port is
/// fine when the VM's own qemu holds it, or another VM's qemu that farm stops first.
pub fn conflicts(site: String, steps: &[VmStep], seen: &SiteObservation) -> Vec<String> {
    let freed: BTreeSet<u16> = steps
        .iter()
        .filter(|s| s.action != VmAction::Keep && s.running.is_some())
        .filter_map(|s| s.previous.as_ref())
        .flat_map(|p| p.site_ports())
        .collect();
    let mut problems = Vec::new();
    for step in steps.iter().filter(|s| s.action != VmAction::Keep) {
        for port in step.spec.site_ports() {
            if seen.listening.contains(&port) && !freed.contains(&port) {
                problems.push(format!(
                    "Port {port} on 127.0.0.1 of host `{site}`, wanted by VM `{}`, is already in use\nhint: stop what uses it, or change `ssh_port`/`forwards` of `{}` in farm.toml",
                    step.name, step.name
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_ports_are_stable_and_avoid_used_ones() {
        let none = BTreeSet::new();
        let first = pick_port("p\0l2", &none).unwrap();
        assert_eq!(pick_port("p\0l2", &none), Some(first));
        assert!(PORT_RANGE.contains(&first));
        let next = pick_port("p\0l2", &BTreeSet::from([first])).unwrap();
        assert_ne!(next, first);
        assert_ne!(pick_port("q\0l2", &none), Some(first), "projects differ");
    }
}
