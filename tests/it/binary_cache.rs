//! Binary caches end to end with the real binary: a `file://` directory and nginx on
//! 127.0.0.1 (GET, HEAD, PUT), signed records, substitution in `farm build` and `farm up`,
//! and every way a cache can be wrong or away.

use crate::support::moto;
use crate::support::nginx;
use crate::support::project;
use crate::support::registry;
use crate::support::skip::{Part, require, require_vm};
use crate::support::test_home::shared_store;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use moto::{MOTO_SERVER, Moto};
use nginx::{NGINX, Nginx};
use project::{Project, text};
use registry::{REGISTRY, Registry};

/// A key pair made by `farm store keygen`: the secret key file and the farm.toml line.
struct Key {
    _dir: tempfile::TempDir,
    secret: PathBuf,
    trust_line: String,
}

fn keygen(name: &str) -> Key {
    let dir = tempfile::tempdir().unwrap();
    // A `--dir` that does not exist yet is made.
    let keys = dir.path().join("keys");
    let out = Command::new(env!("CARGO_BIN_EXE_farm"))
        .args(["store", "keygen", name, "--dir"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let trust_line = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        trust_line.starts_with(&format!("trusted-public-keys = [\"{name}:")),
        "{trust_line}"
    );
    Key {
        secret: keys.join(format!("{name}.secret")),
        _dir: dir,
        trust_line,
    }
}

/// A lab that builds without a VM: a local image and an empty layer on it.
fn cheap_lab(cache_lines: &str) -> String {
    format!(
        "{cache_lines}\n[images.local]\npath = \"base.qcow2\"\n\n[targets.amd64]\narch = \"x86_64\"\n\n\
         [platforms.p]\nfrom = \"local\"\n"
    )
}

fn cheap_project(cache_lines: &str) -> Project {
    let project = Project::new(&cheap_lab(cache_lines));
    project.blank_disk("base.qcow2");
    project
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn blobs(cache: &Path) -> Vec<PathBuf> {
    fs_err::read_dir(cache.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

#[test]
fn a_file_cache_substitutes_everything_and_refuses_what_it_cannot_trust() {
    let key = keygen("ci-a");
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("cache");
    let url = file_url(&cache);

    // Machine A builds and pushes.
    let a = cheap_project("");
    a.ok(&["build"]);
    let out = a.ok(&["store", "push", &url, "--key", key.secret.to_str().unwrap()]);
    assert!(text(&out).contains("pushed 2 entries to"), "{}", text(&out));
    assert!(cache.join("farm-cache.json").is_file());
    // Everything in it is readable by all, so a web server can serve the directory as is.
    for object in files_under(&cache) {
        let mode = fs_err::metadata(&object).unwrap().permissions().mode();
        assert_eq!(mode & 0o444, 0o444, "`{}` is {mode:o}", object.display());
    }
    // A second push uploads nothing.
    let again = a.ok(&["store", "push", &url, "--key", key.secret.to_str().unwrap()]);
    assert!(
        text(&again).contains("pushed 0 entries")
            && text(&again).contains("(0 blobs")
            && text(&again).contains("2 already there"),
        "{}",
        text(&again)
    );

    // Machine B trusts the key and lists the cache: it builds nothing.
    let b = cheap_project(&format!("substituters = [\"{url}\"]\n{}", key.trust_line));
    let plan = b.ok(&["plan"]);
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains(&format!("from {url}")),
        "{}",
        text(&plan)
    );
    let out = b.ok(&["build"]);
    let said = text(&out);
    assert_eq!(said.matches("substituted ").count(), 2, "{said}");
    assert!(
        !said.contains("imported") && !said.contains("built "),
        "{said}"
    );
    let verify = b.ok(&["store", "verify"]);
    assert!(
        text(&verify).contains("verified 2 entries"),
        "{}",
        text(&verify)
    );
    assert_eq!(
        fs_err::read(b.entry("p").join("disk.qcow2")).unwrap(),
        fs_err::read(a.entry("p").join("disk.qcow2")).unwrap()
    );

    // A cache given on the command line, for one command.
    let e = cheap_project(&key.trust_line);
    let out = e.ok(&["build", "--substituter", &url]);
    assert_eq!(
        text(&out).matches("substituted ").count(),
        2,
        "{}",
        text(&out)
    );

    // A record signed by a key farm.toml does not list: nothing is pulled.
    let other = keygen("someone-else");
    let c = cheap_project(&other.trust_line);
    let out = c.run(&["store", "pull", &url]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "Cache `{url}` has `local`, but its record is not trusted: it is signed by `ci-a`, \
             which `trusted-public-keys` does not list"
        )),
        "{}",
        text(&out)
    );
    assert!(c.entries().is_empty(), "nothing stored");

    // A flipped byte in a blob: the file is named, nothing is stored.
    let d = cheap_project(&key.trust_line);
    for blob in blobs(&cache) {
        let mut bytes = fs_err::read(&blob).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x10;
        fs_err::write(&blob, bytes).unwrap();
    }
    let out = d.run(&["store", "pull", &url]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // Both entries' blobs are damaged and a child downloads while its parent does, so
    // whichever is checked first is the one named.
    let named = ["local", "p_amd64"].into_iter().find(|entry| {
        text(&out).contains(&format!("Cache `{url}`: file `disk.qcow2` of `{entry}`"))
            && text(&out).contains(&format!("nothing of `{entry}` was stored"))
    });
    assert!(named.is_some(), "{}", text(&out));
    assert!(d.entries().is_empty(), "nothing stored");
    assert_eq!(
        fs_err::read_dir(d.store.join("tmp")).unwrap().count(),
        0,
        "no staging left"
    );
}

/// The same derivation can have another name in the cache than here (farm's appliance is
/// the tiny image). A parent substituted here keeps the cache's name, which its children's
/// disks name as their backing file.
#[test]
fn a_parent_named_otherwise_in_the_cache_keeps_that_name_so_its_children_find_it() {
    let key = keygen("ci-renamed");
    let cache_dir = tempfile::tempdir().unwrap();
    let url = file_url(&cache_dir.path().join("cache"));
    let a = cheap_project("");
    a.ok(&["build"]);
    a.ok(&["store", "push", &url, "--key", key.secret.to_str().unwrap()]);

    // B's farm.toml calls the same image `golden`: the same bytes, the same derivation.
    let lines = format!("substituters = [\"{url}\"]\n{}", key.trust_line);
    let b = Project::new(&cheap_lab(&lines).replace("local", "golden"));
    b.blank_disk("base.qcow2");
    let out = b.ok(&["build"]);
    let said = text(&out);
    assert_eq!(said.matches("substituted ").count(), 2, "{said}");
    let base = b.entry("golden");
    assert!(
        base.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("-local"),
        "{}",
        base.display()
    );
    // The child's chain resolves, and a second build is a no-op.
    let info = Command::new("qemu-img")
        .args(["info", "--backing-chain", "-U"])
        .arg(b.entry("p").join("disk.qcow2"))
        .output()
        .unwrap();
    assert!(info.status.success(), "{}", text(&info));
    assert!(
        text(&b.ok(&["build"])).contains("cached"),
        "nothing rebuilt"
    );
    b.ok(&["store", "verify"]);
}

#[test]
fn an_unreachable_cache_costs_a_warning_and_farm_builds() {
    let key = keygen("ci-b");
    // Nothing listens on port 9 of 127.0.0.1: the connection is refused at once.
    let b = cheap_project(&format!(
        "substituters = [\"http://127.0.0.1:9/cache\"]\n{}",
        key.trust_line
    ));
    let out = b.ok(&["build"]);
    let said = text(&out);
    assert!(
        said.contains("warning: Cache `http://127.0.0.1:9/cache` cannot be reached")
            && said.contains("building without it"),
        "{said}"
    );
    assert!(said.contains("imported local"), "{said}");
    assert_eq!(b.entries().len(), 2);
    // --no-substitute asks nobody.
    let c = cheap_project(&format!(
        "substituters = [\"http://127.0.0.1:9/cache\"]\n{}",
        key.trust_line
    ));
    let out = c.ok(&["build", "--no-substitute"]);
    assert!(!text(&out).contains("warning"), "{}", text(&out));
}

const LAB: &str = r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.plain]
from = "tiny"
memory = "256M"
run = ["echo cached > /etc/farm-cache-test"]

[vms.fromcache]
platform = "plain"
"#;

#[test]
fn on_every_backend_a_fresh_store_substitutes_a_tiny_lab_and_brings_it_up() {
    if !require_vm(
        "cache_backends",
        &[
            Part::File(NGINX),
            Part::File(MOTO_SERVER),
            Part::File(REGISTRY),
        ],
    ) {
        return;
    }
    let served = tempfile::tempdir().unwrap();
    let nginx = Nginx::start(served.path());
    let moto = Moto::start("farm-lab-cache");
    let registry = Registry::start();
    let key = keygen("ci-lab");
    // The build job: the lab built once, in a store of its own: in the shared store a chroot
    // build may have made the tiny image first as farm's appliance (the same derivation under
    // another name), and a layer built on that names its parent so in the cache.
    let a = Project::new(LAB);
    a.ok(&["build"]);

    for url in [
        format!("{}/farm", nginx.url()),
        "s3://farm-lab-cache/ci".to_string(),
        format!("oci://{}/lab/cache", registry.address()),
    ] {
        let push = |project: &Project| {
            let out = project
                .farm(&["store", "push", &url, "--key", key.secret.to_str().unwrap()])
                .envs(moto.env())
                .output()
                .unwrap();
            assert!(out.status.success(), "{url}: {}", text(&out));
            text(&out)
        };
        assert!(push(&a).contains("pushed 2 entries"), "{url}");

        // A fresh runner: an empty store, the cache and the key in farm.toml.
        let b = Project::new(&format!(
            "substituters = [\"{url}\"]\n{}\n{LAB}",
            key.trust_line
        ));
        let out = b
            .farm(&["up", "--boot-timeout", "300"])
            .envs(moto.env())
            .output()
            .unwrap();
        let said = text(&out);
        assert!(out.status.success(), "{url}: {said}");
        assert_eq!(said.matches("substituted ").count(), 2, "{url}: {said}");
        assert!(!said.contains("built "), "{url}: nothing is built: {said}");
        let ssh = b.ok(&["ssh", "fromcache", "--", "cat", "/etc/farm-cache-test"]);
        assert_eq!(
            String::from_utf8_lossy(&ssh.stdout).trim(),
            "cached",
            "{url}"
        );
        b.ok(&["down"]);

        // Pushing again uploads nothing.
        let again = push(&a);
        assert!(
            again.contains("pushed 0 entries") && again.contains("2 already there"),
            "{url}: {again}"
        );
    }
}

#[test]
fn a_layer_is_not_substituted_onto_a_parent_built_here_with_other_bytes() {
    if !require_vm("parent_bytes", &[]) {
        return;
    }
    // `stamp` is not bit-reproducible (it records the time); `on-stamp` is built on it.
    // (Names no other test in the shared store uses: some count entries by name.)
    const STAMPED: &str = r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.stamp]
from = "tiny"
run = ["date +%s%N > /etc/stamp"]

[platforms.on-stamp]
from = "stamp"
run = ["echo on-stamp > /etc/on-stamp"]
"#;
    let key = keygen("ci-stamp");
    let cache_dir = tempfile::tempdir().unwrap();
    let url = file_url(&cache_dir.path().join("cache"));
    let a = Project::with_store(STAMPED, &shared_store());
    a.ok(&["build"]);
    a.ok(&["store", "push", &url, "--key", key.secret.to_str().unwrap()]);

    // B builds `stamp` itself, then asks the cache for the rest.
    let b = Project::new(&format!(
        "substituters = [\"{url}\"]\n{}\n{STAMPED}",
        key.trust_line
    ));
    // The tiny image comes from the cache; `stamp` is built here.
    b.ok(&["build", "tiny"]);
    b.ok(&["build", "--no-substitute", "stamp"]);
    let out = b.ok(&["build"]);
    let said = text(&out);
    assert!(
        said.contains("built `on-stamp_amd64` on other bytes of")
            && said.contains("building `on-stamp_amd64` instead"),
        "{said}"
    );
    assert!(said.contains("built on-stamp_amd64"), "{said}");
    b.ok(&["store", "verify"]);
}

