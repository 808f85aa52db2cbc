//! The bundled lab through an HTTP binary cache (nginx on 127.0.0.1):
//!
//! - `farm store pull` of the lab's closure into an empty store, next to `curl` fetching
//!   the same records and blobs (target: at least 0.9x curl's throughput; farm also
//!   unpacks, hashes and commits every file), and next to `curl | zstd -d > file; sync`,
//!   which does the same unpacking and writing without the checks;
//! - the same from an OCI registry (Debian's `docker-registry` on 127.0.0.1), next to
//!   `skopeo copy` of the same artifacts into an OCI layout directory;
//! - a cold `farm up` of the bundled lab on an empty store with the cache warm, next to the
//!   same with no cache (target: under 60 s, against ~3 min).
//!
//! Set FARM_BENCH_STORE to a store that already holds the bundled lab to skip building it.

#[path = "support/manual_vm.rs"]
#[allow(dead_code)]
mod manual_vm;
#[path = "../tests/support/nginx.rs"]
mod nginx;
#[path = "../tests/support/registry.rs"]
mod registry;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use manual_vm::{farm, files_under};

fn copy_lab(dir: &Path, extra: &str) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let toml = fs_err::read_to_string(repo.join("farm.toml")).unwrap();
    fs_err::write(dir.join("farm.toml"), format!("{extra}\n{toml}")).unwrap();
    for folder in ["images", "platforms"] {
        fs_err::create_dir_all(dir.join(folder)).unwrap();
        for file in fs_err::read_dir(repo.join(folder)).unwrap() {
            let file = file.unwrap();
            fs_err::copy(file.path(), dir.join(folder).join(file.file_name())).unwrap();
        }
    }
}

fn main() {
    let scratch = tempfile::tempdir().unwrap();
    let served = scratch.path().join("served");
    fs_err::create_dir_all(&served).unwrap();
    let server = nginx::Nginx::start(&served);
    let url = format!("{}/farm", server.url());

    // The key and the build job: the lab built and pushed.
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
    copy_lab(&builder, "");
    let store_a = std::env::var_os("FARM_BENCH_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| scratch.path().join("store-a"));
    farm(&builder, &store_a, &["build", "-q"]);
    let push = farm(
        &builder,
        &store_a,
        &[
            "store",
            "push",
            "-q",
            &url,
            "--key",
            keys.join("bench.secret").to_str().unwrap(),
        ],
    );

    // Pull into an empty store, against curl of the same objects.
    let runner = scratch.path().join("runner");
    fs_err::create_dir_all(&runner).unwrap();
    copy_lab(&runner, &format!("substituters = [\"{url}\"]\n{trust}"));
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
    let unpacked = scratch.path().join("unpacked");
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
    let store_b = scratch.path().join("store-b");
    let pull = farm(&runner, &store_b, &["store", "pull", "-q", &url]);

    // The same closure through an OCI registry, against skopeo copying its artifacts.
    let registry = registry::Registry::start();
    let oci_url = format!("oci://{}/bench/cache", registry.address());
    farm(
        &builder,
        &store_a,
        &[
            "store",
            "push",
            "-q",
            &oci_url,
            "--key",
            keys.join("bench.secret").to_str().unwrap(),
        ],
    );
    let tags: Vec<String> = objects
        .iter()
        .filter_map(|f| {
            let name = f.file_name()?.to_str()?;
            let hex = name.strip_suffix(".json")?;
            (f.parent()?.file_name()? == "records").then(|| format!("drv-{hex}"))
        })
        .collect();
    let layout = scratch.path().join("skopeo-layout");
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
    let store_oci = scratch.path().join("store-oci");
    let oci_pull = farm(&runner, &store_oci, &["store", "pull", "-q", &oci_url]);

    let mib = bytes as f64 / (1 << 20) as f64;
    let rate = |d: Duration| mib / d.as_secs_f64();
    println!(
        "bundled lab closure in the cache: {} objects, {:.0} MiB compressed; push {:.1} s",
        objects.len(),
        mib,
        push.as_secs_f64()
    );
    println!(
        "pull over HTTP: farm store pull {:.0} MiB/s ({:.1} s, unpacked, hashed, committed), curl {:.0} MiB/s ({:.1} s): ratio {:.2} (target >= 0.9)",
        rate(pull),
        pull.as_secs_f64(),
        rate(curl),
        curl.as_secs_f64(),
        curl.as_secs_f64() / pull.as_secs_f64()
    );
    println!(
        "  against `curl | zstd -d > file` of each object, then `sync` (the same unpacking and writing): {:.1} s, ratio {:.2}",
        curl_unpack.as_secs_f64(),
        curl_unpack.as_secs_f64() / pull.as_secs_f64()
    );
    println!(
        "pull from an OCI registry: farm store pull {:.0} MiB/s ({:.1} s), skopeo copy {:.0} MiB/s ({:.1} s): ratio {:.2} (target >= 0.9)",
        rate(oci_pull),
        oci_pull.as_secs_f64(),
        rate(skopeo),
        skopeo.as_secs_f64(),
        skopeo.as_secs_f64() / oci_pull.as_secs_f64()
    );
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
