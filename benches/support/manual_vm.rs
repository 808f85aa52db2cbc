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

/// A NIC beyond user networking: a qemu `-netdev` backend and the static address the seed
/// gives it.
pub struct ExtraNic {
    pub netdev: String,
    pub mac: farm::model::values::MacAddr,
    pub address: farm::model::values::IpCidr,
}

/// The MAC of every baseline VM's user-networking NIC (each VM has its own slirp).
const USER_MAC: farm::model::values::MacAddr =
    farm::model::values::MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

impl ManualVm {
    /// An overlay on `entry`'s disk, a seed with a fresh key, qemu started in the background
    /// with `hw` (MiB of memory, vCPUs), booting `boot`'s kernel with the command line
    /// stored beside it.
    pub fn start(entry: &Path, boot: &Path, disk_size: Option<&str>, hw: (u64, u32)) -> ManualVm {
        Self::start_with_nics(entry, boot, disk_size, hw, &[])
    }

    /// As [`ManualVm::start`], with `extra` NICs after the user-networking one.
    pub fn start_with_nics(
        entry: &Path,
        boot: &Path,
        disk_size: Option<&str>,
        (memory, cpus): (u64, u32),
        extra: &[ExtraNic],
    ) -> ManualVm {
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
        let mut seed = farm::model::build::seed::SeedSpec::new("manual", "manual");
        seed.authorized_keys = vec![public.trim().to_string()];
        if !extra.is_empty() {
            seed.nics = std::iter::once(farm::model::build::seed::SeedNic {
                mac: USER_MAC,
                address: None,
                gateway: None,
            })
            .chain(extra.iter().map(|nic| farm::model::build::seed::SeedNic {
                mac: nic.mac,
                address: Some(nic.address),
                gateway: None,
            }))
            .collect();
        }
        fs_err::write(
            w.join("seed.img"),
            farm::model::build::seed::seed_image_bytes(&seed).unwrap(),
        )
        .unwrap();
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
                &format!("{memory}M"),
            ])
            .args(["-smp", &cpus.to_string()])
            .args(["-nodefaults", "-display", "none", "-serial"])
            .arg(format!("file:{}", w.join("serial.log").display()))
            .arg("-kernel")
            .arg(boot.join("vmlinuz"))
            .arg("-initrd")
            .arg(boot.join("initrd.img"))
            .arg("-append")
            .arg(fs_err::read_to_string(boot.join("cmdline")).unwrap().trim())
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
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={USER_MAC}"),
            ])
            .args(extra.iter().enumerate().flat_map(|(i, nic)| {
                [
                    "-netdev".to_string(),
                    format!("{},id=x{i}", nic.netdev),
                    "-device".to_string(),
                    format!("virtio-net-pci,netdev=x{i},mac={}", nic.mac),
                ]
            }))
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

    /// Runs `script` over plain ssh and returns its stdout; panics when it fails.
    pub fn ssh_output(&self, script: &str) -> String {
        let out = Command::new("ssh")
            .arg("-i")
            .arg(self.key())
            .args(["-p", &self.port.to_string()])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "LogLevel=ERROR", "root@127.0.0.1", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "baseline `{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls `ssh true` until it answers (panics after 300 s).
    pub fn wait_ssh(&self) {
        let started = Instant::now();
        while !self.ssh("true") {
            if started.elapsed() > Duration::from_secs(300) {
                let serial =
                    fs_err::read_to_string(self.work.path().join("serial.log")).unwrap_or_default();
                let tail: Vec<&str> = serial.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "the baseline guest never answered ssh in 300 s; its serial console ends:\n{}",
                    tail.join("\n")
                );
            }
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

/// Where the tests keep their store: benchmarks reuse the images the tests built.
#[path = "../../tests/it/support/test_home.rs"]
pub mod test_home;

/// The store the tests keep (`test_home::shared_store`).
pub fn shared_store() -> PathBuf {
    test_home::shared_store()
}

/// Runs `cmd` to its end; panics, naming it `what`, with its stderr on failure.
pub fn timed(what: &str, cmd: &mut Command) -> Duration {
    let started = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

/// Runs farm in `project` against `store`; panics with its stderr on failure.
pub fn farm(project: &Path, store: &Path, args: &[&str]) -> Duration {
    timed(
        &format!("farm {args:?}"),
        Command::new(env!("CARGO_BIN_EXE_farm"))
            .current_dir(project)
            .env("FARM_STORE", store)
            .args(args),
    )
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

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for child in fs_err::read_dir(dir).unwrap() {
        let path = child.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The bundled lab (farm.toml, `images/`, `platforms/`, `ansible/`, `tests/lab/`) copied
/// into `dir`, with `extra` (top-level keys) put before farm.toml's own text.
pub fn copy_bundled_lab(dir: &Path, extra: &str) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let toml = fs_err::read_to_string(repo.join("farm.toml")).unwrap();
    fs_err::write(dir.join("farm.toml"), format!("{extra}\n{toml}")).unwrap();
    for folder in ["images", "platforms", "ansible", "tests/lab"] {
        copy_tree(&repo.join(folder), &dir.join(folder));
    }
}

fn copy_tree(from: &Path, to: &Path) {
    fs_err::create_dir_all(to).unwrap();
    for file in fs_err::read_dir(from).unwrap() {
        let path = file.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            fs_err::copy(&path, &target).unwrap();
        }
    }
}
