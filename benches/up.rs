//! `farm up` to ssh-ready, for 1 and for 4 VMs, against hand-written qemu command lines
//! started the same way (overlay, seed, qemu, poll ssh), in the same run.
//! Targets: farm's overhead within 10% of the baseline; 4 VMs well under 4x one.
//!
//! Guests are farm's tiny image (256 MiB each), as in the lifecycle tests: the figure is then
//! farm's own overhead rather than a Debian boot's noise under TCG.

#[path = "support/manual_vm.rs"]
#[allow(dead_code)]
mod manual_vm;

use std::time::{Duration, Instant};

use manual_vm::{ManualVm, entry, farm, shared_store};

fn lab(vms: usize) -> String {
    let mut toml = String::from(
        "[images.tiny]\ntiny = true\n[targets.amd64]\narch = \"x86_64\"\n\
         [platforms.plain]\nfrom = \"tiny\"\nmemory = \"256M\"\n",
    );
    for i in 0..vms {
        toml.push_str(&format!("[vms.vm{i}]\nplatform = \"plain\"\n"));
    }
    toml
}

fn farm_up(vms: usize) -> Duration {
    let store = shared_store();
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(dir.path().join("farm.toml"), lab(vms)).unwrap();
    farm(dir.path(), &store, &["build", "-q"]);
    let took = farm(dir.path(), &store, &["up", "-q"]);
    farm(dir.path(), &store, &["down", "-q", "--timeout", "20"]);
    took
}

fn manual_up(vms: usize) -> Duration {
    let store = shared_store();
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(dir.path().join("farm.toml"), lab(1)).unwrap();
    let plain = entry(dir.path(), &store, "plain");
    let image = entry(dir.path(), &store, "tiny");
    let started = Instant::now();
    let machines: Vec<ManualVm> = (0..vms)
        .map(|_| ManualVm::start(&plain, &image.join("boot"), None, (256, 1)))
        .collect();
    std::thread::scope(|s| {
        for m in &machines {
            s.spawn(move || m.wait_ssh());
        }
    });
    let took = started.elapsed();
    for m in machines {
        m.poweroff();
    }
    took
}

fn main() {
    let (farm1, manual1) = (farm_up(1), manual_up(1));
    let (farm4, manual4) = (farm_up(4), manual_up(4));
    let s = |d: Duration| d.as_secs_f64();
    println!(
        "up to ssh-ready (tiny image, TCG): 1 VM farm {:.1} s vs hand-written {:.1} s (overhead {:+.0}%); \
         4 VMs farm {:.1} s vs hand-written {:.1} s (overhead {:+.0}%); farm 4 VMs / 1 VM = {:.2}x",
        s(farm1),
        s(manual1),
        (s(farm1) / s(manual1) - 1.0) * 100.0,
        s(farm4),
        s(manual4),
        (s(farm4) / s(manual4) - 1.0) * 100.0,
        s(farm4) / s(farm1)
    );
}
