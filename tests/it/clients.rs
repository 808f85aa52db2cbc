//! The clients people use with a lab like the bundled one, run for real against the nested
//! lab, whose L1 layer and L2 image are the bundle's (`bundle.rs` checks their hashes):
//! Ansible (ping, and a playbook with facts, a user, a copied file and a package installed
//! with `apt`), pytest-testinfra, pyinfra, rsync and scp, all through the generated
//! `.farm/ssh_config` and its jump chain, with every host key checked. The clients are
//! `scripts/setup.sh`'s, from PyPI (`/opt/farm-ansible`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::nested::{nested_lab, shares_a_connection};
use crate::support::hello_deb;
use crate::support::lab::restored;
use crate::support::project::{self, ANSIBLE_BIN, Project, stdout, text};

/// Every VM of the nested lab, one per level and network: L1, the L2 on QEMU's user network
/// and the L2 only on the VDE network.
const VMS: [&str; 3] = ["hv", "pyleaf_amd64", "vleaf_amd64"];

/// The package the playbook installs, which the lab's own provisioning did not.
const PACKAGE: &str = "farm-test-clients";

/// A playbook such as a lab's users run: facts (every level is Debian 12), a user, a file
/// copied from here and a package installed from it with `apt`, and a file from the facts.
const PLAYBOOK: &str = r#"- hosts: all
  gather_facts: true
  tasks:
    - name: Every level is Debian 12
      ansible.builtin.assert:
        that:
          - ansible_distribution == "Debian"
          - ansible_distribution_major_version == "12"
    - name: A user
      ansible.builtin.user:
        name: tester
        shell: /bin/sh
    - name: The package, copied from the controller
      ansible.builtin.copy:
        src: farm-test-clients.deb
        dest: /root/farm-test-clients.deb
    - name: The package, installed
      ansible.builtin.apt:
        deb: /root/farm-test-clients.deb
    - name: A file from the facts
      ansible.builtin.copy:
        content: "{{ ansible_hostname }} runs {{ ansible_distribution }} {{ ansible_distribution_version }}\n"
        dest: /home/tester/where
"#;

/// testinfra's checks: Debian 12, python3, and sshd listening.
const TESTINFRA: &str = r#"def test_debian_12(host):
    assert host.system_info.distribution == "debian"
    assert host.system_info.release.startswith("12")


def test_python3(host):
    assert host.exists("python3")


def test_sshd_listens(host):
    assert host.socket("tcp://22").is_listening
"#;

