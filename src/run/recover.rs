//! Hypervisor VMs whose kernel panicked while `up` ran. Seen here with KVM inside a guest
//! that itself runs under TCG: now and then L1's kernel overflows a stack in its KVM
//! thread and panics. Its qemu keeps running a dead machine, so ssh through it times out
//! and every VM inside it stops answering; `up` fails with an error about one of those.
//! When `up` fails, the consoles of the hypervisor VMs it started or kept say whether that
//! happened; `up` then stops them and converges once more, which restarts them and the VMs
//! inside them on their overlays (as after any hypervisor's crash).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::model::build::kernel_panic::kernel_panic;
use crate::model::config::topology::Topology;
use crate::model::lab::instance::InstanceSpec;
use crate::model::shell::quote_path;
use crate::run::host::Host;
use crate::run::lab::LabError;
use crate::run::site::Sites;
use crate::run::state::StatePaths;

/// A hypervisor VM found dead, with what its console says.
pub struct Panicked {
    pub vm: String,
    /// The panic and the oops that led to it.
    pub console: String,
    /// Its last record's spec, and the site it runs on: what stopping it needs.
    spec: InstanceSpec,
    host: Arc<dyn Host>,
}

/// The hypervisor VMs among `selected` whose console (read where each runs) ends in a
/// kernel panic. Those that cannot be looked at (their site does not answer) are left out.
pub fn panicked_hypervisors(
    topology: &Topology,
    selected: &BTreeSet<String>,
    paths: &StatePaths,
) -> Vec<Panicked> {
    let mut records = paths.records();
    let sites = Sites::new(topology, &paths.own_ssh_config());
    topology
        .vms
        .values()
        .filter(|vm| vm.is_hypervisor && selected.contains(&vm.name))
        .filter_map(|vm| {
            let spec = records.remove(&vm.name)?.spec;
            let host = sites.connect(&vm.placement).ok()?;
            let console = panic_on_console(host.as_ref(), &spec)?;
            Some(Panicked {
                vm: vm.name.clone(),
                console,
                spec,
                host,
            })
        })
        .collect()
}

/// The kernel panic `spec`'s console ends in, if it does (its last 64 KiB are read: a
/// panic and its oops are a few KiB, a long-running VM's console may be large).
pub fn panic_on_console(host: &dyn Host, spec: &InstanceSpec) -> Option<String> {
    let serial = quote_path(&spec.paths.serial_log());
    let out = host
        .run(&format!("tail -c 65536 {serial} 2>/dev/null"))
        .ok()?;
    kernel_panic(&String::from_utf8_lossy(&out.stdout))
}

/// How long to wait for `spec` to power off before qemu is told to quit: `usual`, or
/// nothing when its console shows a panic (a panicked kernel powers nothing off).
pub fn power_off_timeout(host: &dyn Host, spec: &InstanceSpec, usual: Duration) -> Duration {
    match panic_on_console(host, spec) {
        Some(_) => Duration::ZERO,
        None => usual,
    }
}

impl Panicked {
    /// Stops it at once, so the next plan restarts it with the VMs inside it.
    pub fn stop(&self) -> Result<(), LabError> {
        crate::run::backend::stop_spec(self.host.as_ref(), &self.spec, Duration::ZERO, None)?;
        Ok(())
    }
}
