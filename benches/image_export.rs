//! `farm image export` of the bundled lab's L1 platform (`debian_vs_amd64`: the Debian
//! image, the seed's init layer and the hypervisor layer) to one qcow2, against
//! `qemu-img convert -f qcow2 -O qcow2` of the same chain by hand (target: at most 1.05x).
//!
//! farm does more than the convert: it puts GRUB, the kernel and the initrd in front of the
//! root (the image boots by direct kernel), and it writes the disk's checksum beside it.
//! farm lays the qcow2 out itself and hashes it as it writes (`model::build::flat_image`),
//! so the checksum costs no second read: blake3 (the default) keeps up with the writing;
//! SHA-256 (`--checksum sha256`) is printed too, as it is slower than the writing. Both
//! write to the same directory, read their inputs from the page cache (everything is read
//! once before timing), and neither syncs; a second line adds `sync FILE` to both, as a copy
//! to another machine needs the file on disk. Every run starts after a `sync`, untimed, so
//! no run pays for the writeback of the one before. Set FARM_BENCH_STORE to a store that holds the
//! bundled lab (otherwise it is built first, from Debian's mirror, in a few minutes).

#[path = "support/manual_vm.rs"]
#[allow(dead_code)]
mod manual_vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use manual_vm::{farm, timed};

const PLATFORM: &str = "debian_vs_amd64";
const RUNS: usize = 9;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    manual_vm::copy_bundled_lab(dir, "");
    let scratch = tempfile::tempdir_in(dir).unwrap();
    let store = std::env::var_os("FARM_BENCH_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| scratch.path().join("cache"));
    farm(dir, &store, &["build", "-q", PLATFORM]);
    let top = manual_vm::entry(dir, &store, PLATFORM).join("disk.qcow2");
    assert!(top.is_file(), "no `{}`", top.display());

    let by_hand = scratch.path().join("hand.qcow2");
    let exported = scratch.path().join("farm.qcow2");
    // Each run starts with nothing dirty in the page cache: the writeback of the run
    // before would otherwise take a core from this one (the file it wrote is kept).
    let settle = || {
        let status = Command::new("sync").status().unwrap();
        assert!(status.success(), "sync");
    };
    let hand = || {
        let _ = fs_err::remove_file(&by_hand);
        settle();
        timed(
            "qemu-img convert",
            Command::new("qemu-img")
                .args(["convert", "-q", "-f", "qcow2", "-O", "qcow2"])
                .arg(&top)
                .arg(&by_hand),
        )
    };
    let export_with = |checksum: &str| {
        let _ = fs_err::remove_file(&exported);
        settle();
        let file = exported.display().to_string();
        farm(
            dir,
            &store,
            &[
                "image",
                "export",
                "-q",
                PLATFORM,
                &file,
                "--checksum",
                checksum,
            ],
        )
    };
    let export = || export_with("blake3");
    // Until the file is on disk, as a copy to another machine needs it: `sync FILE`.
    let synced = |file: &Path, took: Duration| took + timed("sync", Command::new("sync").arg(file));
    // Warm the page cache for both, then alternate.
    hand();
    export();
    let (mut hand_times, mut farm_times, mut sha256_times) = (Vec::new(), Vec::new(), Vec::new());
    let (mut hand_synced, mut farm_synced) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        hand_times.push(hand());
        farm_times.push(export());
        sha256_times.push(export_with("sha256"));
        hand_synced.push(synced(&by_hand, hand()));
        farm_synced.push(synced(&exported, export()));
    }
    let (hand, farm_time, sha256_time) =
        (median(hand_times), median(farm_times), median(sha256_times));
    let (hand_synced, farm_synced) = (median(hand_synced), median(farm_synced));
    let bytes = fs_err::metadata(&exported).unwrap().len();

    let s = |d: Duration| d.as_secs_f64();
    println!(
        "image export of {PLATFORM} (3-layer chain) to qcow2 with its blake3, {:.0} MiB, \
         median of {RUNS}: farm {:.2} s, qemu-img convert by hand {:.2} s, ratio {:.2}x \
         (target <= 1.05x)",
        bytes as f64 / (1 << 20) as f64,
        s(farm_time),
        s(hand),
        s(farm_time) / s(hand),
    );
    println!(
        "image export of {PLATFORM} with its sha256 (--checksum sha256): farm {:.2} s, \
         qemu-img convert by hand {:.2} s, ratio {:.2}x",
        s(sha256_time),
        s(hand),
        s(sha256_time) / s(hand),
    );
    println!(
        "image export of {PLATFORM}, each followed by `sync FILE`: farm {:.2} s, \
         qemu-img convert by hand {:.2} s, ratio {:.2}x",
        s(farm_synced),
        s(hand_synced),
        s(farm_synced) / s(hand_synced),
    );
}
