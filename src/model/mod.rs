//! The pure model: configuration types, derivations and their hashes, topology, plans.
//! Nothing in here performs I/O.

pub mod backend;
pub mod build_steps;
pub mod cache_record;
pub mod chroot;
pub mod config;
pub mod debian_recipe;
pub mod derivation;
pub mod diagnostic;
pub mod first_boot;
pub mod gc;
pub mod graph;
pub mod hash;
pub mod instance;
pub mod inventory;
pub mod kernel_panic;
pub mod libvirt;
pub mod limits;
pub mod lock;
pub mod network;
pub mod observation;
pub mod plan;
pub mod programs;
pub mod provision;
pub mod qemu;
pub mod seed;
pub mod shell;
pub mod signing;
pub mod snapshot;
pub mod ssh_config;
pub mod text;
pub mod tiny_recipe;
pub mod topology;
pub mod up_plan;
pub mod validate;
pub mod values;
