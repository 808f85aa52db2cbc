//! A cached `farm build` must do no image I/O: its time is compared with `farm --version`
//! (process start-up alone) in the same run. Target: within 2x.
//!
//! The project has a 1 GiB local image *without* a declared hash (the worst case: its key
//! is its content hash, remembered by stat in the store) and a platform layer on it.
//! Size: FARM_BENCH_IMAGE_MIB (default 1024).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn farm(dir: &Path, args: &[&str]) -> Duration {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_farm"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run farm");
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "farm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let mib: u64 = std::env::var("FARM_BENCH_IMAGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "preallocation=full"])
        .arg(&image)
        .arg(format!("{mib}M"))
        .status()
        .expect("qemu-img (apt-get install qemu-utils)");
    assert!(status.success());
    fs_err::write(
        dir.path().join("farm.toml"),
        "[images.local]\npath = \"disk.qcow2\"\n[targets.amd64]\narch = \"x86_64\"\n\
         [platforms.base]\nfrom = \"local\"\n[platforms.app]\nfrom = \"base\"\n",
    )
    .unwrap();

    let cold = farm(dir.path(), &["build", "-q"]);
    let runs = 15;
    let mut cached = Vec::new();
    let mut version = Vec::new();
    for _ in 0..runs {
        version.push(farm(dir.path(), &["--version"]));
        cached.push(farm(dir.path(), &["build", "-q"]));
    }
    let (cached, version) = (median(cached), median(version));
    let ratio = cached.as_secs_f64() / version.as_secs_f64();
    println!(
        "cached build ({mib} MiB local image, 3 derivations): cold {:.2} s; cached {:.2} ms vs `farm --version` {:.2} ms (median of {runs}), ratio {ratio:.2} (target <= 2.0)",
        cold.as_secs_f64(),
        cached.as_secs_f64() * 1e3,
        version.as_secs_f64() * 1e3,
    );
}
