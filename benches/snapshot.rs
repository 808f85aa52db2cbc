//! Whole-lab snapshots of the bundled farm.toml (L1 hypervisor VM, an L2 on user networking,
//! an L2 on vxvde), in one run: the warm-store `farm up` to every VM answering ssh (the
//! baseline: what every CI job or test pays for a clean lab), `farm snapshot save --stop`,
//! and `farm snapshot restore` to every VM answering ssh, from a stopped lab and again over
//! a running one (median of 3). Target: restore <= 5 s against ~42 s for the warm up.
//!
//! Set FARM_BENCH_STORE to a store that holds the bundled lab to skip building it (the
//! first `up` builds what is missing and is not timed).

#[path = "support/manual_vm.rs"]
#[allow(dead_code)]
mod manual_vm;

use std::time::Duration;

use manual_vm::farm;

fn main() {
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    manual_vm::copy_bundled_lab(dir, "");
    let fresh = tempfile::tempdir().unwrap();
    let store = std::env::var_os("FARM_BENCH_STORE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| fresh.path().join("cache"));

    // Build (and boot once) untimed, so the baseline is the warm-store figure.
    farm(dir, &store, &["up", "-q"]);
    farm(dir, &store, &["down", "-q", "--timeout", "30"]);
    let warm_up = farm(dir, &store, &["up", "-q"]);
    let save = farm(dir, &store, &["snapshot", "save", "bench", "--stop", "-q"]);
    let from_stopped = farm(dir, &store, &["snapshot", "restore", "bench", "-q"]);
    let mut over_running: Vec<Duration> = (0..3)
        .map(|_| farm(dir, &store, &["snapshot", "restore", "bench", "-q"]))
        .collect();
    over_running.sort();
    let over_running = over_running[1];
    farm(dir, &store, &["down", "-q", "--timeout", "30"]);
    farm(dir, &store, &["snapshot", "rm", "bench", "-q"]);

    let s = |d: Duration| d.as_secs_f64();
    println!(
        "bundled lab (L1 + 2 L2s, TCG): warm `farm up` to all ssh-ready {:.1} s; `snapshot save --stop` {:.1} s; \
         `snapshot restore` to all ssh-ready {:.1} s from a stopped lab, {:.1} s over a running one (median of 3); \
         restore / warm up = {:.2}x (target: restore <= 5 s)",
        s(warm_up),
        s(save),
        s(from_stopped),
        s(over_running),
        s(from_stopped) / s(warm_up)
    );
}
