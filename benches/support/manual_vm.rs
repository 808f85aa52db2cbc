//! The hand-written baseline the benchmarks compare farm with: what a shell script around
//! qemu-img, qemu and ssh does, with no farm code in the loop except the seed writer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ManualVm {
    pub work: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

fn sh(cmd: &mut Command) {
    let status = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{cmd:?}");
}

impl ManualVm {
    /// An overlay on `entry`'s disk, a seed with a fresh key, qemu started in the background.
    pub fn start(entry: &Path, boot: &Path, disk_size: Option<&str>) -> ManualVm {
        let work = tempfile::tempdir().unwrap();
        let w = work.path();
        let disk = w.join("disk.qcow2");
        let mut create = Command::new("qemu-img");
        create
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(entry.join("disk.qcow2"))
            .arg(&disk);
        if let Some(size) = disk_size {
            create.arg(size);
        }
        sh(&mut create);
        sh(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(w.join("id")));
        let public = fs_err::read_to_string(w.join("id.pub")).unwrap();
        let mut seed = farm::seed::SeedSpec::new("manual", "manual");
        seed.authorized_keys = vec![public.trim().to_string()];
        farm::seed::write_seed_image(&seed, &w.join("seed.img")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("qemu-system-x86_64")
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
                "1",
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
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        ManualVm { work, port, child }
    }

    fn key(&self) -> PathBuf {
        self.work.path().join("id")
    }

    /// Runs `script` over plain ssh; true when it exits 0.
    pub fn ssh(&self, script: &str) -> bool {
        Command::new("ssh")
            .arg("-i")
            .arg(self.key())
            .args([
                "-p",
                &self.port.to_string(),
                "-o",
                "StrictHostKeyChecking=no",
            ])
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
    }

    /// Polls `ssh true` until it answers (panics after 300 s).
    pub fn wait_ssh(&self) {
        let started = Instant::now();
        while !self.ssh("true") {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "the baseline guest never answered"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Powers off cleanly and waits for qemu to exit.
    pub fn poweroff(mut self) {
        self.ssh("(sleep 1; poweroff) >/dev/null 2>&1 &");
        let _ = self.child.wait();
    }
}

impl Drop for ManualVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The store the tests use, so benchmarks reuse images the tests built.
pub fn shared_store() -> PathBuf {
    std::env::var_os("FARM_TEST_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("farm-test-store"))
}

/// Runs farm in `project` against `store`; panics with its stderr on failure.
pub fn farm(project: &Path, store: &Path, args: &[&str]) -> Duration {
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

/// The store entry farm derives for `name` in `project`.
pub fn entry(project: &Path, store: &Path, name: &str) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_farm"))
        .current_dir(project)
        .env("FARM_STORE", store)
        .args(["show", "--json", name])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    PathBuf::from(v[0]["in_store"].as_str().expect("built"))
}
