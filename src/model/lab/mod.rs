//! The lab floor of the model: instances and what their sites are observed to hold, the
//! plans of `up`, `down` and snapshots, and what farm writes for people and their tools
//! (ssh_config, Ansible inventories, the topology graph). Uses the build and configuration
//! floors.

pub mod converged;
pub mod down_plan;
pub mod graph;
pub mod instance;
pub mod inventory;
pub mod libvirt;
pub mod observation;
pub mod provision;
pub mod snapshot;
pub mod ssh_config;
pub mod test_report;
pub mod up_plan;
pub mod wait;
pub mod wire;
