//! farm: a declarative builder of VM images with a content-addressed store, and an
//! orchestrator for nested VM labs. See `docs/ARCHITECTURE.md` for the shape of the code.
//!
//! Pure model (`model`, `config` parsing) is kept apart from effects (`store`, `fetch`,
//! `qemu_img`, `realise`): every command loads, validates, plans, then prints or applies.

pub mod cli;
pub mod config;
pub mod fetch;
pub mod inputs;
pub mod model;
pub mod progress;
pub mod project;
pub mod qemu_img;
pub mod realise;
pub mod store;
