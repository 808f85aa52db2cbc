//! Lab snapshots of the nested lab (`nested.rs`'s shared lab, restored from its own
//! snapshot): L1 (the tests' hypervisor platform, its guests libvirt domains) with an L2 on
//! user networking and an L2 only on a VDE network that L1 attaches with a tap. `farm snapshot
//! save` saves it (the L2s inside L1's state), `restore` twice brings back exactly that
//! moment: every VM answers ssh, a file written before the save is there and one written
//! after it is not, the VDE L2 answers through L1's tap, and the snapshot's files (a store
//! entry on L1's layer, kept by gc while the snapshot is named) never change. Refusals (an unknown name, a taken name, another topology, removing a snapshot a
//! running lab uses) exit 2 and change nothing; `down` cleans everything. Exported and
//! imported into another store, the snapshot restores there by name.

use crate::nested::nested_lab;
use crate::support::lab::restored;
use crate::support::project::{self, Project, stdout, text};
use crate::support::skip::require_vm;

const VMS_ALL: [&str; 3] = ["hv", "pyleaf_amd64", "vleaf_amd64"];

/// The store entries of snapshot `name`, from its manifest.
fn entries_of(p: &Project, name: &str) -> Vec<std::path::PathBuf> {
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs_err::read(
            p.path()
                .join(".farm/snapshots")
                .join(name)
                .join("snapshot.json"),
        )
        .unwrap(),
    )
    .unwrap();
    manifest["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| p.store.join("store").join(v["entry"].as_str().unwrap()))
        .collect()
}

/// blake3 of every file of the snapshot's entries, by path.
fn fingerprint(entries: &[std::path::PathBuf]) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut dirs: Vec<std::path::PathBuf> = entries.to_vec();
    while let Some(dir) = dirs.pop() {
        for name in project::list(&dir) {
            let path = dir.join(&name);
            if path.is_dir() {
                dirs.push(path);
            } else {
                let bytes = fs_err::read(&path).unwrap();
                files.push((
                    path.display().to_string(),
                    blake3::hash(&bytes).to_hex().to_string(),
                ));
            }
        }
    }
    files.sort();
    files
}

/// Every VM has the mark written before the save and not the file written after it (read
/// through the Rust API, `farm::testing`).
fn assert_the_saved_moment(lab: &farm::testing::Lab) {
    for vm in VMS_ALL {
        let said = lab
            .vm(vm)
            .succeed("cat /root/mark; test -e /root/after && echo after-is-there; true")
            .unwrap();
        assert_eq!(said.trim(), "before", "{vm}");
    }
    // The VDE-only L2 answers over hv's tap (its ssh route), which the state holds.
    let addresses = lab.vm("vleaf_amd64").succeed("ip addr").unwrap();
    assert!(addresses.contains("10.0.0.21/24"), "{addresses}");
    let tap = lab.vm("hv").succeed("ip addr").unwrap();
    assert!(tap.contains("10.0.0.254/24"), "{tap}");
}

/// `restore --dry-run` says which VMs stop and which saved files load on which host, and
/// leaves the lab as it runs: hv's qemu is the same process and every VM still has the file
/// written after the save.
fn assert_a_restore_dry_run_changes_nothing(p: &Project, entry: &std::path::Path) {
    let pid = || fs_err::read_to_string(p.path().join(".farm/vms/hv/qemu.pid")).unwrap();
    let before = pid();
    let out = p.ok(&["snapshot", "restore", "booted", "--dry-run"]);
    let plan = stdout(&out);
    let entry = entry.file_name().unwrap().to_string_lossy().into_owned();
    for line in [
        "stop hv on host local (its state is discarded, and pyleaf_amd64, vleaf_amd64 inside it)",
        "start hv on host local: a new overlay on `",
        "resume pyleaf_amd64, vleaf_amd64 inside hv (saved in its state)",
        "wait for the 3 VM(s) to answer ssh",
    ] {
        assert!(plan.contains(line), "{line:?} not in:\n{}", text(&out));
    }
    let start = plan.lines().find(|l| l.contains("start hv")).unwrap();
    assert!(
        start.contains(&format!("{entry}/disk.qcow2`"))
            && start.contains(&format!("{entry}/state.zst`")),
        "{start}"
    );
    assert!(!text(&out).contains("restored"), "{}", text(&out));
    assert_eq!(pid(), before, "a dry run restarted hv");
    for vm in VMS_ALL {
        let out = p.ok(&["ssh", vm, "--", "test -e /root/after && echo still"]);
        assert_eq!(stdout(&out).trim(), "still", "{vm}: {}", text(&out));
    }
}

