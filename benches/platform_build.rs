//! Platform build time: farm against a hand-written equivalent, in the same run.
//!
//! - farm cold: a platform (`packages = ["tree"]`, a file, two commands) built from the
//!   Debian image, made unique with a nonce file so it is never a cache hit.
//! - hand-written: the same work the way a script would do it: qemu-img overlay, qemu with
//!   direct kernel boot and a seed, a loop on `ssh true`, the same commands over ssh,
//!   poweroff.
//! - farm warm: the last step lives in a child platform; changing only it rebuilds only
//!   that layer.
//!
//! The Debian image comes from the test store (built there if missing, not timed).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn farm(project: &Path, store: &Path, args: &[&str]) -> Duration {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_farm"))
        .current_dir(project)
        .env("FARM_STORE", store)
        .args(args)
        .output()
        .expect("run farm");
    assert!(
        out.status.success(),
        "farm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

fn show_entry(project: &Path, store: &Path, name: &str) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_farm"))
        .current_dir(project)
        .env("FARM_STORE", store)
        .args(["show", "--json", name])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    PathBuf::from(v[0]["in_store"].as_str().expect("built"))
}

fn sh(cmd: &mut Command) {
    let status = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{cmd:?}");
}

fn keygen(path: &Path) -> String {
    sh(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path));
    fs_err::read_to_string(path.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string()
}

/// The hand-written baseline: what a shell script around qemu and ssh does.
fn hand_written(image_entry: &Path, nonce: &str) -> Duration {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let started = Instant::now();
    let disk = w.join("disk.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(image_entry.join("disk.qcow2"))
        .arg(&disk)
        .arg("8G"));
    let client = keygen(&w.join("id"));
    let mut seed = farm::seed::SeedSpec::new("bench", "bench");
    seed.authorized_keys = vec![client];
    farm::seed::write_seed_image(&seed, &w.join("seed.img")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let boot = image_entry.join("boot");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-m",
            "1024M",
        ])
        .args([
            "-smp",
            "2",
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "null",
        ])
        .arg("-kernel")
        .arg(boot.join("vmlinuz"))
        .arg("-initrd")
        .arg(boot.join("initrd.img"))
        .args(["-append", "root=/dev/vda rw console=ttyS0"])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,readonly=on",
            w.join("seed.img").display()
        ))
        .args([
            "-netdev",
            &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"),
        ])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .spawn()
        .unwrap();
    let ssh = |script: &str| {
        Command::new("ssh")
            .args(["-i"])
            .arg(w.join("id"))
            .args(["-p", &port.to_string(), "-o", "StrictHostKeyChecking=no"])
            .args([
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=5",
            ])
            .args(["-o", "LogLevel=ERROR", "root@127.0.0.1", script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    while !ssh("true") {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "baseline guest never answered"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for step in [
        "resize2fs /dev/vda",
        "export DEBIAN_FRONTEND=noninteractive; apt-get -y -q update && apt-get -y -q install --no-install-recommends tree",
        &format!("echo {nonce} > /etc/bench-nonce"),
        "echo one > /etc/bench-one",
        "echo two > /etc/bench-two",
        "apt-get clean; rm -rf /var/lib/apt/lists/*; fstrim -a; sync",
    ] {
        assert!(ssh(step), "baseline step failed: {step}");
    }
    ssh("(sleep 1; poweroff) >/dev/null 2>&1 &");
    qemu.wait().unwrap();
    started.elapsed()
}

fn main() {
    let store = std::env::var_os("FARM_TEST_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("farm-test-store"));
    let project = tempfile::tempdir().unwrap();
    let p = project.path();
    let nonce = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    fs_err::write(p.join("nonce"), &nonce).unwrap();
    let header = "[images.bookworm]\ndebian = { suite = \"bookworm\" }\n[targets.amd64]\narch = \"x86_64\"\n";
    // One layer with every step, as the hand-written script does it.
    let single = |last: &str| {
        format!(
            "{header}[platforms.app]\nfrom = \"bookworm\"\npackages = [\"tree\"]\nfiles = {{ \"/etc/bench-nonce\" = \"nonce\" }}\n\
             run = [\"echo one > /etc/bench-one\", \"echo {last} > /etc/bench-two\"]\n"
        )
    };
    // The same steps with the last one in a child platform: farm's way to cache a prefix.
    let split = |last: &str| {
        format!(
            "{header}[platforms.prefix]\nfrom = \"bookworm\"\npackages = [\"tree\"]\nfiles = {{ \"/etc/bench-nonce\" = \"nonce\" }}\n\
             run = [\"echo one > /etc/bench-one\"]\n[platforms.last]\nfrom = \"prefix\"\nrun = [\"echo {last} > /etc/bench-two\"]\n"
        )
    };
    fs_err::write(p.join("farm.toml"), single("two")).unwrap();
    farm(p, &store, &["build", "-q", "bookworm"]);
    let image = show_entry(p, &store, "bookworm");

    let baseline = hand_written(&image, &nonce);
    let cold = farm(p, &store, &["build", "-q", "app"]);
    fs_err::write(p.join("farm.toml"), single("three")).unwrap();
    let warm_single = farm(p, &store, &["build", "-q", "app"]);
    fs_err::write(p.join("farm.toml"), split("two")).unwrap();
    farm(p, &store, &["build", "-q", "last"]);
    fs_err::write(p.join("farm.toml"), split("three")).unwrap();
    let warm_split = farm(p, &store, &["build", "-q", "last"]);
    println!(
        "platform build (tree + a file + 2 commands, TCG): farm cold {:.1} s vs hand-written qemu+ssh {:.1} s (ratio {:.2}); \
         after changing only the last step: same layer rebuilt {:.1} s, last step in its own child platform {:.1} s",
        cold.as_secs_f64(),
        baseline.as_secs_f64(),
        cold.as_secs_f64() / baseline.as_secs_f64(),
        warm_single.as_secs_f64(),
        warm_split.as_secs_f64()
    );
}
