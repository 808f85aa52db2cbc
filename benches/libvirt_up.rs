//! `farm up` to ssh-ready for the same tiny VM on the libvirt backend (a domain on a real
//! libvirtd, started here if none runs) and on farm's own qemu backend, in the same run,
//! alternating, several rounds each; then `farm down`. Prints the medians and the ratio
//! libvirt / qemu (what defining and starting through libvirtd costs over a direct exec).

#[path = "../tests/it/support/libvirtd.rs"]
#[allow(dead_code)]
mod libvirtd;
#[path = "support/manual_vm.rs"]
#[allow(dead_code)]
mod manual_vm;

use std::time::Duration;

use manual_vm::{farm, shared_store};

const ROUNDS: usize = 3;

fn lab(backend: &str) -> String {
    format!(
        "[images.tiny]\ntiny = true\n[targets.amd64]\narch = \"x86_64\"\n\
         [platforms.plain]\nfrom = \"tiny\"\nmemory = \"256M\"\n\
         [hosts.L0]\nbackend = \"{backend}\"\n\
         [vms.bench-{backend}-{pid}]\nplatform = \"plain\"\nhost = \"L0\"\n",
        pid = std::process::id()
    )
}

/// One `farm up` to ssh-ready (and its `down`, not timed) on `backend`.
fn up_once(backend: &str) -> (Duration, Duration) {
    let store = shared_store();
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(dir.path().join("farm.toml"), lab(backend)).unwrap();
    farm(dir.path(), &store, &["build", "-q"]);
    let up = farm(dir.path(), &store, &["up", "-q"]);
    let down = farm(dir.path(), &store, &["down", "-q", "--timeout", "20"]);
    (up, down)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let _daemon = libvirtd::Libvirtd::ensure();
    let (mut qemu, mut libvirt) = (Vec::new(), Vec::new());
    let (mut qemu_down, mut libvirt_down) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (up, down) = up_once("qemu");
        qemu.push(up);
        qemu_down.push(down);
        let (up, down) = up_once("libvirt");
        libvirt.push(up);
        libvirt_down.push(down);
    }
    let s = |d: Duration| d.as_secs_f64();
    let (q, l) = (median(qemu), median(libvirt));
    let (qd, ld) = (median(qemu_down), median(libvirt_down));
    println!(
        "up to ssh-ready, tiny VM (256 MiB, TCG), median of {ROUNDS}: libvirt backend {:.1} s vs qemu backend {:.1} s \
         (libvirt/qemu = {:.2}x); down: libvirt {:.1} s vs qemu {:.1} s",
        s(l),
        s(q),
        s(l) / s(q),
        s(ld),
        s(qd)
    );
}
