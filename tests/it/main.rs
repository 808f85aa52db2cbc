//! farm's integration tests, as one test binary: the library links once, and fixtures
//! (test images, labs) are shared by every test of a run (see docs/TESTING.md).

mod support;

mod aarch64;
mod archive;
mod binary_cache;
mod build_cli;
mod build_vm;
mod bundle;
mod check;
mod clients;
mod closure;
mod cloud_image;
mod config;
mod converge;
mod converged;
mod debian_image;
mod derivation;
mod disk_full;
mod fetch;
mod fixtures;
mod gc;
mod hostile_site;
mod image_export;
mod lab_suite;
mod lab_test;
mod layering;
mod libvirt;
mod nested;
mod observe;
mod playbook;
mod read_only;
mod recovery;
mod remote_host;
mod snapshot;
mod step_cache;
mod store;
mod tiny_image;
mod two_sites;
mod up;
mod up_plan;
mod vde;
mod verbs;
mod verify;
