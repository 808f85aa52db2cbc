//! Running labs: `farm up`, `down` and `status` carried out on sites (this machine, remote
//! hosts, hypervisor VMs), each a `host::Host`.

pub mod closure;
pub mod host;
pub mod hypervisor;
pub mod instance;
pub mod orchestrator;
pub mod state;
pub mod vde;
