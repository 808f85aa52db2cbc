//! The nested topology in CI: L0 (this machine) → L1 (a Debian hypervisor VM) → L2 (two VMs
//! inside L1), reached through the generated jump chain. Under TCG inside TCG a systemd guest
//! never finishes booting, so L2 is a Debian image with `init = "busybox"` (farm's tiny boot,
//! with apt, dpkg and python for Ansible); L1's layer (qemu, qemu-img, b3sum from Debian) is
//! built once in the shared test store. One L2 is only on a VDE network (`vxvde://`) that L1
//! attaches with a tap, as the seed's `debian_vs_vde_amd64`. Both L2s get a playbook that
//! `farm up` applies once: it installs a package and writes a file. L1 runs its L2s under
//! libvirt (`backend = "libvirt"`, libvirtd started by L1's systemd).
//!
//! The lab is a shared lab ([`nested_lab`]): brought up once (the bring-up's own checks are in
//! [`after_up`]) and saved, then restored by each test here, so every
//! scenario starts from the same provisioned moment in seconds (`snapshot.rs` too). The
//! recovery scenarios (after a kernel panic or `kill -9`) need no Debian L2: they are in
//! `recovery.rs`, on the tiny-L2 lab.

use crate::support::hello_deb;
use crate::support::lab::{LabRecipe, restored};
use crate::support::labs;
use crate::support::project::{self, ANSIBLE_BIN, Project, stderr, stdout, text};
use crate::support::test_home::shared_store;

use std::process::Command;

/// The hypervisor platform is the tests' L1 (`debian_vs`: the bundled farm.toml's packages and
/// libvirt), and it runs its L2 pair as libvirt domains; tests/two_sites.rs runs L2s on the
/// same platform with farm's own qemu backend.
fn lab_toml() -> String {
    labs::two_leaf_lab(
        "pyleaf",
        "234.0.0.1",
        "10.0.0",
        r#"hostname = "deep-leaf""#,
        &format!(
            r#"{}
[platforms.pyleaf]
from = "pybox"
memory = "384M"
files = {{ "/root/farm-test-hello.deb" = "farm-test-hello.deb" }}
"#,
            labs::L2_IMAGE
        ),
    )
}

/// The playbook both L2s name: a package from a `.deb` (Ansible's apt module, which needs
/// python3-apt) and a file from the inventory's variables.
const PLAYBOOK: &str = r#"- hosts: level_2
  gather_facts: false
  tasks:
    - name: Install the lab's package
      ansible.builtin.apt:
        deb: /root/farm-test-hello.deb
    - name: Say where this VM runs
      ansible.builtin.copy:
        content: "{{ inventory_hostname }} at level {{ farm_level }} on {{ farm_hypervisor }}\n"
        dest: /root/provisioned
"#;

/// The nested lab as the tests share it: up once (two L2 guests boot under TCG inside an L1
/// that is itself under TCG, on 2 cores: one has taken 165 s to answer ssh and the other over
/// 300 s in CI, so they get 600 s), then saved.
pub fn nested_lab() -> LabRecipe {
    LabRecipe {
        name: "nested",
        farm_toml: lab_toml(),
        files: vec![
            ("farm-test-hello.deb", hello_deb::package()),
            ("site.yml", PLAYBOOK.as_bytes().to_vec()),
        ],
        vms: &["hv", "pyleaf_amd64", "vleaf_amd64"],
        up_args: &["up", "--boot-timeout", "600"],
        after_up,
    }
}

/// The first bring-up: the leaf's layers went to hv, and the playbook ran on both L2s after
/// the lab answered (together, unless the first `up` failed half way and the second one
/// provisioned what was left).
fn after_up(_: &Project, log: &str) {
    assert!(
        log.contains("pushed"),
        "the leaf's layers went to hv: {log}"
    );
    let provisioned = |vm: &str| {
        log.lines()
            .any(|l| l.trim_start().starts_with("provisioned") && l.contains(vm))
    };
    assert!(
        provisioned("pyleaf_amd64") && provisioned("vleaf_amd64"),
        "{log}"
    );
}

