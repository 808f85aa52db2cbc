//! Per-step checkpoints of platform builds, on farm's tiny image in real build VMs: a
//! rebuild after changing the last `run` command loads the machine state saved after the
//! step before it and runs only that command; the result is one layer on its parent with
//! no trace of the old command; a checkpoint whose saved state is gone is booted instead;
//! and a failing step keeps the checkpoints of the steps before it.

use crate::support::project;
use crate::support::skip::require_vm;
use crate::support::test_home::shared_store;

use project::{Project, nonce, text};

fn lab(nonce: &str, last: &str) -> String {
    format!(
        r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.stepped]
from = "tiny"
memory = "256M"
run = ["echo {nonce} > /first", "{last}"]

[vms.stepped]
platform = "stepped"
"#
    )
}

/// The build log of the platform's current entry.
fn build_log(p: &Project) -> String {
    let entry = p.entry("stepped_amd64");
    let name = entry.file_name().unwrap().to_string_lossy().into_owned();
    fs_err::read_to_string(p.store.join("logs").join(format!("{name}.log"))).unwrap()
}

fn build(p: &Project, nonce: &str, last: &str) -> String {
    fs_err::write(p.path().join("farm.toml"), lab(nonce, last)).unwrap();
    let out = p.ok(&["build"]);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ssh(p: &Project, script: &str) -> String {
    let out = p.ok(&["ssh", "stepped", "--", script]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_changed_last_step_resumes_from_the_step_before_it() {
    if !require_vm("step_cache", &[]) {
        return;
    }
    // New commands on every run, so a store kept from an earlier run has none of them.
    let nonce = format!("n{}", nonce());
    let p = Project::with_store(&lab(&nonce, "echo two > /two"), &shared_store());
    let cold = build(&p, &nonce, "echo two > /two");
    // (The first step, growing the root, may come from another build on the same parent.)
    assert!(!cold.contains("2/3 build steps"), "{cold}");
    assert!(build_log(&p).contains("saved the machine state after step 2"));

    // Only the last command changed: grow + run[0] come from the checkpoint, loaded warm.
    let warm = build(&p, &nonce, "echo three > /three");
    assert!(warm.contains("2/3 build steps from checkpoints"), "{warm}");
    let log = build_log(&p);
    assert!(log.contains("loaded the saved machine state"), "{log}");
    assert!(!log.contains(&format!("== run[0] `echo {nonce}")), "{log}");

    // One layer on the tiny image, whatever the checkpoints beneath the build.
    let entry = p.entry("stepped_amd64");
    let tiny = p.entry("tiny-amd64");
    let info = farm::sys::qemu_img::info(&entry.join("disk.qcow2")).unwrap();
    assert_eq!(
        info.backing_filename.as_deref(),
        Some(
            format!(
                "../{}/disk.qcow2",
                tiny.file_name().unwrap().to_string_lossy()
            )
            .as_str()
        )
    );
    p.ok(&["up"]);
    assert_eq!(ssh(&p, "cat /first"), nonce);
    assert_eq!(ssh(&p, "cat /three"), "three");
    assert_eq!(
        ssh(&p, "[ -e /two ] && echo present || echo absent"),
        "absent"
    );
    let keys = ssh(&p, "cat /root/.ssh/authorized_keys");
    assert!(!keys.contains("farm-build"), "{keys}");
    p.ok(&["down"]);

    // A checkpoint whose machine state is gone is booted: slower, the same result.
    let resumed_from = log
        .lines()
        .find_map(|l| {
            l.split_once("resuming after step 2 of 3 (")
                .map(|(_, rest)| rest)
        })
        .and_then(|l| l.split('`').rev().nth(1))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| panic!("no resume line in the log:\n{log}"));
    fs_err::remove_file(resumed_from.join("vm/state.zst")).unwrap();
    let booted = build(&p, &nonce, "echo four > /four");
    assert!(
        booted.contains("2/3 build steps from checkpoints"),
        "{booted}"
    );
    let log = build_log(&p);
    assert!(log.contains("cannot load the machine state"), "{log}");
    assert!(log.contains("ssh answered after boot"), "{log}");

    // A failing step keeps what came before it: the fix resumes right there.
    fs_err::write(p.path().join("farm.toml"), lab(&nonce, "false")).unwrap();
    let failed = p.run(&["build"]);
    assert!(!failed.status.success(), "{}", text(&failed));
    let fixed = build(&p, &nonce, "echo five > /five");
    assert!(
        fixed.contains("2/3 build steps from checkpoints"),
        "{fixed}"
    );
}