#[test]
fn the_nested_lab_is_saved_and_restored_twice_to_the_same_moment() {
    let Some(lab) = restored("snapshot", &nested_lab()) else {
        return;
    };
    let p = &lab.project;
    // A name an earlier, failed run of this test may have left in the kept lab.
    let _ = p.run(&["snapshot", "rm", "booted"]);
    let api = p.lab();
    for vm in VMS_ALL {
        api.vm(vm)
            .succeed("echo before > /root/mark; sync")
            .unwrap();
    }

    let save = p.ok(&["snapshot", "save", "booted"]);
    let log = String::from_utf8_lossy(&save.stderr).into_owned();
    assert!(
        log.contains("saved snapshot booted") && log.contains("restored snapshot booted"),
        "{log}"
    );
    let dir = p.path().join(".farm/snapshots/booted");
    // The saved VM is a store entry on hv's layer: its overlay, state and the VMs' records.
    let entries = entries_of(p, "booted");
    assert_eq!(entries.len(), 1, "{entries:?}");
    let saved = fingerprint(&entries);
    for file in [
        "disk.qcow2",
        "state.zst",
        "vms/hv/instance.json",
        "vms/vleaf_amd64/instance.json",
    ] {
        assert!(
            saved.iter().any(|(f, _)| f.ends_with(&format!("/{file}"))),
            "{file} not in {saved:?}"
        );
    }
    // gc keeps it (and the layers under it) while the snapshot is named.
    let gc = text(&p.ok(&["gc", "--dry-run", "--why"]));
    assert!(gc.contains("snapshot `booted`"), "{gc}");
    // It runs on from the snapshot: the same moment.
    assert_the_saved_moment(&api);
    let listed = stdout(&p.ok(&["snapshot", "ls"]));
    assert!(
        listed.contains("booted") && listed.contains("hv, pyleaf_amd64, vleaf_amd64"),
        "{listed}"
    );

    for round in 0..2 {
        for vm in VMS_ALL {
            p.ok(&["ssh", vm, "--", "echo x > /root/after; sync"]);
        }
        if round == 0 {
            assert_a_restore_dry_run_changes_nothing(p, &entries[0]);
        }
        // Once with the command, once through the Rust API.
        if round == 0 {
            let restore = p.ok(&["snapshot", "restore", "booted"]);
            let log = String::from_utf8_lossy(&restore.stderr).into_owned();
            assert!(
                log.contains("3 VM(s) answering ssh"),
                "round {round}: {log}"
            );
        } else {
            let manifest = api.restore("booted").unwrap();
            assert_eq!(manifest.inside, ["pyleaf_amd64", "vleaf_amd64"]);
        }
        assert_the_saved_moment(&api);
        assert_eq!(p.state_of("vleaf_amd64"), "running");
        // Nothing to do for `up`: the restored lab is what farm.toml says.
        let up = String::from_utf8_lossy(&p.ok_with_ansible(&["up"]).stderr).into_owned();
        assert!(
            !up.contains("starting") && !up.contains("restarting"),
            "{up}"
        );
    }
    assert_eq!(fingerprint(&entries), saved, "the snapshot's files changed");

    // Refusals: exit 2, nothing changed.
    let pid = fs_err::read_to_string(p.path().join(".farm/vms/hv/qemu.pid")).unwrap();
    for (args, says) in [
        (vec!["snapshot", "restore", "nope"], "No snapshot `nope`"),
        (
            vec!["snapshot", "save", "booted"],
            "Snapshot `booted` exists",
        ),
        (
            vec!["snapshot", "rm", "booted"],
            "runs on snapshot `booted`'s disk",
        ),
        (vec!["snapshot", "save", "../x"], "Invalid snapshot name"),
    ] {
        let out = p.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?}: {}", text(&out));
    }
    let toml = fs_err::read_to_string(p.path().join("farm.toml")).unwrap();
    fs_err::write(
        p.path().join("farm.toml"),
        toml.replace("[vms.vleaf_amd64]", "[vms.vleaf2_amd64]"),
    )
    .unwrap();
    let out = p.run(&["snapshot", "restore", "booted"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("another topology"), "{}", text(&out));
    fs_err::write(p.path().join("farm.toml"), toml).unwrap();
    assert_eq!(
        fs_err::read_to_string(p.path().join(".farm/vms/hv/qemu.pid")).unwrap(),
        pid,
        "a refused command stopped the lab"
    );

    // Down cleans everything; the snapshot goes with `rm`.
    p.ok(&["down"]);
    assert!(project::list(&p.path().join(".farm/vms")).is_empty());
    let archive = p.path().join("lab.tar.zst");
    let archive_arg = archive.display().to_string();
    p.ok(&["store", "export", "-o", &archive_arg, "booted"]);
    p.ok(&["snapshot", "rm", "booted"]);
    assert!(!dir.exists());
    assert!(!stdout(&p.ok(&["snapshot", "ls"])).contains("booted"));

    // A store that received the snapshot (as a CI runner pulls one) restores it by name,
    // without the state directory that saved it: the layers inside L1 came along, so `up`
    // finds the lab as farm.toml says.
    let other = tempfile::tempdir().unwrap();
    let with_other = |args: &[&str]| {
        let out = p
            .farm_with_ansible(args)
            .env("FARM_STORE", other.path().join("cache"))
            .output()
            .unwrap();
        assert!(out.status.success(), "farm {args:?}\n{}", text(&out));
        out
    };
    with_other(&["store", "import", &archive_arg]);
    with_other(&["snapshot", "restore", "booted"]);
    assert_the_saved_moment(&api);
    let up = String::from_utf8_lossy(&with_other(&["up"]).stderr).into_owned();
    assert!(
        !up.contains("starting") && !up.contains("restarting"),
        "{up}"
    );
    with_other(&["down"]);
    assert!(project::list(&p.path().join(".farm/vms")).is_empty());
}

