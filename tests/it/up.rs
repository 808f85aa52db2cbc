//! `farm up/status/ssh/down` with real VMs under TCG, in the order a user meets them. The
//! lifecycle runs on farm's tiny image (ssh in seconds); root growth needs a Debian guest.

use crate::support::project;
use crate::support::skip::require_vm;
use crate::support::test_home::shared_store;

use std::process::Command;

use project::{Project, text};

const LAB: &str = r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.plain]
from = "tiny"
memory = "256M"

[vms.alpha]
platform = "plain"
hostname = "alpha-host"

[vms.beta]
platform = "plain"
"#;

const DEBIAN_LAB: &str = r#"
[images.bookworm]
debian = { suite = "bookworm" }

[targets.amd64]
arch = "x86_64"

[platforms.plain]
from = "bookworm"

[vms.grown]
platform = "plain"
disk_size = "3G"
"#;

fn pid(p: &Project, vm: &str) -> String {
    fs_err::read_to_string(p.path().join(".farm/vms").join(vm).join("qemu.pid"))
        .unwrap()
        .trim()
        .to_string()
}

fn qemu_running(vm: &str, p: &Project) -> bool {
    let out = Command::new("pgrep")
        .args(["-f", &farm::model::build::qemu::qemu_name(vm)])
        .output()
        .unwrap();
    let dir = p.path().display().to_string();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|pid| fs_err::read(format!("/proc/{pid}/cmdline")).ok())
        .any(|cmd| String::from_utf8_lossy(&cmd).contains(&dir))
}

