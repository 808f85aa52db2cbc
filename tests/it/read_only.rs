//! A read-only store serves what it holds (issue 31): a cache shared on a read-only mount,
//! or a container's layer. Each command runs in a mount namespace of its own where the
//! store is bind-mounted read-only: the kernel refuses every write with EROFS, as on a real
//! read-only filesystem.

use std::process::Output;

use crate::support::mount_ns::{self, StoreMount};
use crate::support::project::{Project, text};

const TOML: &str = "[images.local]\npath = \"disk.qcow2\"\n\n[targets.amd64]\narch = \"x86_64\"\n";

fn read_only(project: &Project, args: &[&str]) -> Output {
    mount_ns::farm(project, StoreMount::ReadOnly, args)
}

#[test]
fn a_read_only_store_serves_builds_verify_listing_and_export() {
    if !mount_ns::available("a_read_only_store_serves_builds_verify_listing_and_export") {
        return;
    }
    let project = Project::new(TOML);
    project.blank_disk("disk.qcow2");
    project.ok(&["build"]);
    let entries = project.entries();
    assert_eq!(entries.len(), 1, "{entries:?}");

    // Writing is refused, as on a read-only filesystem.
    let probe = read_only(&project, &["--version"]);
    assert!(probe.status.success(), "{}", text(&probe));

    for args in [
        vec!["build"],
        vec!["store", "verify"],
        vec!["store", "ls"],
        vec!["check"],
    ] {
        let out = read_only(&project, &args);
        assert!(
            out.status.success(),
            "farm {args:?} on a read-only store:\n{}",
            text(&out)
        );
    }
    let exported = project.path().join("out.farm");
    let out = read_only(
        &project,
        &["store", "export", "local", "-o", exported.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "export on a read-only store:\n{}",
        text(&out)
    );
    assert!(exported.metadata().unwrap().len() > 0);

    // What must write says so, and names the store.
    let gc = read_only(&project, &["gc"]);
    assert!(!gc.status.success(), "{}", text(&gc));
    let said = String::from_utf8_lossy(&gc.stderr);
    assert!(
        said.contains(&format!(
            "The store at `{}` cannot be written to",
            project.store.display()
        )),
        "{said}"
    );
    project.write(
        "farm.toml",
        &format!("{TOML}\n[platforms.p]\nfrom = \"local\"\nrun = [\"true\"]\n"),
    );
    let build = read_only(&project, &["build"]);
    assert!(!build.status.success(), "{}", text(&build));
    let said = String::from_utf8_lossy(&build.stderr);
    assert!(said.contains("cannot be written to"), "{said}");
    assert_eq!(project.entries(), entries, "nothing changed in the store");
}

/// `up` from layers a read-only store holds: the overlays live in the project's state
/// directory, so nothing needs the store to be writable. The tiny image comes from the
/// shared store (built once per run), which only this command's namespace sees read-only.
#[test]
fn up_starts_a_lab_from_layers_in_a_read_only_store() {
    let test = "up_starts_a_lab_from_layers_in_a_read_only_store";
    if !crate::support::skip::require_vm(test, &[]) || !mount_ns::available(test) {
        return;
    }
    let project = Project::with_store(
        "[images.tiny]\ntiny = true\n\n[targets.amd64]\narch = \"x86_64\"\n\n\
         [platforms.small]\nfrom = \"tiny\"\nmemory = \"256M\"\n\n[vms.t]\nplatform = \"small\"\n",
        &crate::support::test_home::shared_store(),
    );
    project.ok(&["build"]);
    let up = read_only(&project, &["up"]);
    let stopped = project.run(&["down"]);
    assert!(
        up.status.success(),
        "up on a read-only store:\n{}",
        text(&up)
    );
    assert!(
        String::from_utf8_lossy(&up.stderr).contains("ready t"),
        "{}",
        text(&up)
    );
    assert!(stopped.status.success(), "{}", text(&stopped));
}
