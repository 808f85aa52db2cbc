//! The bundled lab through an HTTP binary cache (nginx on 127.0.0.1):
//!
//! - `farm store pull` of the lab's closure into an empty store, next to `curl` fetching
//!   the same records and blobs (target: at least 0.9x curl's throughput; farm also
//!   unpacks, hashes and commits every file), and next to `curl | zstd -d > file; sync`,
//!   which does the same unpacking and writing without the checks;
//! - the same from an OCI registry (Debian's `docker-registry` on 127.0.0.1), next to
//!   `skopeo copy` of the same artifacts into an OCI layout directory;
//! - both twice: over bare loopback, where the CPU is the limit and farm's unpacking of
//!   ~3x the bytes curl moves decides, and over a link of FARM_BENCH_LINK (tc's token
//!   bucket on the loopback of a network namespace of its own; default 1gbit, what a CI
//!   runner gets from an object store), where the network is the limit as on a real runner;
//! - a cold `farm up` of the bundled lab on an empty store with the cache warm, next to the
//!   same with no cache (target: under 60 s, against ~3 min).
//!
//! Set FARM_BENCH_STORE to a store that already holds the bundled lab to skip building it.

#[path = "support/manual_vm.rs"]
#[allow(dead_code)]
mod manual_vm;
#[path = "../tests/it/support/nginx.rs"]
mod nginx;
#[path = "../tests/it/support/registry.rs"]
mod registry;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use manual_vm::{farm, files_under};

/// What one round of pulls measured.
struct Pulls {
    objects: usize,
    bytes: u64,
    curl: Duration,
    curl_unpack: Duration,
    farm_http: Duration,
    skopeo: Duration,
    farm_oci: Duration,
}

/// The build job's side: a project with the lab, a store holding it, the signing key.
struct Lab {
    scratch: PathBuf,
    builder: PathBuf,
    store_a: PathBuf,
    key: PathBuf,
    trust: String,
}

/// Pushes the lab to a fresh nginx and registry, then times curl, `curl | zstd -d`, skopeo
/// and `farm store pull` fetching it into empty stores. `round` names the scratch dirs.
fn pulls(lab: &Lab, round: &str) -> Pulls {
    let dir = lab.scratch.join(round);
    let served = dir.join("served");
    fs_err::create_dir_all(&served).unwrap();
    let server = nginx::Nginx::start(&served);
    let url = format!("{}/farm", server.url());
    let key = lab.key.to_str().unwrap();
    farm(
        &lab.builder,
        &lab.store_a,
        &["store", "push", "-q", &url, "--key", key],
    );
    let runner = dir.join("runner");
    fs_err::create_dir_all(&runner).unwrap();
    manual_vm::copy_bundled_lab(
        &runner,
        &format!("substituters = [\"{url}\"]\n{}", lab.trust),
    );
    let objects = files_under(&served.join("farm"));
    let bytes: u64 = objects
        .iter()
        .map(|f| fs_err::metadata(f).unwrap().len())
        .sum();
    // Warm the page cache for the server, then time curl, then farm.
    for file in &objects {
        std::io::copy(&mut fs_err::File::open(file).unwrap(), &mut std::io::sink()).unwrap();
    }
    let started = Instant::now();
    for file in &objects {
        let relative = file.strip_prefix(&served).unwrap().display().to_string();
        let status = Command::new("curl")
            .args(["-sSf", "-o", "/dev/null"])
            .arg(format!("{}/{relative}", server.url()))
            .status()
            .unwrap();
        assert!(status.success(), "curl {relative}");
    }
    let curl = started.elapsed();
    // A second baseline that does what a pull must: unpack each blob to a file, then sync.
    let unpacked = dir.join("unpacked");
    fs_err::create_dir_all(&unpacked).unwrap();
    let started = Instant::now();
    for (i, file) in objects.iter().enumerate() {
        let relative = file.strip_prefix(&served).unwrap().display().to_string();
        let unpack = if relative.ends_with(".zst") {
            "zstd -dq"
        } else {
            "cat"
        };
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "curl -sSf {}/{relative} | {unpack} > {}/{i}",
                server.url(),
                unpacked.display()
            ))
            .status()
            .unwrap();
        assert!(status.success(), "curl | {unpack} {relative}");
    }
    assert!(Command::new("sync").status().unwrap().success());
    let curl_unpack = started.elapsed();
    let farm_http = farm(
        &runner,
        &dir.join("store-http"),
        &["store", "pull", "-q", &url],
    );

    // The same closure through an OCI registry, against skopeo copying its artifacts.
    let registry = registry::Registry::start();
    let oci_url = format!("oci://{}/bench/cache", registry.address());
    farm(
        &lab.builder,
        &lab.store_a,
        &["store", "push", "-q", &oci_url, "--key", key],
    );
    let tags: Vec<String> = objects
        .iter()
        .filter_map(|f| {
            let name = f.file_name()?.to_str()?;
            let hex = name.strip_suffix(".json")?;
            (f.parent()?.file_name()? == "records").then(|| format!("drv-{hex}"))
        })
        .collect();
    let layout = dir.join("skopeo-layout");
    let started = Instant::now();
    for tag in &tags {
        let status = Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{}/bench/cache:{tag}", registry.address()))
            .arg(format!("oci:{}:{tag}", layout.display()))
            .status()
            .unwrap();
        assert!(status.success(), "skopeo copy {tag}");
    }
    let skopeo = started.elapsed();
    let farm_oci = farm(
        &runner,
        &dir.join("store-oci"),
        &["store", "pull", "-q", &oci_url],
    );
    Pulls {
        objects: objects.len(),
        bytes,
        curl,
        curl_unpack,
        farm_http,
        skopeo,
        farm_oci,
    }
}

