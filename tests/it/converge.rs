//! `farm up` converges on farm.toml with real VMs under TCG: a changed port and memory
//! restart a VM on the new port with the new memory (its disk kept), a guest that never
//! answers fails every `up`, a VM whose state was deleted is found by its process tag
//! (reported, refused as a duplicate, stopped by `down`), and `status` answers while an
//! `up` is waiting for a VM.

use crate::support::project;
use crate::support::skip::require_vm;
use crate::support::test_home::shared_store;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use project::{Project, stderr, text};

fn tiny_lab(port: u16, memory: &str) -> String {
    format!(
        r#"
[images.tiny]
tiny = true
[targets.amd64]
arch = "x86_64"
[platforms.plain]
from = "tiny"
[vms.web]
platform = "plain"
ssh_port = {port}
memory = "{memory}"
"#
    )
}

/// A project whose VM boots a blank disk: firmware finds nothing to boot, ssh never answers.
fn mute_lab() -> Project {
    let p = Project::new(
        "[images.blank]\npath = \"blank.qcow2\"\n[targets.amd64]\narch = \"x86_64\"\n\
         [platforms.nothing]\nfrom = \"blank\"\nmemory = \"128M\"\n[vms.mute]\nplatform = \"nothing\"\n",
    );
    p.blank_disk("blank.qcow2");
    p
}

fn free_port() -> u16 {
    farm::sys::hostinfo::free_local_port().unwrap()
}

fn mem_total_kib(p: &Project, vm: &str) -> u64 {
    let out = p.ok(&["ssh", vm, "--", "grep", "MemTotal", "/proc/meminfo"]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

fn alive(pid: &str) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_changed_port_and_memory_restart_the_vm_on_the_new_port_with_its_disk() {
    if !require_vm("converge_port_memory", &[]) {
        return;
    }
    let (first, second) = (free_port(), free_port());
    let p = Project::with_store(&tiny_lab(first, "256M"), &shared_store());
    p.ok(&["up"]);
    // ssh joins its arguments into one remote command line.
    p.ok(&["ssh", "web", "--", "echo kept > /root/mark; sync"]);
    let before = mem_total_kib(&p, "web");

    p.write("farm.toml", &tiny_lab(second, "384M"));
    assert_eq!(p.state_of("web"), "changed");
    let dry = p.ok(&["up", "--dry-run"]);
    let plan = String::from_utf8_lossy(&dry.stdout);
    let reasons = format!("memory 256M → 384M; ssh_port {first} → {second}");
    assert!(plan.contains(&format!("restart  web  {reasons}")), "{plan}");
    let up = p.ok(&["up"]);
    let log = stderr(&up);
    assert!(
        log.contains(&format!("restarting web ({reasons})")),
        "{log}"
    );
    assert!(log.contains("stopped web (powered off in"), "{log}");

    let config = p.path().join(".farm/ssh_config");
    let config_text = fs_err::read_to_string(&config).unwrap();
    assert!(
        config_text.contains(&format!("Port {second}\n")),
        "{config_text}"
    );
    let plain = Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args(["web", "cat", "/root/mark"])
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", text(&plain));
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout).trim(),
        "kept",
        "the disk stayed"
    );
    let after = mem_total_kib(&p, "web");
    assert!(
        after > before + 100 * 1024,
        "MemTotal {before} KiB → {after} KiB"
    );
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", first)).is_ok(),
        "the old port is free"
    );
    assert_eq!(p.state_of("web"), "running");
    p.ok(&["down"]);
}

#[test]
fn a_guest_that_never_answers_fails_every_up_with_its_console() {
    if !require_vm("converge_mute", &[]) {
        return;
    }
    let p = mute_lab();
    // Off a terminal, a long wait is not a silent gap: a heartbeat names it (every second
    // here, every 30 by default).
    let first = p
        .farm(&["up", "--boot-timeout", "5"])
        .env("FARM_HEARTBEAT_SECS", "1")
        .output()
        .unwrap();
    assert_eq!(first.status.code(), Some(1), "{}", text(&first));
    let log = stderr(&first);
    assert!(
        log.contains("VM `mute` did not answer ssh within 5 s")
            && log.contains("last lines of its serial console"),
        "{log}"
    );
    assert!(log.contains("still mute: waiting for ssh ("), "{log}");
    // Its qemu runs, nothing answers: status says so, and the next up does not keep it.
    assert_eq!(p.state_of("mute"), "unreachable");
    let second = p.run(&["up", "--boot-timeout", "5", "--stop-timeout", "2"]);
    assert_eq!(second.status.code(), Some(1), "{}", text(&second));
    let log = stderr(&second);
    assert!(
        log.contains("restarting mute (never answered ssh)")
            && log.contains("VM `mute` did not answer ssh within 5 s"),
        "{log}"
    );
    let down = p.ok(&["down", "--timeout", "2"]);
    let log = stderr(&down);
    assert!(
        log.contains("killed mute (did not power off within 2 s; qemu quit"),
        "{log}"
    );
}

#[test]
fn a_vm_whose_state_was_deleted_is_reported_refused_and_stopped() {
    if !require_vm("converge_orphan", &[]) {
        return;
    }
    let p = Project::with_store(&tiny_lab(free_port(), "256M"), &shared_store());
    p.ok(&["up"]);
    let pid = fs_err::read_to_string(p.path().join(".farm/vms/web/qemu.pid"))
        .unwrap()
        .trim()
        .to_string();
    fs_err::remove_dir_all(p.path().join(".farm")).unwrap();
    assert!(alive(&pid));

    assert_eq!(p.state_of("web"), "orphaned");
    let refused = p.run(&["up"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        stderr(&refused).contains(&format!(
            "VM `web` already runs on `local` (qemu pid {pid}), but farm has no state for that copy"
        )),
        "{}",
        text(&refused)
    );
    assert!(
        !p.path().join(".farm/vms/web").exists(),
        "no second copy was started"
    );
    let down = p.ok(&["down"]);
    assert!(
        stderr(&down).contains(&format!(
            "stopped web (qemu pid {pid} on local, which farm had no state for)"
        )),
        "{}",
        text(&down)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(&pid) {
        assert!(Instant::now() < deadline, "qemu {pid} still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn status_answers_while_an_up_waits_for_a_vm() {
    if !require_vm("converge_status_during_up", &[]) {
        return;
    }
    let p = mute_lab();
    let mut up = p
        .farm(&["up", "--boot-timeout", "120"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The record is written before qemu starts; the pidfile once it runs.
    let pidfile = p.path().join(".farm/vms/mute/qemu.pid");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "up never started the VM");
        std::thread::sleep(Duration::from_millis(100));
    }
    let asked = Instant::now();
    let status = p.run(&["status", "--json"]);
    let took = asked.elapsed();
    assert!(status.status.success(), "{}", text(&status));
    assert!(
        up.try_wait().unwrap().is_none(),
        "status answered while up still held the lock (after {took:?})"
    );
    let rows: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(rows[0]["state"], "unreachable", "{rows}");
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(up.id() as libc::pid_t, libc::SIGINT);
    }
    let code = up.wait().unwrap().code();
    assert_eq!(code, Some(130), "farm exits 128 + SIGINT");
    p.ok(&["down", "--timeout", "2"]);
}
