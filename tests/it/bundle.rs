//! The bundled lab (the repository's farm.toml, images/, platforms/ and ansible/: the
//! README's main command brings it up) and the labs in `examples/` are checked as a user
//! would first meet them: `farm check` accepts each and `farm up --dry-run` plans it, on an
//! empty store. The bundle's L1 and L2 layers are the same derivations as the nested tests'
//! lab (CI builds them once for both) and as the two-hypervisor example's.

use crate::support::labs;
use crate::support::project::{Project, stdout, text};

use std::path::Path;

/// The bundle copied into a project of its own, so nothing is written into the repository,
/// with L1's port on this machine one that is free (a lab of the bundle may be running).
fn bundle() -> Project {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let port = farm::sys::hostinfo::free_local_port().unwrap();
    copied(
        root,
        &[
            "images",
            "platforms",
            "ansible",
            "ansible/group_vars",
            "tests/lab",
        ],
        Some(("ssh_port = 2201", &format!("ssh_port = {port}"))),
    )
}

/// The example lab `examples/NAME` in a project of its own.
fn example(name: &str) -> Project {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    copied(&root, &[], None)
}

/// The farm.toml at `root`, with `edit`'s first text (which must be there) replaced by its
/// second, and the files beside it and in `dirs`, in a project of its own.
fn copied(root: &Path, dirs: &[&str], edit: Option<(&str, &str)>) -> Project {
    let mut farm_toml = fs_err::read_to_string(root.join("farm.toml")).unwrap();
    if let Some((from, to)) = edit {
        assert!(farm_toml.contains(from), "{farm_toml}");
        farm_toml = farm_toml.replace(from, to);
    }
    let project = Project::new(&farm_toml);
    for dir in std::iter::once("").chain(dirs.iter().copied()) {
        for entry in fs_err::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(root).unwrap().to_str().unwrap();
            if path.is_file() && relative != "farm.toml" {
                project.write(relative, &fs_err::read_to_string(&path).unwrap());
            }
        }
    }
    project
}

/// The derivation hash `farm show` gives `name`.
fn hash_of(project: &Project, name: &str) -> String {
    let out = project.ok(&["show", name]);
    stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix("hash: "))
        .unwrap_or_else(|| panic!("no hash for `{name}`: {}", text(&out)))
        .to_string()
}

#[test]
fn the_bundled_lab_checks_and_plans_debian_at_every_level() {
    let p = bundle();
    let check = p.ok(&["check"]);
    let said = stdout(&check);
    assert!(said.contains("3 VMs"), "{said}");
    for vm in [
        "debian_vs_amd64",
        "debian_vs_user_amd64",
        "debian_vs_vde_amd64",
    ] {
        assert!(said.contains(vm), "{vm}: {said}");
    }
    let plan = p.ok(&["up", "--dry-run"]);
    let planned = text(&plan);
    for line in [
        "debian_vs_amd64",
        "debian_vs_user_amd64",
        "debian_vs_vde_amd64",
        "ansible/guest_provision.yml",
    ] {
        assert!(planned.contains(line), "{line}: {planned}");
    }
    assert!(
        !p.path().join(".farm/vms").exists(),
        "a dry run starts nothing"
    );
}

#[test]
fn the_bundled_layers_are_the_nested_tests_layers() {
    let bundle = bundle();
    let tests = Project::new(&labs::hypervisor_lab(labs::L2_IMAGE));
    assert_eq!(
        hash_of(&bundle, "debian_vs_amd64"),
        hash_of(&tests, "debian_vs_amd64"),
        "L1's layer"
    );
    assert_eq!(
        hash_of(&bundle, "debian-bookworm-busybox"),
        hash_of(&tests, "pybox"),
        "the L2 image"
    );
}

#[test]
fn every_example_checks_and_plans_on_an_empty_store() {
    for (name, vms, planned) in [
        (
            "two-hypervisors",
            &["hv_a", "hv_b", "a1", "b1"][..],
            &["network  backbone: start vde_switch", "inside VM hv_b"][..],
        ),
        (
            "cloud-image",
            &["web1", "web2"][..],
            &["fetch       debian-12-cloud", "in a chroot"][..],
        ),
        // Its cache is a registry this machine may not reach: a warning, then the plan.
        ("ci-cache", &["app"][..], &["build       app_amd64"][..]),
    ] {
        let p = example(name);
        let check = p.ok(&["check"]);
        let said = stdout(&check);
        assert!(
            said.contains(&format!("{} VM", vms.len())),
            "{name}: {said}"
        );
        let plan = p.ok(&["up", "--dry-run"]);
        let said = text(&plan);
        for line in vms
            .iter()
            .map(|vm| format!("create   {vm}  new"))
            .chain(planned.iter().map(|l| l.to_string()))
        {
            assert!(said.contains(&line), "{name}: `{line}` in {said}");
        }
        assert!(
            !p.path().join(".farm/vms").exists(),
            "{name}: a dry run starts nothing"
        );
        assert!(!p.store.exists(), "{name}: a dry run makes no store");
    }
}

#[test]
fn the_two_hypervisor_example_runs_the_bundled_layers() {
    let bundle = bundle();
    let example = example("two-hypervisors");
    for (bundled, theirs) in [
        ("debian_vs_amd64", "debian_vs_amd64"),
        ("debian_vs_user_amd64", "guest_amd64"),
    ] {
        assert_eq!(
            hash_of(&bundle, bundled),
            hash_of(&example, theirs),
            "{theirs}"
        );
    }
}
