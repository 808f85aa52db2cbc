//! `farm image export` (issue 32): a built platform as one standalone disk, its chain
//! flattened, with its checksum and the derivation it came from beside it; the same bytes
//! every time for qcow2 and raw; nothing written over an existing file without `--force`,
//! and a clear refusal for what is not built. As a KubeVirt containerDisk, pushed to a real
//! registry (Debian's `docker-registry`) and read back with `skopeo`.

use crate::support::project::{Project, nonce, text};
use crate::support::registry::{REGISTRY, Registry};
use crate::support::skip::{Part, require_vm};
use crate::support::test_home::shared_store;

use std::process::Command;

const LAB: &str = r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.plain]
from = "tiny"
memory = "256M"

[platforms.unbuilt]
from = "tiny"
run = ["echo NONCE > /nonce"]
"#;

#[test]
fn a_platform_is_exported_flat_with_its_checksum_the_same_bytes_each_time() {
    if !require_vm("image_export", &[]) {
        return;
    }
    let p = Project::with_store(&LAB.replace("NONCE", &nonce()), &shared_store());
    p.ok(&["build", "plain"]);
    let out = p.path().join("out");
    fs_err::create_dir_all(&out).unwrap();
    // `farm image export NAME out/FILE ARGS…`.
    let run = |name: &str, file: &str, args: &[&str]| {
        let file = out.join(file).display().to_string();
        let mut all = vec!["image", "export", name, &file];
        all.extend(args);
        p.run(&all)
    };
    let export = |file: &str, format: &str| {
        let done = run("plain", file, &["--format", format]);
        assert!(done.status.success(), "{}", text(&done));
    };

    export("a.qcow2", "qcow2");
    // Standalone: no backing file.
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(out.join("a.qcow2"))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert!(info.get("backing-filename").is_none(), "{info}");
    // Its checksum file is `sha256sum -c`'s, and its sidecar names the derivation.
    let check = Command::new("sha256sum")
        .args(["-c", "a.qcow2.sha256"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    let sidecar: serde_json::Value =
        serde_json::from_slice(&fs_err::read(out.join("a.qcow2.farm.json")).unwrap()).unwrap();
    let shown: serde_json::Value =
        serde_json::from_slice(&p.ok(&["show", "--json", "plain"]).stdout).unwrap();
    assert_eq!(sidecar["derivation"], shown[0]["hash"]);
    assert_eq!(sidecar["format"], "qcow2");

    // The same derivation, exported again: the same bytes, in qcow2 and in raw.
    export("b.qcow2", "qcow2");
    assert!(
        fs_err::read(out.join("a.qcow2")).unwrap() == fs_err::read(out.join("b.qcow2")).unwrap()
    );
    export("a.raw", "raw");
    export("b.raw", "raw");
    assert!(fs_err::read(out.join("a.raw")).unwrap() == fs_err::read(out.join("b.raw")).unwrap());

    // An existing file is kept unless `--force`; nothing half-written is left beside it.
    let before = fs_err::read(out.join("a.raw")).unwrap();
    let refused = run("plain", "a.raw", &["--format", "qcow2"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("exists") && text(&refused).contains("--force"),
        "{}",
        text(&refused)
    );
    assert_eq!(fs_err::read(out.join("a.raw")).unwrap(), before);
    let forced = run("plain", "a.raw", &["--format", "qcow2", "--force"]);
    assert!(forced.status.success(), "{}", text(&forced));
    let names = crate::support::project::list(&out);
    assert!(!names.iter().any(|n| n.contains("partial")), "{names:?}");

    // What is not built, and what does not exist, are refused by name.
    let unbuilt = run("unbuilt", "u.qcow2", &[]);
    assert!(
        text(&unbuilt).contains("is not built") && text(&unbuilt).contains("farm build"),
        "{}",
        text(&unbuilt)
    );
    assert!(!out.join("u.qcow2").exists());
    let unknown = run("nosuch", "n.qcow2", &[]);
    assert!(
        !unknown.status.success() && text(&unknown).contains("nosuch"),
        "{}",
        text(&unknown)
    );
}

/// sha256 of a file, as `sha256sum` prints it.
fn sha256_of(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn a_container_disk_goes_to_a_real_registry_with_one_layer_holding_the_disk_for_qemu() {
    if !require_vm(
        "container_disk",
        &[Part::Program("skopeo"), Part::File(REGISTRY)],
    ) {
        return;
    }
    let p = Project::with_store(&LAB.replace("NONCE", &nonce()), &shared_store());
    p.ok(&["build", "plain"]);
    let out = p.path().join("out");
    fs_err::create_dir_all(&out).unwrap();
    let path = |file: &str| out.join(file).display().to_string();
    let registry = Registry::start();
    let target = format!("{}/farm/plain:v1", registry.address());

    let disk = path("plain.qcow2");
    p.ok(&["image", "export", "plain", &disk, "--compress"]);
    let archive = path("plain.oci");
    let pushed = p.run(&[
        "image",
        "export",
        "plain",
        &archive,
        "--format",
        "containerdisk",
        "--compress",
        "--push",
        &target,
    ]);
    assert!(pushed.status.success(), "{}", text(&pushed));
    let sidecar: serde_json::Value =
        serde_json::from_slice(&fs_err::read(out.join("plain.oci.farm.json")).unwrap()).unwrap();

    // What the registry holds: one layer, the image's digest the archive's, amd64 linux.
    let skopeo = |args: &[&str]| {
        let done = Command::new("skopeo").args(args).output().unwrap();
        assert!(done.status.success(), "skopeo {args:?}: {}", text(&done));
        serde_json::from_slice::<serde_json::Value>(&done.stdout).unwrap()
    };
    let remote = format!("docker://{target}");
    let inspected = skopeo(&["inspect", "--tls-verify=false", &remote]);
    assert_eq!(
        inspected["Layers"].as_array().unwrap().len(),
        1,
        "{inspected}"
    );
    assert_eq!(inspected["Digest"], sidecar["image_digest"], "{inspected}");
    assert_eq!(inspected["Architecture"], "amd64");
    assert_eq!(inspected["Os"], "linux");
    let local = skopeo(&["inspect", &format!("oci-archive:{archive}")]);
    assert_eq!(local["Layers"], inspected["Layers"]);

    // The layer, pulled back and unpacked: `disk/plain_amd64.qcow2`, owned by qemu (107), read
    // only, the same bytes as the plain qcow2 export of the same derivation.
    let pulled = out.join("pulled");
    let copy = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", &remote])
        .arg(format!("dir:{}", pulled.display()))
        .output()
        .unwrap();
    assert!(copy.status.success(), "{}", text(&copy));
    let layer_digest = inspected["Layers"][0].as_str().unwrap();
    let layer = pulled.join(layer_digest.trim_start_matches("sha256:"));
    let listing = Command::new("tar")
        .args(["--numeric-owner", "-tvf"])
        .arg(&layer)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).to_string();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 2, "{listing}");
    assert!(lines[0].starts_with("dr-xr-xr-x 107/107") && lines[0].ends_with("disk/"));
    assert!(
        lines[1].starts_with("-r--r--r-- 107/107") && lines[1].ends_with("disk/plain_amd64.qcow2"),
        "{listing}"
    );
    let unpacked = out.join("unpacked");
    fs_err::create_dir_all(&unpacked).unwrap();
    let untar = Command::new("tar")
        .arg("-xf")
        .arg(&layer)
        .arg("-C")
        .arg(&unpacked)
        .output()
        .unwrap();
    assert!(untar.status.success(), "{}", text(&untar));
    assert_eq!(
        sha256_of(&unpacked.join("disk/plain_amd64.qcow2")),
        sha256_of(std::path::Path::new(&disk))
    );

    // The archive is the same bytes when exported again.
    p.ok(&[
        "image",
        "export",
        "plain",
        &path("again.oci"),
        "--format",
        "containerdisk",
        "--compress",
    ]);
    assert_eq!(
        sha256_of(out.join("again.oci").as_path()),
        sidecar["sha256"]
    );

    // A registry that is not there: a clear refusal naming it, and nothing at the target.
    drop(registry);
    let refused = p.run(&[
        "image",
        "export",
        "plain",
        &path("gone.oci"),
        "--format",
        "containerdisk",
        "--push",
        &target,
    ]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("refused the containerDisk") && text(&refused).contains(&target),
        "{}",
        text(&refused)
    );
    let names = crate::support::project::list(&out);
    assert!(
        !names
            .iter()
            .any(|n| n.contains("gone") || n.contains("partial")),
        "{names:?}"
    );
}
