//! Two hypervisor VMs each running one guest, against one hypervisor VM running both
//! guests: `farm up` brings independent sites up side by side, so the first lab should not
//! take twice as long as the second (on 2 cores under TCG the two hypervisors also compete
//! for the CPU, which this figure shows honestly).
//!
//! Both labs start from a warm store (the L1 layer and the tiny image built) with nothing
//! running: each `farm up` boots its hypervisors, pushes the guests' layers into them and
//! boots the guests. Uses the shared test store (FARM_TEST_STORE).

#[path = "../tests/it/support/labs.rs"]
#[allow(dead_code)]
mod labs;
#[path = "support/manual_vm.rs"]
#[allow(dead_code)]
mod manual_vm;

use std::time::Duration;

use manual_vm::{farm, shared_store};

fn lab(vms: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(dir.path().join("farm.toml"), labs::hypervisor_lab(vms)).unwrap();
    dir
}

/// `farm up` of a lab with nothing running (after building what it needs).
fn up_time(vms: &str) -> Duration {
    let store = shared_store();
    let project = lab(vms);
    let dir = project.path();
    farm(dir, &store, &["build", "-q"]);
    let took = farm(dir, &store, &["up", "-q"]);
    farm(dir, &store, &["down", "-q", "--timeout", "30"]);
    took
}

fn main() {
    let two = up_time(
        "[vms.hv_a]\nplatform = \"debian_vs\"\n[vms.hv_b]\nplatform = \"debian_vs\"\n\
         [vms.a1]\nplatform = \"leaf\"\nhost = \"hv_a\"\n[vms.b1]\nplatform = \"leaf\"\nhost = \"hv_b\"\n",
    );
    let one = up_time(
        "[vms.hv]\nplatform = \"debian_vs\"\n\
         [vms.a1]\nplatform = \"leaf\"\nhost = \"hv\"\n[vms.b1]\nplatform = \"leaf\"\nhost = \"hv\"\n",
    );
    println!(
        "farm up, warm store, TCG: two hypervisor VMs with one guest each {:.0} s; one hypervisor VM with both guests {:.0} s; two / one = {:.2}",
        two.as_secs_f64(),
        one.as_secs_f64(),
        two.as_secs_f64() / one.as_secs_f64()
    );
}
