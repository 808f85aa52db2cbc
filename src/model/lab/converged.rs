//! The converged snapshot as data. With `[lab] converged_snapshot = true`, `farm up` saves
//! the lab as the snapshot `converged` once it converged it from nothing (every VM created,
//! every playbook applied), and a later `up` that finds the whole lab down starts it from
//! that snapshot in seconds instead of booting every level again.
//!
//! Booting is most of a warm `up` under TCG, and what it arrives at is a function of what
//! farm.toml says: the snapshot is a cache of that function. Its key is everything the
//! converged lab is made from that a saved record does not carry: each VM's place, layer
//! (derivation and disk bytes), declared hardware and NICs, its platform's defaults, its
//! playbook's content, the networks, `--accel`, and this farm's version. Another key is
//! another lab: it boots, and `up` saves the snapshot anew.
//!
//! Pure: `run::converged` reads and writes the snapshot.

use std::collections::BTreeMap;

use crate::model::config::topology::Placement;
use crate::model::lab::up_plan::{Desired, UpPlan, VmAction};

/// The snapshot's name, which `farm snapshot ls` shows and `farm test` starts from.
pub const CONVERGED: &str = "converged";

/// The file beside the snapshot's manifest that holds the key it was saved under; a
/// snapshot named `converged` without one is the user's, and farm leaves it alone.
pub const KEY_FILE: &str = "up-key";

/// The key of the lab `desired` describes, with `playbooks` the content hash of each VM's
/// playbook (by VM name) and `version` farm's own.
pub fn converged_key(
    desired: &Desired<'_>,
    playbooks: &BTreeMap<String, String>,
    version: &str,
) -> String {
    let mut hasher = blake3::Hasher::new_derive_key("farm 2026 converged snapshot");
    let mut line = |text: String| {
        hasher.update(text.as_bytes());
        hasher.update(b"\n");
    };
    line(format!("farm {version}"));
    // A machine state loads only into the devices it was saved with.
    line(format!(
        "snapshot format {}",
        crate::model::lab::snapshot::SNAPSHOT_FORMAT
    ));
    line(format!("accel {:?}", desired.accel));
    for vm in desired.topology.vms.values() {
        let layer = desired
            .layers
            .get(&(vm.platform.clone(), vm.target.clone()));
        line(format!(
            "vm {} {:?} level {} layer {:?} {:?}",
            vm.name,
            vm.placement,
            vm.level,
            layer.map(|l| &l.entry),
            layer
                .and_then(|l| l.blake3.as_ref())
                .map(ToString::to_string),
        ));
        line(format!(
            "  host {} ssh {:?} forwards {:?} user {} nics {:?} {:?} attach {:?}",
            vm.hostname,
            vm.ssh_port,
            vm.forwards,
            vm.user_network,
            vm.nics,
            vm.libvirt_nics,
            vm.attach,
        ));
        line(format!(
            "  resources {:?} platform {:?} backend {:?} playbook {:?}",
            vm.resources,
            desired.config.platform_resources(&vm.platform),
            vm.guest_backend,
            playbooks.get(&vm.name),
        ));
    }
    for (name, network) in &desired.config.networks {
        let crate::model::config::NetworkKind::Vde { url, subnet } = &network.kind;
        line(format!(
            "network {name} vde {:?} {:?}",
            url.as_ref().map(|u| &u.value),
            subnet.as_ref().map(|s| s.value.to_string()),
        ));
    }
    format!("blake3-{}", hasher.finalize().to_hex())
}

/// The lab runs nothing of what `plan` brings up on this machine or its hosts: every VM
/// there is created anew (no overlay kept, nothing running), so the VMs inside them are new
/// too. Only such an `up` may start from the snapshot, or save it.
pub fn from_nothing(plan: &UpPlan) -> bool {
    let mut vms = plan
        .sites
        .iter()
        .filter(|s| matches!(s.placement, Placement::Host(_)))
        .flat_map(|s| &s.vms)
        .peekable();
    vms.peek().is_some()
        && vms.all(|v| v.action == VmAction::Create && v.previous.is_none() && v.running.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_plan_is_not_from_nothing() {
        assert!(!from_nothing(&UpPlan::default()));
    }
}
