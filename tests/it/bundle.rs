//! The bundled lab (the repository's farm.toml, images/, platforms/ and ansible/: the
//! README's main command brings it up) is checked as a user would first meet it: `farm check`
//! accepts it and `farm up --dry-run` plans it. Its L1 and L2 layers are the same
//! derivations as the nested tests' lab, so CI builds them once for both.

use crate::support::labs;
use crate::support::project::{Project, stdout, text};

use std::path::Path;

/// The bundle copied into a project of its own, so nothing is written into the repository,
/// with L1's port on this machine one that is free (a lab of the bundle may be running).
fn bundle() -> Project {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let farm_toml = fs_err::read_to_string(root.join("farm.toml")).unwrap();
    let port = farm::sys::hostinfo::free_local_port().unwrap();
    assert!(farm_toml.contains("ssh_port = 2201"), "{farm_toml}");
    let project =
        Project::new(&farm_toml.replace("ssh_port = 2201", &format!("ssh_port = {port}")));
    for dir in ["images", "platforms", "ansible", "ansible/group_vars"] {
        for entry in fs_err::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                let relative = path.strip_prefix(root).unwrap().to_str().unwrap();
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
