//! A platform whose last step is an Ansible playbook (with a role), applied by
//! ansible-core from PyPI (`scripts/setup.sh`) to the build VM through its own ssh_config:
//! cached like any step (a second build is a cache hit), rebuilt when only the role
//! changes, and an instance shows what the playbook did. Without `ansible-playbook` the
//! build says so before booting anything.

use crate::support::labs;
use crate::support::project;
use crate::support::skip::{ANSIBLE, require_vm};
use crate::support::test_home::shared_store;

use project::{Project, nonce, text};

/// The Debian image the other VM tests share (upgraded), python3 for Ansible's modules, the
/// playbook.
fn lab() -> String {
    labs::debian(
        r#"
[platforms.py]
from = "upgraded"
packages = ["python3"]

[platforms.played]
from = "py"
playbook = "ansible/site.yml"

[vms.played]
platform = "played"
"#,
    )
}

fn with_ansible(p: &Project, args: &[&str]) -> std::process::Output {
    p.farm_with_ansible(args).output().unwrap()
}

/// farm with a PATH that has no ansible-playbook: it must exit 1; its output.
fn refused_without_ansible(p: &Project, args: &[&str]) -> String {
    let out = p
        .farm(args)
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    said
}

fn role(p: &Project, marker: &str) {
    p.write(
        "ansible/roles/stamp/tasks/main.yml",
        &format!("- ansible.builtin.copy: {{ dest: /etc/from-role, content: \"{marker}\\n\" }}\n"),
    );
}

#[test]
fn a_platform_playbook_is_a_cached_step_and_its_roles_are_inputs() {
    if !require_vm("playbook", &[ANSIBLE]) {
        return;
    }
    let p = Project::with_store(&lab(), &shared_store());
    p.write(
        "ansible/site.yml",
        "- hosts: all\n  gather_facts: false\n  roles: [stamp]\n  tasks:\n    \
         - ansible.builtin.copy: { dest: /etc/from-playbook, content: \"played\\n\" }\n",
    );
    // New on every run, so a store kept from an earlier run does not have the layer.
    let nonce = nonce();
    role(&p, &nonce);

    // Without ansible-playbook: refused before a VM boots.
    let said = refused_without_ansible(&p, &["build"]);
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

/// A VM's own playbook (`[vms.NAME] playbook`): `farm up` applies it once the VM answers,
/// not again on a second up, again when it changes; a failing one names the VM and the log
/// and is tried again next time. The image is the nested test's busybox-init Debian.
const VM_LAB: &str = r#"

[targets.amd64]
arch = "x86_64"

[platforms.plain]
from = "pybox"
memory = "384M"

[vms.solo]
platform = "plain"
playbook = "vm.yml"
"#;

fn vm_playbook(stamp: &str) -> String {
    format!(
        "- hosts: vms\n  gather_facts: false\n  tasks:\n    \
         - ansible.builtin.copy: {{ dest: /root/stamp, content: \"{stamp} level {{{{ farm_level }}}}\\n\" }}\n"
    )
}

#[test]
fn a_vms_playbook_runs_once_again_when_changed_and_a_failure_names_the_vm() {
    if !require_vm("playbook", &[ANSIBLE]) {
        return;
    }
    let p = Project::with_store(&format!("{}{VM_LAB}", labs::L2_IMAGE), &shared_store());
    p.write("vm.yml", &vm_playbook("one"));
    let stamp = || {
        let out = p.ok(&["ssh", "solo", "--", "cat /root/stamp"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };

    // Without ansible-playbook: refused before anything is built or started.
    let said = refused_without_ansible(&p, &["up"]);
    assert!(
        said.contains(
            "VM `solo` names the playbook `vm.yml`, but `ansible-playbook` is not installed"
        ),
        "{said}"
    );
    assert!(!said.contains("starting"), "{said}");

    let up = with_ansible(&p, &["up"]);
    let log = text(&up);
    assert!(up.status.success(), "{log}");
    assert!(
        log.contains("playbook vm.yml on solo (not applied to this VM yet)")
            && log.contains("provisioned solo"),
        "{log}"
    );
    assert_eq!(stamp(), "one level 1");

    let again = with_ansible(&p, &["up"]);
    assert!(!text(&again).contains("playbook"), "{}", text(&again));

    // Changed: applied again to the running VM.
    p.write("vm.yml", &vm_playbook("two"));
    let plan = p.ok(&["up", "--dry-run"]);
    assert!(
        String::from_utf8_lossy(&plan.stdout)
            .contains("playbook vm.yml on solo (the playbook changed"),
        "{}",
        text(&plan)
    );
    let changed = with_ansible(&p, &["up"]);
    assert!(
        text(&changed).contains("(the playbook changed)"),
        "{}",
        text(&changed)
    );
    assert_eq!(stamp(), "two level 1");

    // A failing playbook: exit 1, the VM and the log named; tried again by the next up.
    p.write(
        "vm.yml",
        "- hosts: vms\n  gather_facts: false\n  tasks:\n    - ansible.builtin.command: /bin/false\n",
    );
    let failed = with_ansible(&p, &["up"]);
    let said = text(&failed);
    assert_eq!(failed.status.code(), Some(1), "{said}");
    assert!(
        said.contains("The playbook `vm.yml` failed on `solo`") && said.contains("provision.log"),
        "{said}"
    );
    p.write("vm.yml", &vm_playbook("three"));
    let fixed = with_ansible(&p, &["up"]);
    assert!(
        text(&fixed).contains("provisioned solo"),
        "{}",
        text(&fixed)
    );
    assert_eq!(stamp(), "three level 1");
    p.ok(&["down"]);
}
