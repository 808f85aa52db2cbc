//! farm: a declarative builder of VM images with a content-addressed store, and an
//! orchestrator for nested VM labs. See `docs/ARCHITECTURE.md` for the shape of the code.
//!
//! Each folder is a floor that only uses the floors below it:
//!
//! - `cli` — clap; one thin file per subcommand.
//! - `testing` — the verbs as a Rust API (`Lab`, `Vm`), for tests written in Rust.
//! - `fuzz` — fuzz targets for every parser of bytes farm did not write, and their driver.
//! - `image_export` — a built platform as one standalone disk (`farm image export`).
//! - `maintain` — looking after the store: gc, verify and repair.
//! - `run` — applies `farm up`/`down` plans: sites, instances, closure push, networks, hosts.
//! - `build` — realises build plans: layers, Debian and tiny images, substitution, one tool runner.
//! - `binary_cache` — pushing to and substituting from binary caches.
//! - `project`, `store`, `fetch`, `config`, `progress` — loading, the store, downloads,
//!   farm.toml, the one reporter.
//! - `sys` — thin wrappers over outside programs: ssh, qmp, qemu-img, keys, processes.
//! - `model` — pure: configuration, derivations, topology, plans, qemu argv as data.

pub mod binary_cache;
pub mod build;
pub mod cli;
pub mod config;
pub mod fetch;
pub mod fuzz;
pub mod image_export;
pub mod maintain;
pub mod model;
pub mod progress;
pub mod project;
pub mod run;
pub mod store;
pub mod sys;
pub mod testing;