#[test]
fn up_ssh_restart_replace_and_down() {
    if !require_vm("up_lifecycle", &[]) {
        return;
    }
    let p = Project::with_store(LAB, &shared_store());
    let up = p.ok(&["up"]);
    let table = String::from_utf8_lossy(&up.stdout).into_owned();
    assert!(
        table.contains("alpha") && table.contains("running"),
        "{table}"
    );

    // farm ssh, and plain ssh with the generated config (host keys pinned, checking on).
    let out = p.ok(&["ssh", "alpha", "--", "hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alpha-host");
    let config = p.path().join(".farm/ssh_config");
    let plain = Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args(["beta", "true"])
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", text(&plain));
    let config_text = fs_err::read_to_string(&config).unwrap();
    assert!(config_text.contains("StrictHostKeyChecking yes"));
    assert!(!config_text.contains("StrictHostKeyChecking no"));
    // scp (which speaks SFTP today) with the same config, both ways.
    let local = p.path().join("note.txt");
    fs_err::write(&local, "copied by scp\n").unwrap();
    let scp = Command::new("scp")
        .arg("-F")
        .arg(&config)
        .arg(&local)
        .arg("alpha:/tmp/note.txt")
        .output()
        .unwrap();
    assert!(scp.status.success(), "{}", text(&scp));
    let back = p.path().join("back.txt");
    let scp = Command::new("scp")
        .arg("-F")
        .arg(&config)
        .arg("alpha:/tmp/note.txt")
        .arg(&back)
        .output()
        .unwrap();
    assert!(scp.status.success(), "{}", text(&scp));
    assert_eq!(fs_err::read_to_string(&back).unwrap(), "copied by scp\n");

    // Up again: nothing starts.
    let (alpha, beta) = (pid(&p, "alpha"), pid(&p, "beta"));
    p.ok(&["up"]);
    assert_eq!(
        (pid(&p, "alpha"), pid(&p, "beta")),
        (alpha.clone(), beta.clone())
    );

    // A VM its qemu holds paused (as qemu does when a disk write finds no space, or as a
    // killed `snapshot save` leaves it) is resumed where it was, not restarted.
    let mut qmp = farm::sys::qmp::Qmp::connect(
        &p.path().join(".farm/vms/alpha/qmp.sock"),
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    qmp.command("stop", serde_json::json!({})).unwrap();
    drop(qmp);
    let resumed = p.ok(&["up"]);
    assert!(
        String::from_utf8_lossy(&resumed.stderr)
            .contains("resumed alpha (its qemu held it paused: paused)"),
        "{}",
        text(&resumed)
    );
    assert_eq!(pid(&p, "alpha"), alpha);
    let out = p.ok(&["ssh", "alpha", "--", "cat", "/tmp/note.txt"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "copied by scp\n");

    // A dead VM is reported and restarted alone.
    Command::new("kill").args(["-9", &beta]).status().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(p.state_of("beta"), "stopped");
    let again = p.ok(&["up"]);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("restarting beta"),
        "{}",
        text(&again)
    );
    assert_eq!(pid(&p, "alpha"), alpha);
    assert_ne!(pid(&p, "beta"), beta);

    // A changed platform replaces only that VM.
    let changed = LAB.replace(
        "[vms.beta]\nplatform = \"plain\"",
        "[platforms.marked]\nfrom = \"plain\"\nrun = [\"echo v2 > /etc/marked\"]\n\n[vms.beta]\nplatform = \"marked\"",
    );
    fs_err::write(p.path().join("farm.toml"), changed).unwrap();
    assert_eq!(p.state_of("beta"), "changed");
    let replaced = p.ok(&["up"]);
    assert!(
        String::from_utf8_lossy(&replaced.stderr).contains("replacing beta"),
        "{}",
        text(&replaced)
    );
    assert_eq!(pid(&p, "alpha"), alpha);
    let marked = p.ok(&["ssh", "beta", "--", "cat", "/etc/marked"]);
    assert_eq!(String::from_utf8_lossy(&marked.stdout).trim(), "v2");

    // Down: no qemu, no overlay.
    p.ok(&["down"]);
    assert!(!qemu_running("alpha", &p) && !qemu_running("beta", &p));
    assert!(project::list(&p.path().join(".farm/vms")).is_empty());
    assert_eq!(p.state_of("alpha"), "missing");
}

#[test]
fn disk_size_grows_the_overlay_and_a_debian_guests_root() {
    if !require_vm("disk_size", &[]) {
        return;
    }
    let p = Project::with_store(DEBIAN_LAB, &shared_store());
    p.ok(&["up"]);
    let df = p.ok(&["ssh", "grown", "--", "df", "-B1", "--output=size", "/"]);
    let root_bytes: u64 = String::from_utf8_lossy(&df.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    p.ok(&["down"]);
    assert!(root_bytes > 2_500_000_000, "root is {root_bytes} bytes");
}

#[test]
fn a_fixed_port_already_in_use_fails_before_anything_starts() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let lab = format!(
        "[images.img]\npath = \"disk.qcow2\"\n[targets.amd64]\narch = \"x86_64\"\n[platforms.p]\nfrom = \"img\"\n\
         [vms.free]\nplatform = \"p\"\n[vms.taken]\nplatform = \"p\"\nssh_port = {port}\n"
    );
    let p = Project::new(&lab);
    p.blank_disk("disk.qcow2");
    let out = p.run(&["up"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "Port {port} on 127.0.0.1 of host `local`, wanted by VM `taken`, is already in use"
        )),
        "{stderr}"
    );
    assert!(
        project::list(&p.path().join(".farm/vms")).is_empty(),
        "nothing was started"
    );
    drop(listener);
}

#[test]
fn two_vms_with_the_same_fixed_port_are_rejected_before_anything_starts() {
    let p = Project::new(
        "[images.img]\npath = \"disk.qcow2\"\n[targets.amd64]\narch = \"x86_64\"\n[platforms.p]\nfrom = \"img\"\n\
         [vms.a]\nplatform = \"p\"\nssh_port = 2299\n[vms.b]\nplatform = \"p\"\nssh_port = 2299\n",
    );
    let out = p.run(&["up"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Port 2299 on `local` is forwarded to both `a` and `b`")
    );
    assert!(!p.path().join(".farm").exists());
}

/// Every path under `dir` with its size and mtime: what "unchanged" means for a directory.
fn snapshot(dir: &std::path::Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs_err::symlink_metadata(&path).unwrap();
        out.push((
            path.display().to_string(),
            meta.len(),
            meta.modified().unwrap(),
        ));
        if meta.is_dir() {
            stack.extend(fs_err::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out.sort();
    out
}

#[test]
fn dry_run_prints_the_plan_and_leaves_a_fresh_directory_unchanged() {
    let p = Project::new(
        "[images.img]\npath = \"disk.qcow2\"\n[targets.amd64]\narch = \"x86_64\"\n[platforms.p]\nfrom = \"img\"\n[vms.a]\nplatform = \"p\"\n",
    );
    fs_err::write(p.path().join("disk.qcow2"), b"not needed for a dry run").unwrap();
    let before = snapshot(p.path());
    let out = p.ok(&["up", "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("import"), "{stdout}");
    assert!(
        stdout.contains("local (this machine):\n  create   a  new\n"),
        "{stdout}"
    );
    assert_eq!(snapshot(p.path()), before, "no .farm/, no keys, no store");
}
