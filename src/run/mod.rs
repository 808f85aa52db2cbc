//! Running labs: `farm up`, `down` and `status` carried out on sites (this machine, remote
//! hosts, hypervisor VMs), each a `host::Host`.
//!
//! `up` observes (`observe`), plans (`model::up_plan`, pure) and applies the plan (`up`);
//! instances are the qemu backend (`instance`), layers reach hypervisors by `closure` push,
//! networks are `vde`'s; `state` is the local `.farm/`.

pub mod apply;
pub mod backend;
pub mod boot;
pub mod closure;
pub mod converged;
pub mod down;
pub mod host;
pub mod instance;
pub mod lab;
pub mod lab_test;
pub mod layers;
pub mod observe;
pub mod parallel;
pub mod provision;
pub mod recover;
pub mod site;
pub mod snapshot;
pub mod ssh_files;
pub mod state;
pub mod status;
pub mod up;
pub mod vde;
pub mod verbs;
