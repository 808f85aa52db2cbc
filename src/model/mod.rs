//! The pure model: configuration types, derivations and their hashes, topology, plans.
//! Nothing in here performs I/O.
//!
//! Three floors, each using only those below it and the leaves here (`tests/it/layering.rs`
//! checks it):
//! - [`config`]: farm.toml as farm understands it, its value rules, validation and topology;
//! - [`build`]: derivations, build plans and recipes, and the qemu a build VM runs;
//! - [`lab`]: instances, what `up`, `down` and snapshots plan, and what is written for users
//!   (ssh_config, inventories).

pub mod build;
pub mod config;
pub mod hash;
pub mod lab;
pub mod programs;
pub mod shell;
pub mod signing;
pub mod text;
pub mod values;
