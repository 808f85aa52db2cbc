//! Thin wrappers over the outside programs and kernel facilities farm drives: ssh (with a
//! ControlMaster), QMP, qemu-img, ssh-keygen, qemu processes, mounts, files replaced whole, tar entries,
//! facts about this machine. No policy lives here.

pub mod ansible;
pub mod boot_wait;
pub mod files;
pub mod hostinfo;
pub mod keys;
pub mod libvirt;
pub mod mounts;
pub mod process;
pub mod procfs;
pub mod programs;
pub mod qemu_img;
pub mod qmp;
pub mod space;
pub mod ssh;
pub mod tar_entry;
pub mod vm_process;
pub mod wirefilter;
