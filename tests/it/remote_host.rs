//! Several physical hypervisors: this machine (`here`) and a remote host (`lab`) that farm
//! reaches over ssh with the user's own key and known_hosts. The remote host is a real
//! OpenSSH server on 127.0.0.1 with farm's directory in a temporary `root`, so everything
//! farm does there (store, closure push, qemu, QMP, ports) goes through ssh.

use crate::support::guest;
use crate::support::project;
use crate::support::skip::{Part, require, require_vm};
use crate::support::sshd;
use crate::support::test_home::shared_store;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use farm::run::host::Host;
use farm::sys::ssh::Ssh;
use guest::keygen;
use project::{Project, list, stderr, text};
use sshd::{SSHD, Sshd};

fn lab_toml(port: u16, root: &Path) -> String {
    format!(
        r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.small]
from = "tiny"
memory = "256M"

[hosts.here]

[hosts.lab]
address = "root@127.0.0.1:{port}"
identity_file = "lab_key"
known_hosts = "lab_known_hosts"
root = "{root}"

[vms.near]
platform = "small"
host = "here"

[vms.far]
platform = "small"
host = "lab"
hostname = "far-away"
"#,
        root = root.display()
    )
}

fn qemu_running(pidfile: &Path) -> bool {
    fs_err::read_to_string(pidfile)
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// The remote host `lab` before its sshd starts: its directory (farm's `root` inside), the
/// port it will listen on, and a project that uses it with its own login key.
struct Lab {
    dir: tempfile::TempDir,
    root: std::path::PathBuf,
    port: u16,
    key: guest::Key,
}

impl Lab {
    fn new() -> (Lab, Project) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("farm-root");
        let port = farm::sys::hostinfo::free_local_port().unwrap();
        let p = Project::with_store(&lab_toml(port, &root), &shared_store());
        let key = keygen(p.path(), "lab_key");
        // farm.toml names it, so `check` wants it to exist; it pins nothing until `serve`.
        p.write("lab_known_hosts", "");
        (
            Lab {
                dir,
                root,
                port,
                key,
            },
            p,
        )
    }

    /// Starts the sshd and pins its host key in the project.
    fn serve(&self, p: &Project) -> Sshd {
        let server = Sshd::start(self.dir.path(), self.port, &self.key.public);
        p.write("lab_known_hosts", &server.known_hosts_line());
        server
    }
}