/// Runs farm in `project` with moto's environment.
fn farm_s3(project: &Project, moto: &Moto, args: &[&str]) -> std::process::Output {
    project.farm(args).envs(moto.env()).output().unwrap()
}

#[test]
fn an_s3_cache_substitutes_everything_and_a_tampered_blob_stores_nothing() {
    if !require("s3_cache", &[Part::File(MOTO_SERVER)]) {
        return;
    }
    let moto = Moto::start("farm-cache");
    let url = "s3://farm-cache/labs/ci";
    let key = keygen("ci-s3");

    let a = cheap_project("");
    a.ok(&["build"]);
    let out = farm_s3(
        &a,
        &moto,
        &["store", "push", url, "--key", key.secret.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), moto.log());
    assert!(text(&out).contains("pushed 2 entries"), "{}", text(&out));
    let again = farm_s3(
        &a,
        &moto,
        &["store", "push", url, "--key", key.secret.to_str().unwrap()],
    );
    assert!(
        text(&again).contains("pushed 0 entries") && text(&again).contains("2 already there"),
        "{}",
        text(&again)
    );

    let b = cheap_project(&format!("substituters = [\"{url}\"]\n{}", key.trust_line));
    let out = farm_s3(&b, &moto, &["build"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        text(&out).matches("substituted ").count(),
        2,
        "{}",
        text(&out)
    );
    b.ok(&["store", "verify"]);

    // Every blob altered in the bucket, through S3 itself: nothing is stored.
    let c = cheap_project(&key.trust_line);
    tamper_with_s3_blobs(&moto, "farm-cache", "labs/ci/blobs/");
    let out = farm_s3(&c, &moto, &["store", "pull", url]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // The layer downloads while its parent does, so either may be the first refused.
    assert!(
        ["local", "p_amd64"]
            .iter()
            .any(|entry| text(&out)
                .contains(&format!("Cache `{url}`: file `disk.qcow2` of `{entry}`"))),
        "{}",
        text(&out)
    );
    assert!(c.entries().is_empty(), "nothing stored");
}

/// Flips a byte in the middle of every object under `prefix`, with signed S3 requests.
fn tamper_with_s3_blobs(moto: &Moto, bucket: &str, prefix: &str) {
    use futures_util::StreamExt;
    use object_store::ObjectStore;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("farm-test")
        .with_secret_access_key("farm-test-secret")
        .build()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let prefix = object_store::path::Path::from(prefix);
        let objects: Vec<_> = store.list(Some(&prefix)).collect().await;
        assert!(!objects.is_empty(), "no blobs under {prefix}");
        for object in objects {
            let location = object.unwrap().location;
            let got = store.get_opts(&location, Default::default()).await.unwrap();
            let mut bytes = got.bytes().await.unwrap().to_vec();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x10;
            store
                .put_opts(&location, bytes.into(), Default::default())
                .await
                .unwrap();
        }
    });
}

