//! farm: a declarative builder of VM images with a content-addressed store, and an
//! orchestrator for nested VM labs. See `docs/ARCHITECTURE.md` for the shape of the code.
//!
//! Pure model (`model`, `config` parsing) is kept apart from effects (`store`, `fetch`,
//! `qemu_img`, `realise`): every command loads, validates, plans, then prints or applies.

pub mod builder;
pub mod cli;
pub mod closure;
pub mod config;
pub mod debian_image;
pub mod fetch;
pub mod host;
pub mod hostinfo;
pub mod hypervisor;
pub mod inputs;
pub mod instance;
pub mod keys;
pub mod model;
pub mod mounts;
pub mod orchestrator;
pub mod progress;
pub mod project;
pub mod qemu_img;
pub mod qmp;
pub mod realise;
pub mod remote_host;
pub mod seed;
pub mod ssh;
pub mod state;
pub mod store;
pub mod tiny_image;
pub mod tool_log;
pub mod vde;
pub mod vm_process;