#[test]
fn vms_on_a_remote_host_over_ssh_and_on_this_machine() {
    if !require_vm("remote_host", &[Part::File(SSHD)]) {
        return;
    }
    // The server is declared before the project so it outlives it: a failing test's
    // `farm down` (the project's Drop) still reaches the VMs on `lab`.
    let server: Sshd;
    let (lab, p) = Lab::new();
    let (root, port) = (lab.root.clone(), lab.port);

    // Nothing listens yet: farm names the host and how to check it, and starts nothing there.
    let refused = p.run(&["up"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    let log = stderr(&refused);
    assert!(
        log.contains("Cannot reach host `lab` (root@127.0.0.1:")
            && log.contains("hint: check that `ssh -F"),
        "{log}"
    );
    assert!(!root.exists());

    server = lab.serve(&p);
    let up = p.run(&["up"]);
    assert!(
        up.status.success(),
        "{}\nsshd:\n{}",
        text(&up),
        server.log()
    );
    let log = stderr(&up);
    assert!(log.contains("pushed") && log.contains("to lab"), "{log}");

    // The layers went into the host's own store under `root`; its qemu runs there.
    assert!(!list(&root.join("cache/store")).is_empty());
    let far_pidfile = root.join("state/vms/far/qemu.pid");
    assert!(
        qemu_running(&far_pidfile),
        "no qemu for `far` under {root:?}"
    );

    // ssh_config: the host with the user's own settings, the VM behind it.
    let config = p.path().join(".farm/ssh_config");
    let config_text = fs_err::read_to_string(&config).unwrap();
    assert!(
        config_text.contains(&format!(
            "Host lab\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {}",
            p.path().join("lab_key").display()
        )),
        "{config_text}"
    );
    assert!(
        config_text.contains("Host far\n") && config_text.contains("ProxyJump lab\n"),
        "{config_text}"
    );
    let out = p.ok(&["ssh", "far", "--", "hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "far-away");
    let plain = Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args(["near", "true"])
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", text(&plain));

    let status: serde_json::Value =
        serde_json::from_slice(&p.ok(&["status", "--json"]).stdout).unwrap();
    let rows = status.as_array().unwrap();
    let far = rows.iter().find(|r| r["name"] == "far").unwrap();
    assert_eq!(far["host"], "lab");
    assert_eq!(far["state"], "running");
    assert!(
        far["address"]
            .as_str()
            .unwrap()
            .starts_with("lab:127.0.0.1:"),
        "{far}"
    );
    let near = rows.iter().find(|r| r["name"] == "near").unwrap();
    assert!(near["address"].as_str().unwrap().starts_with("127.0.0.1:"));

    // A second up pushes nothing and starts nothing, on either host.
    let again = p.ok(&["up"]);
    let log = stderr(&again);
    assert!(
        !log.contains("pushed") && !log.contains("starting"),
        "{log}"
    );

    snapshots_on_both_hosts(&p, &root);

    // QMP reaches the remote qemu through a socket the ssh connection forwards (no socat
    // there): `quit` ends it, and the next up restarts only it.
    let lab = farm::run::host::remote::RemoteHost::connect(
        "lab",
        &config,
        "lab",
        Duration::from_secs(10),
    )
    .unwrap();
    lab.qmp(&root.join("state/vms/far/qmp.sock"), "quit")
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while qemu_running(&far_pidfile) {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu ignored QMP quit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its master dies between commands (ssh's keepalive gave up on a stalled guest, say):
    // the next command connects again instead of failing.
    let masters: Vec<u32> = ssh_processes(&config.display().to_string())
        .into_iter()
        .filter(|(_, args)| {
            args.iter().any(|a| a == "-M")
                && args
                    .iter()
                    .rev()
                    .find(|a| !a.is_empty())
                    .is_some_and(|a| a == "lab")
        })
        .map(|(pid, _)| pid)
        .collect();
    assert!(!masters.is_empty(), "no ssh master for lab");
    for pid in masters {
        Command::new("kill").arg(pid.to_string()).status().unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let out = lab.run("echo back").unwrap();
    assert_eq!(out.text().trim(), "back");
    drop(lab);
    let restart = p.ok(&["up"]);
    let log = stderr(&restart);
    assert!(
        log.contains("restarting far") && !log.contains("ready near"),
        "{log}"
    );

    let down = p.ok(&["down"]);
    let log = stderr(&down);
    assert!(
        log.contains("stopped far") && log.contains("stopped near"),
        "{log}"
    );
    assert!(!qemu_running(&far_pidfile));
    assert!(!root.join("state/vms/far").exists());
    // The host's store stays: the next up there pushes nothing.
    assert!(!list(&root.join("cache/store")).is_empty());
    // `up --snapshot` of a snapshot of `near` alone: `near` from it, `far` booted afresh.
    let up = p.ok(&["up", "--snapshot", "part"]);
    let log = stderr(&up);
    assert!(
        log.contains("restored snapshot part") && log.contains("ready far"),
        "{log}"
    );
    for (vm, saved) in [("near", true), ("far", false)] {
        let out = p.ok(&["ssh", vm, "--", "ls /root"]);
        let files = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(files.contains("before"), saved, "{vm}: {files}");
    }
    p.ok(&["down"]);
    // A snapshot's entry on the host goes with it.
    p.ok(&["snapshot", "rm", "part"]);
    p.ok(&["snapshot", "rm", "whole"]);
    assert!(
        list(&root.join("cache/store"))
            .iter()
            .all(|e| !e.ends_with("-snap-far")),
        "far's snapshot entry stayed on lab"
    );
}

/// A snapshot of `near` alone leaves `far` running; one of both keeps `far`'s disk and
/// state in `lab`'s own store (its records here) and restores both to the saved moment;
/// the remote entry goes with `snapshot rm`, refused while `far` runs on it.
fn snapshots_on_both_hosts(p: &Project, root: &Path) {
    let far_pid = || fs_err::read_to_string(root.join("state/vms/far/qemu.pid")).unwrap();
    let mark = |file: &str| {
        for vm in ["near", "far"] {
            p.ok(&["ssh", vm, "--", &format!("echo x > /root/{file}; sync")]);
        }
    };
    let assert_saved_moment = |what: &str| {
        for vm in ["near", "far"] {
            let out = p.ok(&["ssh", vm, "--", "ls /root"]);
            let files = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                files.contains("before") && !files.contains("after"),
                "{vm} after {what}: {files}"
            );
        }
    };
    mark("before");
    let pid = far_pid();
    let part = p.ok(&["snapshot", "save", "part", "near"]);
    assert!(
        stderr(&part).contains("saved snapshot part: near"),
        "{}",
        text(&part)
    );
    assert_eq!(far_pid(), pid, "saving `near` alone touched `far`");

    let whole = p.ok(&["snapshot", "save", "whole"]);
    let log = stderr(&whole);
    assert!(log.contains("far (on lab) state"), "{log}");
    let remote_entries: Vec<_> = list(&root.join("cache/store"))
        .into_iter()
        .filter(|e| e.ends_with("-snap-far"))
        .collect();
    assert_eq!(remote_entries.len(), 1, "{remote_entries:?}");
    let remote_entry = root.join("cache/store").join(&remote_entries[0]);
    for file in ["disk.qcow2", "state.zst", "meta.json", "snapshot.json"] {
        assert!(
            remote_entry.join(file).exists(),
            "{remote_entry:?} has no {file}"
        );
    }
    let local_store = p.store.join("store");
    assert!(
        list(&local_store).iter().all(|e| !e.ends_with("-snap-far")),
        "far's state came to this machine"
    );

    let listed = p.ok(&["snapshot", "ls"]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.contains("far (on lab), near") && listed.contains("part "),
        "{listed}"
    );

    mark("after");
    let restored = p.ok(&["snapshot", "restore", "whole"]);
    assert!(
        stderr(&restored).contains("2 VM(s) answering ssh"),
        "{}",
        text(&restored)
    );
    assert_saved_moment("restoring `whole`");
    let out = p.ok(&["ssh", "far", "--", "hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "far-away");

    // `near` alone goes back; `far` runs on.
    let pid = far_pid();
    p.ok(&["ssh", "near", "--", "echo x > /root/after; sync"]);
    p.ok(&["snapshot", "restore", "part"]);
    assert_eq!(far_pid(), pid, "restoring `near` alone touched `far`");
    assert_saved_moment("restoring `part`");

    // `far` runs on `whole`'s entry in lab's store: removing it is refused, and nothing goes.
    let refused = p.run(&["snapshot", "rm", "whole"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        stderr(&refused).contains("VM `far` runs on snapshot `whole`"),
        "{}",
        text(&refused)
    );
    assert!(remote_entry.join("state.zst").exists());
    let up = p.ok(&["up"]);
    assert!(!stderr(&up).contains("starting"), "{}", text(&up));
}

/// ssh processes whose command line names `needle` (a project's ssh_config), by pid, with
/// their arguments.
fn ssh_processes(needle: &str) -> Vec<(u32, Vec<String>)> {
    let mut found = Vec::new();
    for entry in fs_err::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs_err::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("ssh"))
            && args.iter().any(|a| a.contains(needle))
        {
            found.push((pid, args));
        }
    }
    found
}

#[test]
fn an_interrupted_up_leaves_no_ssh_master_and_the_next_up_converges() {
    if !require_vm("remote_host_interrupt", &[Part::File(SSHD)]) {
        return;
    }
    // Declared before the project so it outlives it (see above).
    let _server: Sshd;
    let (lab, p) = Lab::new();
    _server = lab.serve(&p);
    let root = lab.root.clone();
    let config = p.path().join(".farm/ssh_config").display().to_string();

    let mut up = p
        .farm(&["up"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // `far` is being started on `lab`: farm holds its ControlMaster to the host.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !root.join("state/vms/far/instance.json").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "far was never created"
        );
        assert!(up.try_wait().unwrap().is_none(), "up ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let masters: Vec<(u32, Vec<String>)> = ssh_processes(&config)
        .into_iter()
        .filter(|(_, args)| args.iter().any(|a| a == "-M"))
        .collect();
    assert!(!masters.is_empty(), "no ControlMaster while up runs");
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(up.id() as libc::pid_t, libc::SIGINT);
    }
    assert_eq!(up.wait().unwrap().code(), Some(130));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = ssh_processes(&config);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ssh processes outlived farm: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (_, args) in &masters {
        let control = args.iter().skip_while(|a| *a != "-S").nth(1).unwrap();
        assert!(
            !Path::new(control).exists(),
            "the control socket {control} is left"
        );
    }
    // The next up picks up from where the first stopped.
    let again = p.ok(&["up"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("far"),
        "{}",
        text(&again)
    );
    let out = p.ok(&["ssh", "far", "--", "hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "far-away");
    p.ok(&["down"]);
}

/// A command whose connection dies under it says why ssh gave up, from the ControlMaster's
/// own log: openssh reports a master that went away as "the remote process has terminated",
/// which alone points at the command instead.
#[test]
fn a_command_whose_master_died_quotes_the_masters_log() {
    if !require("remote_host_master_log", &[Part::File(SSHD)]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "client");
    let port = farm::sys::hostinfo::free_local_port().unwrap();
    let server = Sshd::start(dir.path(), port, &key.public);
    let known = dir.path().join("known_hosts");
    fs_err::write(&known, server.known_hosts_line()).unwrap();
    let config = dir.path().join("ssh_config");
    fs_err::write(
        &config,
        format!(
            "Host lab\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {}\n  \
             UserKnownHostsFile {}\n  IdentitiesOnly yes\n",
            key.private.display(),
            known.display()
        ),
    )
    .unwrap();
    let lab = Ssh::connect(&config, "lab", Duration::from_secs(10)).unwrap();
    assert_eq!(lab.run("echo up", None).unwrap().text().trim(), "up");
    // The server ends the connection: its per-connection processes, children of the sshd
    // this test started, are killed.
    let listener = fs_err::read_to_string(dir.path().join("sshd.pid")).unwrap();
    let killed = Command::new("pkill")
        .args(["-KILL", "-P", listener.trim()])
        .status()
        .unwrap();
    assert!(killed.success(), "no connection of this sshd to kill");
    std::thread::sleep(Duration::from_millis(500));
    let err = lab.run("echo again", None).unwrap_err().to_string();
    assert!(
        err.contains("the remote process has terminated")
            && err.contains("the ControlMaster's log ends")
            // ssh's summary line when a connection ends: the master is gone, not the command.
            && err.contains("Transferred: sent"),
        "{err}"
    );
}