#[test]
fn an_oci_registry_holds_a_cache_and_a_tampered_blob_stores_nothing() {
    if !require("oci_cache", &[Part::File(REGISTRY)]) {
        return;
    }
    let registry = Registry::start();
    let url = format!("oci://{}/team/farm-cache", registry.address());
    let key = keygen("ci-oci");

    let a = cheap_project("");
    a.ok(&["build"]);
    let out = a.run(&["store", "push", &url, "--key", key.secret.to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", text(&out), registry.log());
    assert!(text(&out).contains("pushed 2 entries"), "{}", text(&out));
    let again = a.ok(&["store", "push", &url, "--key", key.secret.to_str().unwrap()]);
    assert!(
        text(&again).contains("pushed 0 entries") && text(&again).contains("2 already there"),
        "{}",
        text(&again)
    );

    let b = cheap_project(&format!("substituters = [\"{url}\"]\n{}", key.trust_line));
    let out = b.ok(&["build"]);
    assert_eq!(
        text(&out).matches("substituted ").count(),
        2,
        "{}",
        text(&out)
    );
    b.ok(&["store", "verify"]);

    // The zstd blobs altered on the registry's disk: nothing is stored.
    let mut altered = 0;
    for blob in registry.blob_files() {
        let mut bytes = fs_err::read(&blob).unwrap();
        if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x10;
            fs_err::write(&blob, bytes).unwrap();
            altered += 1;
        }
    }
    assert!(altered >= 2, "{altered} blobs altered");
    let c = cheap_project(&key.trust_line);
    let out = c.run(&["store", "pull", &url]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // The layer downloads while its parent does, so either may be the first refused.
    assert!(
        ["local", "p_amd64"]
            .iter()
            .any(|entry| text(&out)
                .contains(&format!("Cache `{url}`: file `disk.qcow2` of `{entry}`"))),
        "{}",
        text(&out)
    );
    assert!(c.entries().is_empty(), "nothing stored");
}

/// Every file under `dir`, at any depth.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for child in fs_err::read_dir(dir).unwrap() {
        let path = child.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}