#[test]
fn every_vm_answers_through_the_jump_chain_provisioned_and_a_second_up_does_nothing() {
    let Some(lab) = restored("nested", &nested_lab()) else {
        return;
    };
    let p = &lab.project;
    // The playbook ran once on both L2s: the package is installed (dpkg knows it) and the
    // file names where each VM runs.
    // (Through the Rust API, `farm::testing`, as a Rust test of a lab would.)
    let api = p.lab();
    for vm in ["pyleaf_amd64", "vleaf_amd64"] {
        let said = api
            .vm(vm)
            .succeed("farm-test-hello; dpkg-query -W farm-test-hello; cat /root/provisioned")
            .unwrap();
        assert!(
            said.contains("hello from farm's test package")
                && said.contains("farm-test-hello\t1.0")
                && said.contains(&format!("{vm} at level 2 on hv")),
            "{vm}: {said}"
        );
    }

    // farm ssh into L2 from L0, through hv.
    let out = p.ok(&["ssh", "pyleaf_amd64", "--", "hostname"]);
    assert_eq!(stdout(&out).trim(), "deep-leaf");
    // Plain ssh with the generated config: the ProxyJump chain and pinned keys.
    let config = p.path().join(".farm/ssh_config");
    let config_text = fs_err::read_to_string(&config).unwrap();
    assert!(
        config_text.contains("Host pyleaf_amd64") && config_text.contains("ProxyJump hv"),
        "{config_text}"
    );
    let plain = Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args(["pyleaf_amd64", "cat /proc/cpuinfo | grep -c processor"])
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", text(&plain));
    // The users' ssh_config shares connections: those logins left a ControlMaster to the L2
    // and one to hv, the hop it jumps through, which later ssh runs reuse.
    for vm in ["hv", "pyleaf_amd64"] {
        assert!(shares_a_connection(p, vm), "no shared connection to {vm}");
    }

    // The VDE-only L2 answers from L0: ssh jumps to hv, then over hv's tap on `lab`.
    let addrs = api.vm("vleaf_amd64").succeed("ip addr").unwrap();
    assert!(addrs.contains("10.0.0.21/24"), "{addrs}");
    api.vm("vleaf_amd64")
        .wait_for_port(22, std::time::Duration::from_secs(30))
        .unwrap();
    api.vm("vleaf_amd64").fail("echo no; exit 3").unwrap();
    let refused = api
        .vm("vleaf_amd64")
        .succeed("echo no; exit 3")
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("VM `vleaf_amd64`: `echo no; exit 3` exited with 3, expected 0\nno"),
        "{refused}"
    );
    assert!(
        config_text.contains("HostName 10.0.0.21") && config_text.contains("ProxyJump hv"),
        "{config_text}"
    );
    let tap = p.ok(&["ssh", "hv", "--", "ip", "addr"]);
    assert!(stdout(&tap).contains("10.0.0.254/24"));

    // Status shows the tree: the leaf runs on hv, at level 2.
    let leaf = p.status_of("pyleaf_amd64");
    assert_eq!(leaf["host"], "hv");
    assert_eq!(leaf["level"], 2);
    assert_eq!(leaf["state"], "running");

    // Inside hv, the L2s are libvirt domains (hv's `backend = "libvirt"`) with farm's
    // metadata, which hv's own virsh lists.
    let inside = p.ok(&[
        "ssh",
        "hv",
        "--",
        "virsh -c qemu:///system list --name; virsh -c qemu:///system dumpxml vleaf_amd64",
    ]);
    let said = stdout(&inside);
    assert!(
        said.lines().any(|l| l.trim() == "pyleaf_amd64")
            && said.lines().any(|l| l.trim() == "vleaf_amd64")
            && said.contains(farm::model::lab::libvirt::METADATA_NS)
            && said.contains("vde,id=farmnet0,sock=ptp://")
            && said.contains("/vms/vleaf_amd64/wire0.ptp"),
        "{said}"
    );

    // Its console, read where it runs (inside hv), through the same ssh_config.
    let logs = p.ok(&["logs", "pyleaf_amd64"]);
    let console = stdout(&logs);
    assert!(
        console.contains("farm-seed: hostname deep-leaf"),
        "{console}"
    );

    // Ansible's modules run on both L2 VMs through the jump chain, host keys checked, with
    // farm as a dynamic inventory script (`--list`).
    let script = p.path().join("inventory.sh");
    fs_err::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} --config {} inventory \"$@\"\n",
            env!("CARGO_BIN_EXE_farm"),
            p.path().join("farm.toml").display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let out = Command::new(format!("{ANSIBLE_BIN}/ansible"))
        .current_dir(p.path())
        .args(["level_2", "-i", "inventory.sh", "-m", "ping"])
        .env("FARM_STORE", shared_store())
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        .env("ANSIBLE_NOCOLOR", "1")
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert_eq!(said.matches("\"ping\": \"pong\"").count(), 2, "{said}");

    // A second up pushes nothing, starts nothing and provisions nothing.
    let again = p.ok_with_ansible(&["up"]);
    let log = stderr(&again);
    assert!(
        !log.contains("pushed")
            && !log.contains("starting")
            && !log.contains("restarting")
            && !log.contains("playbook"),
        "{log}"
    );
}

