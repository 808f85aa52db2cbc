//! The pure model: configuration types, derivations and their hashes, topology, plans.
//! Nothing in here performs I/O.

pub mod hash;
