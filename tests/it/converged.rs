//! `[lab] converged_snapshot = true` on a tiny VM (ssh in seconds under TCG): the first `up`
//! boots the lab, provisions it and saves it as the snapshot `converged`; after `down`, `up`
//! starts it from that snapshot (the same kernel boot, provisioned, its playbook not run
//! again, nothing written after the save); `--boot` boots it and saves it again; a changed
//! declaration is another lab, which boots and replaces the snapshot; `up` of one VM by name
//! neither restores nor saves.

use crate::support::project::{self, Project, text};
use crate::support::skip::{ANSIBLE, require_vm};
use crate::support::test_home::shared_store;

/// The VM's playbook (`raw`: the tiny image has no python): it records the kernel's boot id,
/// which the kernel makes when it is first read, so the saved moment has one.
const PLAYBOOK: &str = r#"- hosts: all
  gather_facts: false
  tasks:
    - name: The boot it was provisioned in
      ansible.builtin.raw: "cat /proc/sys/kernel/random/boot_id > /root/provisioned-in && sync"
"#;

const LAB: &str = r#"
[lab]
converged_snapshot = true

[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.plain]
from = "tiny"
memory = "256M"

[vms.solo]
platform = "plain"
playbook = "provision.yml"
"#;

/// The guest kernel's id of its current boot: a new one after every boot, the same one
/// after a restore.
fn boot_id(p: &Project) -> String {
    let out = p.ok(&[
        "ssh",
        "solo",
        "--",
        "cat",
        "/proc/sys/kernel/random/boot_id",
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn key_file(p: &Project) -> std::path::PathBuf {
    p.path().join(".farm/snapshots/converged/up-key")
}

fn provisioned_in(p: &Project) -> String {
    let out = p.ok(&["ssh", "solo", "--", "cat", "/root/provisioned-in"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The store entry of the one VM of snapshot `name`.
fn entry_of(p: &Project, name: &str) -> String {
    let manifest = p
        .path()
        .join(".farm/snapshots")
        .join(name)
        .join("snapshot.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs_err::read(&manifest).unwrap()).unwrap();
    manifest["vms"][0]["entry"].as_str().unwrap().to_string()
}

fn has_file(p: &Project, path: &str) -> bool {
    p.run(&["ssh", "solo", "--", "test", "-e", path])
        .status
        .success()
}

#[test]
fn up_saves_the_converged_lab_and_starts_from_it_until_farm_toml_changes() {
    if !require_vm("converged_snapshot", &[ANSIBLE]) {
        return;
    }
    let p = Project::with_store(LAB, &shared_store());
    p.write("provision.yml", PLAYBOOK);

    // From nothing: booted, provisioned, then saved.
    let first = p.ok_with_ansible(&["up"]);
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("saved snapshot converged"),
        "{}",
        text(&first)
    );
    let key = fs_err::read_to_string(key_file(&p)).unwrap();
    let saved_boot = boot_id(&p);
    assert_eq!(provisioned_in(&p), saved_boot);
    // Written after the save: a start from the snapshot does not have it.
    p.ok(&["ssh", "solo", "--", "touch", "/root/after-save"]);

    // Down, then up: the plan says so, and the lab is the saved moment of the same boot.
    p.ok(&["down"]);
    let plan = p.ok(&["up", "--dry-run"]);
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains("start from snapshot converged"),
        "{}",
        text(&plan)
    );
    let restored = p.ok_with_ansible(&["up"]);
    let said = String::from_utf8_lossy(&restored.stderr);
    assert!(
        said.contains("restored snapshot converged")
            && !said.contains("starting solo")
            && !said.contains("saved snapshot")
            && !said.contains("playbook"),
        "{}",
        text(&restored)
    );
    assert_eq!(boot_id(&p), saved_boot, "{}", text(&restored));
    assert_eq!(provisioned_in(&p), saved_boot);
    assert!(!has_file(&p, "/root/after-save"));
    // The snapshot the lab runs on is not removed, however the store is named (here
    // relative to farm.toml's directory, as `cache/` is by default).
    let up_to_root = "../".repeat(p.path().components().count() - 1);
    let store = shared_store();
    let relative = format!("{up_to_root}{}", store.strip_prefix("/").unwrap().display());
    let rm = p
        .farm(&["snapshot", "rm", "converged"])
        .env("FARM_STORE", &relative)
        .output()
        .unwrap();
    assert_eq!(rm.status.code(), Some(2), "{}", text(&rm));
    assert!(key_file(&p).exists());
    // A second up changes nothing.
    let pid = fs_err::read_to_string(p.path().join(".farm/vms/solo/qemu.pid")).unwrap();
    p.ok_with_ansible(&["up"]);
    assert_eq!(
        fs_err::read_to_string(p.path().join(".farm/vms/solo/qemu.pid")).unwrap(),
        pid
    );

    // A snapshot of the restored lab holds what the lab wrote before `converged` was saved:
    // its disk backs onto converged's, not onto the layer. Read from the disk, not from the
    // guest's cache.
    p.ok(&["ssh", "solo", "--", "echo second > /root/second && sync"]);
    p.ok(&["snapshot", "save", "second"]);
    let disk = shared_store()
        .join("store")
        .join(entry_of(&p, "second"))
        .join("disk.qcow2");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&disk)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        info["backing-filename"],
        format!("../{}/disk.qcow2", entry_of(&p, "converged")),
        "{info}"
    );
    p.ok(&["snapshot", "restore", "second"]);
    let read = p.ok(&[
        "ssh",
        "solo",
        "--",
        "echo 3 > /proc/sys/vm/drop_caches; cat /root/provisioned-in /root/second",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&read.stdout),
        format!("{saved_boot}\nsecond\n"),
        "{}",
        text(&read)
    );

    // `--boot` boots, and saves the snapshot again under the same key.
    p.ok(&["down"]);
    p.ok(&["snapshot", "rm", "second"]);
    let booted = p.ok_with_ansible(&["up", "--boot"]);
    assert!(
        String::from_utf8_lossy(&booted.stderr).contains("saved snapshot converged"),
        "{}",
        text(&booted)
    );
    let rebooted = boot_id(&p);
    assert_ne!(rebooted, saved_boot);
    assert_eq!(provisioned_in(&p), rebooted);
    assert_eq!(fs_err::read_to_string(key_file(&p)).unwrap(), key);

    // Another declaration is another lab: it boots, and its snapshot replaces the old one.
    p.ok(&["down"]);
    fs_err::write(
        p.path().join("farm.toml"),
        LAB.replace("memory = \"256M\"", "memory = \"288M\""),
    )
    .unwrap();
    let changed = p.ok_with_ansible(&["up"]);
    let said = String::from_utf8_lossy(&changed.stderr);
    assert!(
        said.contains("starting solo (new)") && said.contains("saved snapshot converged"),
        "{}",
        text(&changed)
    );
    assert_ne!(boot_id(&p), rebooted);
    assert_ne!(fs_err::read_to_string(key_file(&p)).unwrap(), key);

    // One VM by name is not the whole lab: it boots, and nothing is saved.
    p.ok(&["down"]);
    let named = p.ok_with_ansible(&["up", "solo"]);
    assert!(
        !String::from_utf8_lossy(&named.stderr).contains("snapshot converged:"),
        "{}",
        text(&named)
    );

    p.ok(&["down"]);
    p.ok(&["snapshot", "rm", "converged"]);
    assert!(project::list(&p.path().join(".farm/snapshots")).is_empty());
}