/// A device qemu cannot save (an NVMe controller, in qemu 7.2) fails the save with qemu's
/// name for it and a hint, writes no state, and leaves the VM as it was.
#[test]
fn a_device_that_cannot_migrate_is_named() {
    if !require_vm("snapshot_device", &[]) {
        return;
    }
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qmp.sock");
    let mut qemu = std::process::Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-S", "-device", "nvme,serial=farm-test", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut qmp = loop {
        match farm::sys::qmp::Qmp::connect(&socket, Duration::from_secs(10)) {
            Ok(qmp) => break qmp,
            Err(e) if Instant::now() > deadline => panic!("qemu's QMP never answered: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let state = dir.path().join("state.zst");
    let error = farm::run::snapshot::save_state("nvm", &mut qmp, &state)
        .unwrap_err()
        .to_string();
    let status = qmp.command("query-status", serde_json::json!({}));
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(
        error.contains("Cannot save VM `nvm`")
            && error.contains("non-migratable device")
            && error.contains("nvme")
            && error.contains("hint: a device of this VM cannot be saved"),
        "{error}"
    );
    assert!(!state.exists(), "a failed save left {state:?}");
    assert_eq!(status.unwrap()["status"], "prelaunch");
}

/// A dry run is refused as the restore would be (exit 2), and reads only: no state
/// directory, no store.
#[test]
fn a_restore_dry_run_of_an_unknown_snapshot_is_refused_and_creates_nothing() {
    let p = Project::new(
        "[images.local]\npath = \"base.qcow2\"\n\n[targets.amd64]\narch = \"x86_64\"\n\n\
         [platforms.p]\nfrom = \"local\"\n\n[vms.a]\nplatform = \"p\"\n",
    );
    p.blank_disk("base.qcow2");
    let out = p.run(&["snapshot", "restore", "nope", "--dry-run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("No snapshot `nope`"), "{}", text(&out));
    assert!(!p.path().join(".farm").exists());
    assert!(!p.store.exists());
}