#[test]
fn down_of_one_l2_by_name_stops_it_inside_its_hypervisor_and_up_makes_only_it_again() {
    let Some(lab) = restored("nested_down_by_name", &nested_lab()) else {
        return;
    };
    let p = &lab.project;
    p.ok(&["ssh", "vleaf_amd64", "--", "true"]);
    assert!(shares_a_connection(p, "vleaf_amd64"));
    // `down` of one L2 by name stops it inside hv (not the copy of its record kept here),
    // and nothing else; the next up makes it anew and provisions only it.
    let down = p.ok(&["down", "vleaf_amd64"]);
    let log = stderr(&down);
    assert!(
        log.contains("stopped vleaf_amd64 (powered off") && !log.contains("pyleaf_amd64"),
        "{log}"
    );
    let listed = p.ok(&[
        "ssh",
        "hv",
        "--",
        "virsh -c qemu:///system list --all --name",
    ]);
    let domains = stdout(&listed);
    assert!(
        !domains.contains("vleaf_amd64") && domains.contains("pyleaf_amd64"),
        "{domains}"
    );
    assert_eq!(p.state_of("hv"), "running");
    assert_eq!(p.state_of("pyleaf_amd64"), "running");
    // The shared connection to the stopped VM went with it (its hop through hv closed).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while shares_a_connection(p, "vleaf_amd64") {
        assert!(
            std::time::Instant::now() < deadline,
            "the shared connection to vleaf_amd64 outlived it by 15 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let again = p.ok_with_ansible(&["up"]);
    let log = stderr(&again);
    assert!(
        log.contains("starting vleaf_amd64 (new)")
            && log.contains("provisioned vleaf_amd64 (")
            && !log.contains("starting pyleaf_amd64")
            && !log.contains("starting hv"),
        "{log}"
    );
    let out = p.ok(&["ssh", "vleaf_amd64", "--", "cat /root/provisioned"]);
    assert!(stdout(&out).contains("vleaf_amd64 at level 2 on hv"));
}

#[test]
fn down_stops_the_guests_before_their_hypervisor_even_with_libvirtd_stopped() {
    let Some(lab) = restored("nested_down", &nested_lab()) else {
        return;
    };
    let p = &lab.project;
    // libvirtd inside hv stops (its domains run on): `down` starts it again to shut them
    // down through it.
    p.ok(&[
        "ssh",
        "hv",
        "--",
        "systemctl stop libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket && ! test -S /var/run/libvirt/libvirt-sock",
    ]);

    // A dry run says what would stop, where and in what order, and changes nothing (it
    // does not even start libvirtd to list domains).
    let planned = stdout(&p.ok(&["down", "--dry-run"]));
    let inside_hv = planned.find("1. inside hv (depth 1):").expect(&planned);
    let leaf = planned
        .find("stop pyleaf_amd64 (power off its libvirt domain)")
        .expect(&planned);
    let host = planned.find("2. host local (depth 0):").expect(&planned);
    let hv = planned.find("stop hv (power off)").expect(&planned);
    assert!(inside_hv < leaf && leaf < host && host < hv, "{planned}");
    assert_eq!(p.state_of("hv"), "running");
    assert_eq!(p.state_of("pyleaf_amd64"), "running");
    p.ok(&["ssh", "hv", "--", "! test -S /var/run/libvirt/libvirt-sock"]);

    // Down: the leaf before its hypervisor.
    let down = p.ok(&["down"]);
    let log = stderr(&down);
    let leaf_at = log.find("stopped pyleaf_amd64").expect("leaf stopped");
    let hv_at = log.find("stopped hv").expect("hv stopped");
    assert!(leaf_at < hv_at, "{log}");
    assert!(project::list(&p.path().join(".farm/vms")).is_empty());
}

/// Three levels (L1 → L2 → L3) are expressible and validated; running them is left out of
/// CI (TCG three deep).
#[test]
fn a_three_level_topology_graphs_every_level() {
    let p = Project::new(
        r#"
[images.tiny]
tiny = true
[targets.amd64]
arch = "x86_64"
[platforms.hv]
from = "tiny"
[platforms.leaf]
from = "tiny"
[vms.l1]
platform = "hv"
[vms.l2]
platform = "hv"
host = "l1"
[vms.l3]
platform = "leaf"
host = "l2"
"#,
    );
    let out = p.ok(&["check"]);
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("      l3 (leaf on amd64, L3)"), "{tree}");
    let graph = p.ok(&["graph", "-o", "-"]);
    let dot = String::from_utf8_lossy(&graph.stdout);
    assert!(dot.contains("\"vm:l2\" -> \"vm:l3\""), "{dot}");
}

/// Whether a ControlMaster of the users' ssh_config to `vm` runs (`ssh -O check`).
pub fn shares_a_connection(p: &Project, vm: &str) -> bool {
    Command::new("ssh")
        .arg("-F")
        .arg(p.path().join(".farm/ssh_config"))
        .args(["-O", "check", vm])
        .output()
        .unwrap()
        .status
        .success()
}
