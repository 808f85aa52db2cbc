//! Carrying and checking the bundled lab's store: `farm store export` and `farm store
//! import` against `tar --zstd` of the same entry directories (target: at least 0.9x tar's
//! throughput), and `farm store verify` against `b3sum` of the same files.
//!
//! farm does more than tar on both sides — it hashes every byte as it streams, and import
//! checks every file and each entry's metadata before moving anything into the store — so
//! the ratio says what that costs. Every file is read once before timing, so both tools
//! read from the page cache. Set FARM_BENCH_STORE to a store that holds the bundled lab
//! (otherwise it is built first, from Debian's mirror, in a few minutes).

#[path = "support/manual_vm.rs"]
#[allow(dead_code)]
mod manual_vm;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use manual_vm::{farm, files_under, timed};

fn main() {
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    manual_vm::copy_bundled_lab(dir, "");
    let scratch = tempfile::tempdir().unwrap();
    let store = std::env::var_os("FARM_BENCH_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| scratch.path().join("cache"));
    farm(dir, &store, &["build", "-q"]);

    // The entries farm exports for the bundled lab, as tar sees them.
    let archive = scratch.path().join("lab.farm.tar.zst");
    let export = farm(
        dir,
        &store,
        &["store", "export", "-q", "-o", archive.to_str().unwrap()],
    );
    let listing = Command::new("tar")
        .args(["--zstd", "-tf"])
        .arg(&archive)
        .output()
        .unwrap();
    let mut entry_dirs: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|l| l.split_once('/').map(|(d, _)| d.to_string()))
        .collect();
    entry_dirs.dedup();
    let store_dir = store.join("store");
    let files: Vec<PathBuf> = entry_dirs
        .iter()
        .flat_map(|d| files_under(&store_dir.join(d)))
        .collect();
    let bytes: u64 = files
        .iter()
        .map(|f| fs_err::metadata(f).unwrap().len())
        .sum();
    // Warm the page cache for both tools, then time each again.
    for file in &files {
        std::io::copy(&mut fs_err::File::open(file).unwrap(), &mut std::io::sink()).unwrap();
    }
    let export = export.min(farm(
        dir,
        &store,
        &["store", "export", "-q", "-o", archive.to_str().unwrap()],
    ));
    let tarball = scratch.path().join("lab.tar.zst");
    let tar_create = timed(
        "tar --zstd -cf",
        Command::new("tar")
            .args(["--zstd", "-cf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&store_dir)
            .args(&entry_dirs),
    );

    let imported = scratch.path().join("imported");
    let import = farm(
        dir,
        &imported,
        &["store", "import", "-q", archive.to_str().unwrap()],
    );
    let untarred = scratch.path().join("untarred");
    fs_err::create_dir_all(&untarred).unwrap();
    let tar_extract = timed(
        "tar --zstd -xf",
        Command::new("tar")
            .args(["--zstd", "-xf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&untarred),
    );

    let verify = farm(dir, &store, &["store", "verify", "-q"]);
    let verify_hashes = farm(dir, &store, &["store", "verify", "-q", "--no-qemu-check"]);
    let b3sum = timed("b3sum", Command::new("b3sum").args(&files));

    let mib = bytes as f64 / (1 << 20) as f64;
    let rate = |d: Duration| mib / d.as_secs_f64();
    println!(
        "bundled lab store: {} entries, {} files, {:.0} MiB; archive {:.0} MiB (farm), {:.0} MiB (tar --zstd)",
        entry_dirs.len(),
        files.len(),
        mib,
        fs_err::metadata(&archive).unwrap().len() as f64 / (1 << 20) as f64,
        fs_err::metadata(&tarball).unwrap().len() as f64 / (1 << 20) as f64,
    );
    println!(
        "export: farm {:.0} MiB/s, tar --zstd -c {:.0} MiB/s: ratio {:.2} (target >= 0.9)",
        rate(export),
        rate(tar_create),
        tar_create.as_secs_f64() / export.as_secs_f64()
    );
    println!(
        "import: farm {:.0} MiB/s (verified, fsynced), tar --zstd -x {:.0} MiB/s: ratio {:.2} (target >= 0.9)",
        rate(import),
        rate(tar_extract),
        tar_extract.as_secs_f64() / import.as_secs_f64()
    );
    println!(
        "verify: farm store verify {:.2} s ({:.2} s without qemu-img check), b3sum {:.2} s: ratio {:.2} ({:.2})",
        verify.as_secs_f64(),
        verify_hashes.as_secs_f64(),
        b3sum.as_secs_f64(),
        b3sum.as_secs_f64() / verify.as_secs_f64(),
        b3sum.as_secs_f64() / verify_hashes.as_secs_f64()
    );
}
