//! `farm image export` (issue 32, begun): a built platform as one standalone disk, its
//! chain flattened, with its checksum and the derivation it came from beside it; the same
//! bytes every time for qcow2 and raw; nothing written over an existing file without
//! `--force`, and a clear refusal for what is not built.

use crate::support::project::{Project, nonce, text};
use crate::support::skip::require_vm;
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
