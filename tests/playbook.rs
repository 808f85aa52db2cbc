//! A platform whose last step is an Ansible playbook (with a role), applied by
//! ansible-core from PyPI (`scripts/setup.sh`) to the build VM through its own ssh_config:
//! cached like any step (a second build is a cache hit), rebuilt when only the role
//! changes, and an instance shows what the playbook did. Without `ansible-playbook` the
//! build says so before booting anything.

#[path = "support/guest.rs"]
#[allow(dead_code)]
mod guest;
#[path = "support/project.rs"]
#[allow(dead_code)]
mod project;

use guest::{shared_store, vm_tests_possible};
use project::{Project, text};

/// The Debian image the other VM tests share, python3 for Ansible's modules, the playbook.
const LAB: &str = r#"
[images.bookworm]
debian = { suite = "bookworm" }

[targets.amd64]
arch = "x86_64"

[platforms.py]
from = "bookworm"
packages = ["python3"]

[platforms.played]
from = "py"
playbook = "ansible/site.yml"

[vms.played]
platform = "played"
"#;

const ANSIBLE_BIN: &str = "/opt/farm-ansible/bin";

fn with_ansible(p: &Project, args: &[&str]) -> std::process::Output {
    let path = format!(
        "{ANSIBLE_BIN}:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    p.farm(args).env("PATH", path).output().unwrap()
}

fn role(p: &Project, marker: &str) {
    p.write(
        "ansible/roles/stamp/tasks/main.yml",
        &format!("- ansible.builtin.copy: {{ dest: /etc/from-role, content: \"{marker}\\n\" }}\n"),
    );
}

#[test]
fn a_platform_playbook_is_a_cached_step_and_its_roles_are_inputs() {
    if !vm_tests_possible("playbook") {
        return;
    }
    assert!(
        std::path::Path::new(ANSIBLE_BIN)
            .join("ansible-playbook")
            .exists(),
        "ansible-playbook is missing; run ./scripts/setup.sh"
    );
    let p = Project::with_store(LAB, &shared_store());
    p.write(
        "ansible/site.yml",
        "- hosts: all\n  gather_facts: false\n  roles: [stamp]\n  tasks:\n    \
         - ansible.builtin.copy: { dest: /etc/from-playbook, content: \"played\\n\" }\n",
    );
    // New on every run, so a store kept from an earlier run does not have the layer.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_string();
    role(&p, &nonce);

    // Without ansible-playbook: refused before a VM boots.
    let none = p
        .farm(&["build"])
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .output()
        .unwrap();
    let said = text(&none);
    assert_eq!(none.status.code(), Some(1), "{said}");
    assert!(
        said.contains("`ansible-playbook` is not installed"),
        "{said}"
    );
    // (The parent `py` may be built first on a fresh store; `played` boots nothing.)
    assert!(!said.contains("played_amd64 booting build VM"), "{said}");

    let built = with_ansible(&p, &["build"]);
    assert!(built.status.success(), "{}", text(&built));
    let again = with_ansible(&p, &["build"]);
    assert!(text(&again).contains("cached"), "{}", text(&again));

    // Only the role changed: the layer is built again.
    role(&p, &format!("{nonce}-two"));
    let plan = String::from_utf8_lossy(&p.ok(&["plan"]).stdout).into_owned();
    assert!(
        plan.lines()
            .any(|l| l.starts_with("build") && l.contains("played_amd64")),
        "{plan}"
    );
    assert!(plan.contains("cached      py_amd64"), "{plan}");
    let rebuilt = with_ansible(&p, &["build"]);
    assert!(rebuilt.status.success(), "{}", text(&rebuilt));

    p.ok(&["up"]);
    let ssh = |script: &str| {
        let out = p.ok(&["ssh", "played", "--", script]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(ssh("cat /etc/from-playbook"), "played");
    assert_eq!(ssh("cat /etc/from-role"), format!("{nonce}-two"));
    assert_eq!(
        ssh("grep -c farm-build /root/.ssh/authorized_keys || true"),
        "0"
    );
    p.ok(&["down"]);
}
