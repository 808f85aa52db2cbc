//! Download throughput: farm's verified download against `curl` from the same local server.
//!
//! Why curl as the baseline: it is what users would otherwise run, and it neither hashes nor
//! resumes, so the ratio shows what verification and resumability cost. Target: >= 0.90.
//!
//! `cargo bench --bench download`; `FARM_BENCH_DOWNLOAD_MIB` sets the file size (default
//! 1024), `FARM_BENCH_RUNS` the runs per contender (default 3, the median is reported).

#[path = "../tests/it/support/http_server.rs"]
mod http_server;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use farm::fetch::{Download, download, hash_file};
use farm::model::hash::HashAlgo;
use indicatif::ProgressBar;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / took.as_secs_f64()
}

/// User + system CPU time of this process (farm and the test server) and its waited-for
/// children (curl).
fn cpu_seconds() -> f64 {
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN]
        .into_iter()
        .map(|who| {
            // SAFETY: `getrusage` only writes into the zero-initialised struct we own.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(who, &mut usage) };
            tv(usage.ru_utime) + tv(usage.ru_stime)
        })
        .sum()
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn remove(path: &Path) {
    let _ = fs_err::remove_file(path);
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter we have nothing to match.
    let mib = env_or("FARM_BENCH_DOWNLOAD_MIB", 1024);
    let runs = env_or("FARM_BENCH_RUNS", 3).max(1);
    let bytes = mib * 1024 * 1024;
    let gib = mib as f64 / 1024.0;

    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("image.bin");
    http_server::write_random_file(&source, bytes, 42).expect("writing the test file");
    let bar = ProgressBar::hidden();

    let started = Instant::now();
    let expected = hash_file(&source, Some(HashAlgo::Sha256), &bar)
        .expect("hashing the test file")
        .digest
        .expect("sha256 requested");
    let hash_rate = mib_per_s(bytes, started.elapsed());

    let server = http_server::TestServer::start();
    let url = server.add_file("/image.bin", &source);

    let curl_out = dir.path().join("curl.out");
    let partial = dir.path().join("farm.part");
    let (mut curl, mut farm) = (Vec::new(), Vec::new());
    let (mut curl_cpu, mut farm_cpu) = (Vec::new(), Vec::new());
    // Interleaved, so a burst of load from elsewhere on the machine hits both contenders.
    for _ in 0..runs {
        remove(&curl_out);
        let cpu = cpu_seconds();
        let started = Instant::now();
        let status = Command::new("curl")
            .args(["-s", "-f", "-o"])
            .arg(&curl_out)
            .arg(&url)
            .status()
            .expect("running curl");
        let took = started.elapsed();
        assert!(status.success(), "curl failed: {status}");
        assert_eq!(fs_err::metadata(&curl_out).unwrap().len(), bytes);
        curl.push(mib_per_s(bytes, took));
        curl_cpu.push((cpu_seconds() - cpu) / gib);
        remove(&curl_out);

        remove(&partial);
        let say = |_: &str| {};
        let req = Download {
            url: &url,
            expected: &expected,
            partial: &partial,
            attempts: 1,
            stall_timeout: farm::fetch::DEFAULT_STALL_TIMEOUT,
            say: &say,
        };
        let cpu = cpu_seconds();
        let started = Instant::now();
        let got = download(&req, &bar).expect("farm download");
        let took = started.elapsed();
        assert_eq!(got.size, bytes);
        farm.push(mib_per_s(bytes, took));
        farm_cpu.push((cpu_seconds() - cpu) / gib);
        remove(&partial);
    }
    eprintln!("runs (MiB/s): curl {curl:.1?}, farm {farm:.1?}");

    // Both contenders need whole cores (farm hashes on two threads); a busy machine skews the
    // ratio, so say how busy it was.
    let load = fs_err::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?");
    eprintln!("load average during the runs: {load} (on {} CPUs)", cpus());
    // CPU time does not depend on how busy the machine is: the figure to compare when the
    // rates are skewed by load. Both include the test server's share.
    eprintln!(
        "CPU seconds per GiB (client + test server): curl {:.2}, farm {:.2}",
        median(curl_cpu),
        median(farm_cpu)
    );
    let (curl, farm) = (median(curl), median(farm));
    println!("hash_file {mib} MiB (sha256 + blake3, from page cache): {hash_rate:.1} MiB/s");
    println!(
        "download {mib} MiB: curl {curl:.1} MiB/s, farm (sha256 verified) {farm:.1} MiB/s, \
         ratio {:.2} (target >= 0.90)",
        farm / curl
    );
}
