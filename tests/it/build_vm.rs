//! Platform layers built in real build VMs (qemu under TCG, a Debian image built from the
//! mirror), checked by booting the result and looking inside over ssh.
//!
//! All tests share one store (`tests/support/guest.rs::shared_store`), so the Debian image
//! and the common parent layer are built once per run, whichever test gets there first.

use crate::support::guest;
use crate::support::labs;
use crate::support::project;
use crate::support::skip::require_vm;
use crate::support::test_home::shared_store;

use std::time::{Duration, Instant};

use farm::build::layer::BootFiles;
use guest::{Guest, keygen};
use project::{Project, list, nonce, text};

/// The Debian image, its upgraded parent, and a layer with a package on it: the expensive
/// part, identical in every test (and shared with the labs' Debian layers) so it is built once.
fn base_lab() -> String {
    labs::debian(
        r#"
[platforms.base]
from = "upgraded"
packages = ["tree"]
"#,
    )
}

fn project(child: &str) -> Project {
    Project::with_store(&format!("{}\n{child}", base_lab()), &shared_store())
}

/// The boot files an entry boots with: its own, else its ancestors'.
fn boot_files(project: &Project, entry: &std::path::Path) -> Option<BootFiles> {
    let mut dir = entry.to_path_buf();
    loop {
        if let Some(boot) = BootFiles::in_dir(&dir.join("boot")) {
            return Some(boot);
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&fs_err::read(dir.join("meta.json")).unwrap()).unwrap();
        let parent = meta["parent"].as_str()?;
        dir = project.store.join("store").join(parent);
    }
}

#[test]
fn a_platform_with_every_step_kind_builds_and_an_instance_has_their_effects() {
    if !require_vm("every_step_kind", &[]) {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let user = keygen(keys.path(), "user");
    let p = project(
        r#"
[platforms.app]
from = "base"
authorized_keys = ["keys/user.pub"]
files = { "/etc/farm-motd" = "motd.txt" }
run = ["echo built > /etc/farm-marker", "tree --version > /etc/tree-version"]
"#,
    );
    p.write("keys/user.pub", &user.public);
    p.write("motd.txt", "hello from a farm test\n");
    p.ok(&["build"]);

    let entry = p.entry("app_amd64");
    let guest = Guest::boot(&entry, boot_files(&p, &entry), &user, false);
    assert_eq!(guest.sh("hostname"), "test-guest");
    assert_eq!(guest.sh("cat /etc/farm-motd"), "hello from a farm test");
    assert_eq!(guest.sh("cat /etc/farm-marker"), "built");
    assert!(guest.sh("cat /etc/tree-version").starts_with("tree v"));
    assert!(
        guest
            .sh("dpkg-query -W -f='${Status}' tree")
            .contains("install ok installed")
    );
    // The build key is gone: only the user's key is authorised.
    let keys = guest.sh("cat /root/.ssh/authorized_keys");
    let key_lines: Vec<&str> = keys
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(key_lines.len(), 1, "{keys}");
    assert!(keys.contains(user.public.split_whitespace().nth(1).unwrap()));
}

#[test]
fn a_rebuild_is_a_cache_hit_and_only_changed_layers_are_rebuilt() {
    if !require_vm("cache_hits", &[]) {
        return;
    }
    let child = |marker: &str| {
        format!("[platforms.leaf]\nfrom = \"base\"\nrun = [\"echo {marker} > /etc/leaf\"]\n")
    };
    let p = project(&child("one"));
    p.ok(&["build"]);
    let base = p.entry("base_amd64");
    let base_mtime = fs_err::metadata(&base).unwrap().modified().unwrap();
    let leaf_one = p.entry("leaf_amd64");

    // Same inputs: nothing to do, no VM booted, fast.
    let started = Instant::now();
    let again = p.ok(&["build"]);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("cached"),
        "{}",
        text(&again)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a cache hit boots nothing"
    );
    assert!(p.entries().len() >= 3);

    // Only the child's `run` changed: only the child is rebuilt. (The new marker is new on
    // every run, so a store kept from an earlier run does not have it already.)
    let nonce = nonce();
    fs_err::write(
        p.path().join("farm.toml"),
        format!("{}\n{}", base_lab(), child(&format!("two-{nonce}"))),
    )
    .unwrap();
    let plan = String::from_utf8_lossy(&p.ok(&["plan"]).stdout).into_owned();
    assert!(plan.contains("cached      base_amd64"), "{plan}");
    assert!(
        plan.lines()
            .any(|l| l.starts_with("build") && l.contains("leaf_amd64")),
        "{plan}"
    );
    p.ok(&["build"]);
    assert_eq!(
        fs_err::metadata(&base).unwrap().modified().unwrap(),
        base_mtime
    );
    // The new leaf is an entry of its own; the old one is still there for whoever uses it.
    // (Counted by path, not by listing: other tests share the store and its leaf names.)
    let leaf_two = p.entry("leaf_amd64");
    assert_ne!(leaf_two, leaf_one, "the changed leaf has a new entry");
    assert!(leaf_one.exists() && leaf_two.exists());

    // A changed parent changes both derivations.
    let changed_parent =
        base_lab().replace("packages = [\"tree\"]", "packages = [\"tree\", \"less\"]");
    let q = Project::with_store(
        &format!("{changed_parent}\n{}", child("two")),
        &shared_store(),
    );
    let plan = String::from_utf8_lossy(&q.ok(&["plan"]).stdout).into_owned();
    assert!(
        plan.lines()
            .any(|l| l.starts_with("build") && l.contains("base_amd64")),
        "{plan}"
    );
    assert!(
        plan.lines()
            .any(|l| l.starts_with("build") && l.contains("leaf_amd64")),
        "{plan}"
    );
    assert!(plan.contains("cached      bookworm-amd64"), "{plan}");
}