/// Runs `work` on a thread of its own in a new network namespace whose loopback carries at
/// most `rate` (tc syntax: `1gbit`); every process it starts (nginx, the registry, curl,
/// skopeo, farm) shares that namespace, and so that link.
fn on_a_link<T: Send>(rate: &str, work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare changes only this thread's namespaces.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "unshare(CLONE_NEWNET) needs root");
                let run = |args: &[&str]| {
                    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
                    assert!(status.success(), "{}", args.join(" "));
                };
                run(&["ip", "link", "set", "lo", "up"]);
                run(&[
                    "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "1mb",
                    "latency", "100ms",
                ]);
                work()
            })
            .join()
            .unwrap()
    })
}

fn report(label: &str, p: &Pulls) {
    let mib = p.bytes as f64 / (1 << 20) as f64;
    let rate = |d: Duration| mib / d.as_secs_f64();
    println!("{label}:");
    let versus = |what: &str, farm: Duration, tool: &str, baseline: Duration| {
        println!(
            "  {what}: farm store pull {:.0} MiB/s ({:.1} s, unpacked, hashed, committed), {tool} {:.0} MiB/s ({:.1} s): ratio {:.2} (target >= 0.9)",
            rate(farm),
            farm.as_secs_f64(),
            rate(baseline),
            baseline.as_secs_f64(),
            baseline.as_secs_f64() / farm.as_secs_f64()
        );
    };
    versus("HTTP", p.farm_http, "curl", p.curl);
    println!(
        "        against `curl | zstd -d > file` of each object, then `sync` (the same unpacking and writing): {:.1} s, ratio {:.2}",
        p.curl_unpack.as_secs_f64(),
        p.curl_unpack.as_secs_f64() / p.farm_http.as_secs_f64()
    );
    versus("OCI ", p.farm_oci, "skopeo copy", p.skopeo);
}

fn main() {
    let scratch = tempfile::tempdir().unwrap();
    // The key and the build job: the lab built.
    let keys = scratch.path().join("keys");
    fs_err::create_dir_all(&keys).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_farm"))
        .args(["store", "keygen", "bench", "--dir"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(out.status.success());
    let trust = String::from_utf8(out.stdout).unwrap();
    let builder = scratch.path().join("builder");
    fs_err::create_dir_all(&builder).unwrap();
    manual_vm::copy_bundled_lab(&builder, "");
    let store_a = std::env::var_os("FARM_BENCH_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| scratch.path().join("store-a"));
    farm(&builder, &store_a, &["build", "-q"]);
    let lab = Lab {
        scratch: scratch.path().to_path_buf(),
        builder: builder.clone(),
        store_a: store_a.clone(),
        key: keys.join("bench.secret"),
        trust: trust.clone(),
    };

    let loopback = pulls(&lab, "loopback");
    let link = std::env::var("FARM_BENCH_LINK").unwrap_or_else(|_| "1gbit".to_string());
    let linked = on_a_link(&link, || pulls(&lab, "link"));
    println!(
        "bundled lab closure in the cache: {} objects, {:.0} MiB compressed",
        loopback.objects,
        loopback.bytes as f64 / (1 << 20) as f64
    );
    report("pull over bare loopback (the CPU is the limit)", &loopback);
    report(
        &format!(
            "pull over a {link} link (tc on a namespace's loopback; the network is the limit)"
        ),
        &linked,
    );

    // The cold `farm up` runs need a cache the default namespace reaches.
    let served = scratch.path().join("served");
    fs_err::create_dir_all(&served).unwrap();
    let server = nginx::Nginx::start(&served);
    let url = format!("{}/farm", server.url());
    farm(
        &builder,
        &store_a,
        &[
            "store",
            "push",
            "-q",
            &url,
            "--key",
            lab.key.to_str().unwrap(),
        ],
    );
    let runner = scratch.path().join("runner");
    fs_err::create_dir_all(&runner).unwrap();
    manual_vm::copy_bundled_lab(&runner, &format!("substituters = [\"{url}\"]\n{trust}"));
    // Cold `farm up` with the cache warm, and with none (FARM_BENCH_PULL_ONLY=1 skips it).
    if std::env::var_os("FARM_BENCH_PULL_ONLY").is_some() {
        return;
    }
    let store_c = scratch.path().join("store-c");
    let up_cached = farm(&runner, &store_c, &["up", "-q"]);
    farm(&runner, &store_c, &["down", "-q", "--timeout", "30"]);
    let store_d = scratch.path().join("store-d");
    let up_uncached = farm(&runner, &store_d, &["up", "-q", "--no-substitute"]);
    farm(&runner, &store_d, &["down", "-q", "--timeout", "30"]);

    println!(
        "cold farm up of the bundled lab on an empty store: {:.0} s with the cache (target < 60 s), {:.0} s without: {:.1}x faster",
        up_cached.as_secs_f64(),
        up_uncached.as_secs_f64(),
        up_uncached.as_secs_f64() / up_cached.as_secs_f64()
    );
}