#[test]
fn ansible_testinfra_pyinfra_rsync_and_scp_work_on_every_level_through_the_ssh_config() {
    let Some(lab) = restored("clients", &nested_lab()) else {
        return;
    };
    let p = &lab.project;
    let work = tempfile::tempdir().unwrap();
    let config = p.path().join(".farm/ssh_config");
    let inventory = p.path().join(".farm/inventory.yml");
    let known_hosts = p.path().join(".farm/known_hosts");
    let pinned = fs_err::read_to_string(&known_hosts).unwrap();
    let ansible_sockets = work.path().join("ansible-cp");
    let ansible = |program: &str| ansible(p, &ansible_sockets, program);
    let mut lap = Lap::start();

    // Ansible: ping answers on every VM.
    let pinged = ansible("ansible")
        .args(["all", "-m", "ping", "-i"])
        .arg(&inventory)
        .output()
        .unwrap();
    let said = text(&pinged);
    assert!(pinged.status.success(), "{said}");
    for vm in VMS {
        assert!(said.contains(&format!("{vm} | SUCCESS")), "{vm}: {said}");
    }
    // Through the connections farm's ssh_config shares for this lab's VMs, not Ansible's own,
    // which another lab's VM of the same name would share: Ansible made no socket of its own,
    // and L1's master is farm's. (An L2's master lives only as long as its connection through
    // a TCG hypervisor, which a nested guest now and then drops: it is not checked here.)
    let own = project::list(&ansible_sockets);
    assert!(own.is_empty(), "Ansible made its own sockets: {own:?}");
    assert!(shares_a_connection(p, "hv"), "hv: no shared connection");
    lap.done("ansible ping");

    // A playbook with facts, a user, a copy and apt passes on all three levels; run again,
    // it changes nothing.
    fs_err::write(work.path().join("lab.yml"), PLAYBOOK).unwrap();
    fs_err::write(
        work.path().join(format!("{PACKAGE}.deb")),
        hello_deb::package_called(PACKAGE),
    )
    .unwrap();
    let playbook = work.path().join("lab.yml");
    for run in ["first", "second"] {
        let out = ansible("ansible-playbook")
            .arg("-i")
            .arg(&inventory)
            .arg(&playbook)
            .output()
            .unwrap();
        let said = text(&out);
        assert!(out.status.success(), "{run} run: {said}");
        for vm in VMS {
            let recap = recap_of(&said, vm);
            assert!(recap.contains("failed=0"), "{run} run, {vm}: {said}");
            if run == "second" {
                assert!(recap.contains("changed=0"), "second run, {vm}: {said}");
            }
        }
        lap.done(&format!("ansible-playbook, {run} run"));
    }
    for vm in VMS {
        let out = p.ok(&[
            "ssh",
            vm,
            "--",
            &format!("{PACKAGE}; dpkg-query -W {PACKAGE}; id tester; cat /home/tester/where"),
        ]);
        let said = stdout(&out);
        assert!(
            said.contains(hello_deb::SAYS)
                && said.contains(&format!("{PACKAGE}\t1.0"))
                && said.contains("(tester)")
                && said.contains("runs Debian 12"),
            "{vm}: {said}"
        );
    }

    // pytest-testinfra through the ssh_config: Debian 12, python3 and a listening sshd.
    let checks = work.path().join("test_lab.py");
    fs_err::write(&checks, TESTINFRA).unwrap();
    let hosts: Vec<String> = VMS.iter().map(|vm| format!("ssh://{vm}")).collect();
    let out = Command::new(format!("{ANSIBLE_BIN}/pytest"))
        .current_dir(work.path())
        .args(["-p", "no:cacheprovider", "-q"])
        .arg(format!("--ssh-config={}", config.display()))
        .arg(format!("--hosts={}", hosts.join(",")))
        .arg(&checks)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success() && said.contains("9 passed"), "{said}");
    lap.done("pytest-testinfra");

    // pyinfra (paramiko: no HostKeyAlias, its own ProxyJump) runs on every VM, with the keys
    // farm pinned, adding none.
    let out = Command::new(format!("{ANSIBLE_BIN}/pyinfra"))
        .current_dir(work.path())
        .args(["-y", "--data"])
        .arg(format!("ssh_config_file={}", config.display()))
        .arg(VMS.join(","))
        .args(["exec", "--", "echo", "on-$(hostname)"])
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    for hostname in ["on-hv", "on-deep-leaf", "on-vleaf-amd64"] {
        assert!(said.contains(hostname), "{hostname}: {said}");
    }
    assert_eq!(fs_err::read_to_string(&known_hosts).unwrap(), pinned);
    lap.done("pyinfra");

    // rsync and scp, to every VM, with `-F`.
    let sent = work.path().join("sent");
    fs_err::write(
        &sent,
        format!("farm's clients test {}\n", std::process::id()),
    )
    .unwrap();
    let remote_shell = format!("ssh -F {}", config.display());
    for vm in VMS {
        let rsync = Command::new("rsync")
            .args(["-e", &remote_shell])
            .arg(&sent)
            .arg(format!("{vm}:/root/rsynced"))
            .output()
            .unwrap();
        assert!(rsync.status.success(), "rsync to {vm}: {}", text(&rsync));
        let scp = Command::new("scp")
            .arg("-F")
            .arg(&config)
            .arg(&sent)
            .arg(format!("{vm}:/root/scped"))
            .output()
            .unwrap();
        assert!(scp.status.success(), "scp to {vm}: {}", text(&scp));
        let out = p.ok(&["ssh", vm, "--", "cat /root/rsynced /root/scped"]);
        let expected = fs_err::read_to_string(&sent).unwrap();
        assert_eq!(stdout(&out), format!("{expected}{expected}"), "{vm}");
    }
    lap.done("rsync and scp");
}

/// The time of each client's part, said as it ends (the test's log shows where it went).
struct Lap(Instant);

impl Lap {
    fn start() -> Lap {
        Lap(Instant::now())
    }

    fn done(&mut self, what: &str) {
        eprintln!("clients: {what} in {:.1} s", self.0.elapsed().as_secs_f64());
        self.0 = Instant::now();
    }
}

/// Ansible's `program`, run in the lab's directory with host keys checked, and any
/// ControlMaster socket of its own made in `sockets`.
fn ansible(p: &Project, sockets: &Path, program: &str) -> Command {
    let mut cmd = Command::new(format!("{ANSIBLE_BIN}/{program}"));
    cmd.current_dir(p.path())
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        .env("ANSIBLE_SSH_CONTROL_PATH_DIR", sockets)
        .env("ANSIBLE_NOCOLOR", "1");
    cmd
}

/// The PLAY RECAP line of `vm` in ansible-playbook's output.
fn recap_of<'a>(output: &'a str, vm: &str) -> &'a str {
    output
        .lines()
        .skip_while(|l| !l.starts_with("PLAY RECAP"))
        .find(|l| l.split_whitespace().next() == Some(vm))
        .unwrap_or_else(|| panic!("no recap line for {vm}: {output}"))
}
