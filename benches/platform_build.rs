//! Platform build time: farm against a hand-written equivalent, in the same run.
//!
//! - farm cold: a platform (`packages = ["tree"]`, a file, two commands) built from the
//!   Debian image, made unique with a nonce file so it is never a cache hit.
//! - hand-written: the same work the way a script would do it: qemu-img overlay, qemu with
//!   direct kernel boot and a seed, a loop on `ssh true`, the same commands over ssh,
//!   poweroff.
//! - farm warm: the last step lives in a child platform; changing only it rebuilds only
//!   that layer.
//!
//! The Debian image comes from the test store (built there if missing, not timed).

#[path = "support/manual_vm.rs"]
#[allow(dead_code)]
mod manual_vm;

use std::path::Path;
use std::time::{Duration, Instant};

use manual_vm::{ManualVm, farm, shared_store};

/// The hand-written baseline: the same work the way a script would do it.
fn hand_written(image_entry: &Path, nonce: &str) -> Duration {
    let started = Instant::now();
    let vm = ManualVm::start(
        image_entry,
        &image_entry.join("boot"),
        Some("8G"),
        // As farm's build VM: 1 GiB, every host core.
        (
            1024,
            std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        ),
    );
    vm.wait_ssh();
    for step in [
        "resize2fs /dev/vda",
        "export DEBIAN_FRONTEND=noninteractive; apt-get -y -q update && apt-get -y -q install --no-install-recommends tree",
        &format!("echo {nonce} > /etc/bench-nonce"),
        "echo one > /etc/bench-one",
        "echo two > /etc/bench-two",
        "apt-get clean; rm -rf /var/lib/apt/lists/*; fstrim -a; sync",
    ] {
        assert!(vm.ssh(step), "baseline step failed: {step}");
    }
    vm.poweroff();
    started.elapsed()
}

fn main() {
    let store = shared_store();
    let project = tempfile::tempdir().unwrap();
    let p = project.path();
    let nonce = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    fs_err::write(p.join("nonce"), &nonce).unwrap();
    let header = "[images.bookworm]\ndebian = { suite = \"bookworm\" }\n[targets.amd64]\narch = \"x86_64\"\n";
    // One layer with every step, as the hand-written script does it.
    let single = |last: &str| {
        format!(
            "{header}[platforms.app]\nfrom = \"bookworm\"\npackages = [\"tree\"]\nfiles = {{ \"/etc/bench-nonce\" = \"nonce\" }}\n\
             run = [\"echo one > /etc/bench-one\", \"echo {last} > /etc/bench-two\"]\n"
        )
    };
    // The same steps with the last one in a child platform: farm's way to cache a prefix.
    let split = |last: &str| {
        format!(
            "{header}[platforms.prefix]\nfrom = \"bookworm\"\npackages = [\"tree\"]\nfiles = {{ \"/etc/bench-nonce\" = \"nonce\" }}\n\
             run = [\"echo one > /etc/bench-one\"]\n[platforms.last]\nfrom = \"prefix\"\nrun = [\"echo {last} > /etc/bench-two\"]\n"
        )
    };
    fs_err::write(p.join("farm.toml"), single("two")).unwrap();
    farm(p, &store, &["build", "-q", "bookworm"]);
    let image = manual_vm::entry(p, &store, "bookworm");

    let baseline = hand_written(&image, &nonce);
    let cold = farm(p, &store, &["build", "-q", "app"]);
    fs_err::write(p.join("farm.toml"), single("three")).unwrap();
    let warm_single = farm(p, &store, &["build", "-q", "app"]);
    fs_err::write(p.join("farm.toml"), split("two")).unwrap();
    farm(p, &store, &["build", "-q", "last"]);
    fs_err::write(p.join("farm.toml"), split("three")).unwrap();
    let warm_split = farm(p, &store, &["build", "-q", "last"]);
    println!(
        "platform build (tree + a file + 2 commands, TCG): farm cold {:.1} s vs hand-written qemu+ssh {:.1} s (ratio {:.2}); \
         after changing only the last step: same layer rebuilt {:.1} s, last step in its own child platform {:.1} s",
        cold.as_secs_f64(),
        baseline.as_secs_f64(),
        cold.as_secs_f64() / baseline.as_secs_f64(),
        warm_single.as_secs_f64(),
        warm_split.as_secs_f64()
    );
}
