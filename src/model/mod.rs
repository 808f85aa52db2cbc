//! The pure model: configuration types, derivations and their hashes, topology, plans.
//! Nothing in here performs I/O.

pub mod config;
pub mod derivation;
pub mod diagnostic;
pub mod hash;
pub mod plan;
pub mod topology;
pub mod validate;
pub mod values;
