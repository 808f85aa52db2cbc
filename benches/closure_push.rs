//! Closure push against `scp` of the same files through the same jump chain.
//!
//! The hypervisor is the bundled farm.toml's L1 platform (`debian_vs`, a Debian VM with
//! qemu and b3sum) running on a remote host that is a real sshd on 127.0.0.1, so both
//! transfers go L0 → ssh jump through the host → the L1 VM's sshd, as farm's ssh_config
//! routes them. farm's push also hashes every file while sending and has the VM read it back
//! with b3sum before committing; scp only copies. Target: farm ≥ 0.9x scp's speed.
//!
//! Payloads: the closure the bundled topology pushes into L1 (farm's tiny image and an L2
//! layer) and a Debian image (what a KVM lab pushes for Debian L2s).
//!
//! farm's figure is what `farm up` spends on a push: connecting, then `push_missing` (which
//! entries the host lacks is already known from the site's observation, which runs anyway).

#[path = "../tests/it/support/fixture.rs"]
#[allow(dead_code)]
mod fixture;
#[path = "../tests/it/support/guest.rs"]
#[allow(dead_code)]
mod guest;
#[path = "../tests/it/support/labs.rs"]
#[allow(dead_code)]
mod labs;
#[path = "support/manual_vm.rs"]
#[allow(dead_code)]
mod manual_vm;
#[path = "../tests/it/support/sshd.rs"]
#[allow(dead_code)]
mod sshd;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use farm::progress::Reporter;
use farm::run::closure::{HostStore, PushCompression, push_missing};
use farm::run::host::remote::RemoteHost;
use farm::store::{Entry, Store};
use manual_vm::{entry, farm, shared_store};
// `guest` and `fixture` find the test home as `super::test_home`.
use manual_vm::test_home;

fn lab_toml(port: u16, root: &Path) -> String {
    labs::hypervisor_lab(&format!(
        r#"
[hosts.lab]
address = "root@127.0.0.1:{port}"
identity_file = "lab_key"
known_hosts = "lab_known_hosts"
root = "{root}"
[vms.hv]
platform = "debian_vs"
host = "lab"
deploy = {{ targets = ["amd64"], platforms = ["leaf"] }}
"#,
        root = root.display()
    ))
}

/// Store entries by directory, parents first as given.
fn entries(store: &Path, dirs: &[PathBuf]) -> Vec<Entry> {
    let all = Store::open(store).unwrap().entries().unwrap();
    dirs.iter()
        .map(|dir| {
            all.iter()
                .find(|e| e.disk_path().parent() == Some(dir.as_path()))
                .cloned()
                .unwrap_or_else(|| panic!("no store entry at {dir:?}"))
        })
        .collect()
}

fn ssh(config: &Path, script: &str) {
    let status = Command::new("ssh")
        .arg("-F")
        .arg(config)
        .args(["hv", script])
        .status()
        .unwrap();
    assert!(status.success(), "ssh hv {script}");
}

/// The whole push, and the part of it spent connecting (scp connects too).
fn farm_push(
    config: &Path,
    payload: &[Entry],
    compression: PushCompression,
) -> (Duration, Duration) {
    ssh(config, "rm -rf /var/tmp/push-bench");
    let started = Instant::now();
    let host = RemoteHost::connect("hv", config, "hv", Duration::from_secs(20)).unwrap();
    let connected = started.elapsed();
    let refs: Vec<&Entry> = payload.iter().collect();
    let report = push_missing(
        &host,
        &HostStore::new("/var/tmp/push-bench"),
        &refs,
        compression,
        &Reporter::hidden(),
    )
    .unwrap();
    assert_eq!(report.pushed.len(), payload.len());
    (started.elapsed(), connected)
}

fn scp(config: &Path, payload: &[Entry]) -> Duration {
    ssh(
        config,
        "rm -rf /var/tmp/scp-bench && mkdir -p /var/tmp/scp-bench",
    );
    let started = Instant::now();
    let status = Command::new("scp")
        .args(["-q", "-r", "-F"])
        .arg(config)
        .args(
            payload
                .iter()
                .map(|e| e.disk_path().parent().unwrap().to_path_buf()),
        )
        .arg("hv:/var/tmp/scp-bench/")
        .status()
        .unwrap();
    assert!(status.success(), "scp");
    started.elapsed()
}

fn bytes(payload: &[Entry]) -> u64 {
    payload
        .iter()
        .flat_map(|e| walk(e.disk_path().parent().unwrap()))
        .sum()
}

fn walk(dir: &Path) -> Vec<u64> {
    fs_err::read_dir(dir)
        .unwrap()
        .flatten()
        .flat_map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                walk(&e.path())
            } else {
                vec![meta.len()]
            }
        })
        .collect()
}

fn main() {
    let store = shared_store();
    let server = tempfile::tempdir().unwrap();
    let port = farm::sys::hostinfo::free_local_port().unwrap();
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    fs_err::write(
        dir.join("farm.toml"),
        lab_toml(port, &server.path().join("root")),
    )
    .unwrap();
    let key = guest::keygen(dir, "lab_key");
    let sshd = sshd::Sshd::start(server.path(), port, &key.public);
    fs_err::write(dir.join("lab_known_hosts"), sshd.known_hosts_line()).unwrap();

    farm(dir, &store, &["build", "-q"]);
    farm(dir, &store, &["up", "-q", "hv"]);
    let config = dir.join(".farm/ssh_config");
    let payloads = [
        (
            "bundled L2 closure (tiny image + layer)",
            entries(
                &store,
                &[entry(dir, &store, "tiny"), entry(dir, &store, "leaf")],
            ),
            5,
        ),
        (
            "Debian image",
            entries(&store, &[entry(dir, &store, "bookworm")]),
            2,
        ),
    ];
    // FARM_BENCH_PAYLOADS=1 runs only the first (small) payload.
    let count = std::env::var("FARM_BENCH_PAYLOADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(payloads.len());
    for (what, payload, runs) in payloads.iter().take(count) {
        let mut plain_best = (Duration::MAX, Duration::ZERO);
        let mut zstd_best = (Duration::MAX, Duration::ZERO);
        let mut scp_best = Duration::MAX;
        for _ in 0..*runs {
            plain_best = plain_best.min(farm_push(&config, payload, PushCompression::Off));
            zstd_best = zstd_best.min(farm_push(&config, payload, PushCompression::Zstd));
            scp_best = scp_best.min(scp(&config, payload));
        }
        let mib = bytes(payload) as f64 / (1024.0 * 1024.0);
        let scp_secs = scp_best.as_secs_f64();
        println!(
            "{what}, {mib:.0} MiB into L1 through ssh jump `lab` (best of {runs}): scp {scp_secs:.1} s ({:.1} MiB/s)",
            mib / scp_secs
        );
        for (how, (best, connecting)) in [("plain", plain_best), ("zstd", zstd_best)] {
            let secs = best.as_secs_f64();
            println!(
                "  farm push, {how}: {secs:.1} s (connecting {:.1} s; {:.1} MiB/s, blake3-verified); farm speed / scp speed = {:.2}",
                connecting.as_secs_f64(),
                mib / secs,
                scp_secs / secs
            );
        }
    }
    farm(dir, &store, &["down", "-q", "--timeout", "30"]);
    drop(sshd);
}
