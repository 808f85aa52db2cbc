//! The build floor of the model: derivations and their hashes, the build plan, the recipes
//! and steps a layer is made of, cache records, gc and lock files, and the qemu a VM runs,
//! with how its first boot is watched. Uses the configuration floor, never the lab.

pub mod boot_watch;
pub mod bootable_disk;
pub mod build_steps;
pub mod cache_record;
pub mod chroot;
pub mod container_disk;
pub mod debian_recipe;
pub mod derivation;
pub mod export;
pub mod first_boot;
pub mod flat_image;
pub mod gc;
pub mod guest_basics;
pub mod kernel_panic;
pub mod lock;
pub mod plan;
pub mod qemu;
pub mod qemu_img;
pub mod seed;
pub mod tiny_recipe;