#[test]
fn a_failing_run_step_names_the_platform_and_step_and_stores_nothing() {
    if !require_vm("failing_step", &[]) {
        return;
    }
    let p = project(
        "[platforms.broken]\nfrom = \"base\"\nrun = [\"echo about to fail\", \"echo oops >&2; exit 3\"]\n",
    );
    let before = p.entries();
    let out = p.run(&["build"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Cannot build `broken_amd64`"), "{stderr}");
    assert!(
        stderr.contains("run[1] `echo oops >&2; exit 3`"),
        "{stderr}"
    );
    assert!(stderr.contains("exit status 3"), "{stderr}");
    assert!(
        stderr.contains("oops"),
        "the step's output tail is shown: {stderr}"
    );
    assert!(stderr.contains("hint: the full log is"), "{stderr}");
    let after: Vec<String> = p
        .entries()
        .into_iter()
        .filter(|e| !before.contains(e))
        .collect();
    assert!(
        after.iter().all(|e| !e.ends_with("-broken_amd64")),
        "{after:?}"
    );
}

#[test]
fn a_farm_killed_mid_build_leaves_no_entry_and_the_next_build_succeeds() {
    if !require_vm("killed_build", &[]) {
        return;
    }
    // New on every run: a store kept from an earlier run must not have the layer.
    let p = project(&format!(
        "[platforms.slow]\nfrom = \"base\"\nrun = [\"sleep 30\", \"echo {} > /etc/slow\"]\n",
        nonce()
    ));
    // Make sure the shared parents exist, so the kill lands in this layer's build VM.
    p.ok(&["build", "base"]);
    // Staging directories of the shared store that this build did not make (another test's,
    // or a killed build's of an earlier run) are not looked at.
    let tmp = p.store.join("tmp");
    let before = list(&tmp);
    let mut child = p
        .farm(&["build", "slow"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    // Wait until the build VM is up and running the steps (its staging dir has a build log).
    let staging = loop {
        let staging: Vec<String> = list(&tmp)
            .into_iter()
            .filter(|d| d.contains("-slow_amd64.") && !before.contains(d))
            .collect();
        let running = staging
            .iter()
            .any(|d| tmp.join(d).join("build/serial.log").exists());
        if running {
            std::thread::sleep(Duration::from_secs(20));
            break staging;
        }
        assert!(Instant::now() < deadline, "the build VM never started");
        std::thread::sleep(Duration::from_millis(200));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(p.in_store("slow_amd64"), None);
    // The build VM died with farm (PR_SET_PDEATHSIG).
    std::thread::sleep(Duration::from_secs(1));
    let ps = std::process::Command::new("pgrep")
        .args(["-f", "process=farm-build-slow_amd64"])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "qemu outlived farm: {}",
        String::from_utf8_lossy(&ps.stdout)
    );

    p.ok(&["build", "slow"]);
    assert!(p.entry("slow_amd64").join("disk.qcow2").exists());
    assert!(
        staging.iter().all(|d| !tmp.join(d).exists()),
        "the stale staging dir {staging:?} was removed"
    );
}

#[test]
fn a_guest_that_never_answers_fails_after_the_timeout_with_its_serial_log() {
    if !require_vm("boot_timeout", &[]) {
        return;
    }
    let p = project("[platforms.never]\nfrom = \"base\"\nrun = [\"true\"]\n");
    p.ok(&["build", "base"]);
    // Booted, not loaded from a saved state (which answers within a second).
    let out = p
        .farm(&["build", "--no-checkpoints", "never"])
        .env("FARM_BOOT_TIMEOUT", "3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not answer ssh within 3 s"), "{stderr}");
    assert!(
        stderr.contains("last lines of its serial console"),
        "{stderr}"
    );
    assert_eq!(p.in_store("never_amd64"), None);
}

#[test]
fn check_builds_a_layer_again_in_a_build_vm_and_reports_that_its_bytes_differ() {
    if !require_vm("check_layer", &[]) {
        return;
    }
    // A step whose result depends on the time: the rebuilt layer cannot be the same bytes.
    let p = Project::with_store(
        r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.stamp]
from = "tiny"
run = ["date +%s%N > /etc/stamp"]
"#,
        &shared_store(),
    );
    p.ok(&["build"]);
    let entry = p.entry("stamp_amd64");
    let meta_before = fs_err::read(entry.join("meta.json")).unwrap();

    let out = p.ok(&["build", "--check", "stamp"]);
    let said = text(&out);
    assert!(
        said.contains("differs stamp_amd64: rebuilt blake3-"),
        "{said}"
    );
    assert!(
        said.contains("checked 0 reproduced, 1 differ, 0 fixed-output"),
        "only the named platform is rebuilt, not the tiny image under it: {said}"
    );
    let strict = p.run(&["build", "--check", "--strict", "stamp"]);
    assert_eq!(strict.status.code(), Some(1), "{}", text(&strict));
    assert!(
        text(&strict).contains("1 derivation is not reproducible: `stamp_amd64`"),
        "{}",
        text(&strict)
    );
    assert_eq!(
        fs_err::read(entry.join("meta.json")).unwrap(),
        meta_before,
        "the stored entry is untouched"
    );
    assert_eq!(p.entry("stamp_amd64"), entry);
}

/// `builder = "chroot"` on farm's own Debian image (ext4 on the whole disk, a kernel kept
/// beside it): the steps run without the image booted, a failed step is resumed after like
/// any other (the appliance mounts the checkpoint again), and what the chroot needed is not
/// in the layer.
#[test]
fn a_chroot_build_on_a_debian_image_resumes_after_a_failed_step_and_leaves_no_trace() {
    if !require_vm("chroot_debian", &[]) {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let user = keygen(keys.path(), "user");
    let platform = |last: &str| {
        format!(
            r#"
[platforms.jailed]
from = "base"
builder = "chroot"
authorized_keys = ["keys/user.pub"]
files = {{ "/etc/farm-motd" = "motd.txt" }}
run = ["if [ -d /run/systemd/system ]; then echo booted; else echo chroot; fi > /etc/farm-marker", "{last}"]
"#
        )
    };
    let p = project(&platform("echo oops >&2; exit 7"));
    p.write("keys/user.pub", &user.public);
    p.write("motd.txt", "hello from a chroot\n");
    let failed = p.run(&["build"]);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("run[1] `echo oops >&2; exit 7`"),
        "{stderr}"
    );
    assert!(stderr.contains("exit status 7"), "{stderr}");

    p.write(
        "farm.toml",
        &format!(
            "{}\n{}",
            base_lab(),
            platform("tree --version > /etc/tree-version")
        ),
    );
    let built = text(&p.ok(&["build"]));
    assert!(
        built.contains("4/5 build steps from checkpoints"),
        "{built}"
    );

    let entry = p.entry("jailed_amd64");
    let guest = Guest::boot(&entry, boot_files(&p, &entry), &user, false);
    assert_eq!(guest.sh("cat /etc/farm-marker"), "chroot");
    assert_eq!(guest.sh("cat /etc/farm-motd"), "hello from a chroot");
    assert!(guest.sh("cat /etc/tree-version").starts_with("tree v"));
    assert_eq!(
        guest.sh("ls -d /usr/sbin/policy-rc.d /var/lib/farm-chroot 2>/dev/null; true"),
        ""
    );
}

/// A disk the appliance finds no root filesystem on fails at once, saying what it looked
/// for and what to do instead.
#[test]
fn a_chroot_build_on_a_disk_without_an_ext4_root_is_refused_with_a_hint() {
    if !require_vm("chroot_blank", &[]) {
        return;
    }
    let p = Project::with_store(
        "[images.blank]\npath = \"blank.qcow2\"\n[targets.amd64]\narch = \"x86_64\"\n\
         [platforms.b]\nfrom = \"blank\"\nbuilder = \"chroot\"\nrun = [\"true\"]\n",
        &shared_store(),
    );
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(p.path().join("blank.qcow2"))
        .arg("64M")
        .status()
        .unwrap();
    assert!(status.success());
    let out = p.run(&["build"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Cannot mount the image of `b_amd64` for a chroot build"),
        "{stderr}"
    );
    assert!(stderr.contains("found no ext4 root filesystem"), "{stderr}");
    assert!(stderr.contains("set `builder = \"boot\"`"), "{stderr}");
    assert_eq!(p.in_store("b_amd64"), None);
}
