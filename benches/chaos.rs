//! Kill at any moment (issue 31): farm is killed with SIGKILL at seeded random points of
//! its commands, and after every kill `farm store verify` must find no damaged entry and
//! the same command, run again, must converge.
//!
//! `cargo bench --bench chaos` (FARM_CHAOS_SEED, default 1; FARM_CHAOS_ROUNDS, default 8
//! kills per scenario; FARM_CHAOS_ONLY, run only the scenarios whose name holds it). Scenarios: a build that downloads and converts an image, a build
//! that runs a step in a build VM and commits it, `up` of a tiny VM, `snapshot save` and
//! `restore`, `store push` and `pull` through a `file://` cache, `gc`, and `store import`;
//! then `up` of a VM on a remote host (sshd on 127.0.0.1) with a new layer to push; then
//! `snapshot save` with its disk filled at a random point (a tmpfs; root only).
//! Each is first run whole to learn how long it takes; each kill falls at a uniform point
//! of that time, and kills either farm alone (as `kill -9 PID` does) or its whole process
//! group (as a CI runner cancelling a job does).
//!
//! Prints one line per kill and a summary: kills, damaged entries found, runs that did not
//! converge.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// ansible-core is not needed here; qemu, qemu-img and python3 (for the HTTP server) are.
const TOML: &str = r#"
[images.tiny]
tiny = true

[images.blob]
url = "URL"
sha256 = "SHA"
format = "raw"

[targets.amd64]
arch = "x86_64"

[platforms.small]
from = "tiny"
memory = "256M"
run = ["dd if=/dev/urandom of=/chaos bs=1M count=16 2>/dev/null; echo NONCE > /nonce"]

[vms.t]
platform = "small"
"#;

use farm::fuzz::Rng;

/// A uniform number in [0, 1).
fn unit(rng: &mut Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

struct Lab {
    dir: tempfile::TempDir,
    store: PathBuf,
    cache_url: String,
    served: PathBuf,
    server: Child,
    port: u16,
    nonce: u64,
    /// The sha256 of the current image.
    sha: String,
    /// A remote host (sshd on 127.0.0.1) with VM `far` on it, for the push phase.
    remote: Option<Remote>,
}

/// A real OpenSSH server on 127.0.0.1 that farm treats as a remote host: its own host key,
/// config and authorized_keys (the lab's `lab_key`), killed with the lab.
struct Remote {
    port: u16,
    /// farm's root on it (`root = …`): its store is `cache/`.
    root: PathBuf,
    child: Child,
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.farm(&["down", "-q", "--timeout", "0"]).output();
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl Lab {
    /// A lab (project, store, served images) in a new directory under `parent`.
    fn new_in(parent: &Path) -> Lab {
        let dir = tempfile::tempdir_in(parent).unwrap();
        let served = dir.path().join("served");
        fs_err::create_dir_all(&served).unwrap();
        let port = farm::sys::hostinfo::free_local_port().unwrap();
        let server = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .current_dir(&served)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 serves the image");
        std::thread::sleep(Duration::from_millis(500));
        let cache = dir.path().join("bincache");
        let lab = Lab {
            store: dir.path().join("store"),
            cache_url: format!("file://{}", cache.display()),
            served,
            server,
            port,
            nonce: 0,
            sha: String::new(),
            remote: None,
            dir,
        };
        let made = Command::new(env!("CARGO_BIN_EXE_farm"))
            .args(["store", "keygen", "chaos", "--dir"])
            .arg(lab.dir.path())
            .output()
            .unwrap();
        assert!(made.status.success());
        fs_err::write(lab.dir.path().join("trust"), made.stdout).unwrap();
        lab
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn farm(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_farm"));
        cmd.current_dir(self.path())
            .args(args)
            .env("FARM_STORE", &self.store)
            .stdin(Stdio::null());
        cmd
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.farm(args).output().unwrap();
        assert!(
            out.status.success(),
            "farm {args:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A new version of every input: a fresh 96 MiB image to download and a new step, so
    /// the next build has work to do.
    fn renew(&mut self) {
        self.nonce += 1;
        let bytes: Vec<u8> = {
            let mut rng = Rng::new(self.nonce);
            (0..(96u64 << 20) / 8)
                .flat_map(|_| rng.next_u64().to_le_bytes())
                .collect()
        };
        let name = format!("blob-{}.raw", self.nonce);
        fs_err::write(self.served.join(&name), &bytes).unwrap();
        self.sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        self.write_toml(true);
    }

    /// farm.toml for the current inputs; without the image `blob` when `with_blob` is
    /// false (so `gc` removes its entry).
    fn write_toml(&self, with_blob: bool) {
        let trust = fs_err::read_to_string(self.path().join("trust")).unwrap();
        let mut toml = TOML
            .replace(
                "URL",
                &format!("http://127.0.0.1:{}/blob-{}.raw", self.port, self.nonce),
            )
            .replace("SHA", &self.sha)
            .replace("NONCE", &self.nonce.to_string());
        if !with_blob {
            let start = toml.find("[images.blob]").unwrap();
            let end = toml.find("[targets.amd64]").unwrap();
            toml.replace_range(start..end, "");
        }
        if let Some(remote) = &self.remote {
            toml.push_str(&format!(
                "\n[hosts.lab]\naddress = \"root@127.0.0.1:{}\"\nidentity_file = \"lab_key\"\n\
                 known_hosts = \"lab_known_hosts\"\nroot = \"{}\"\n\n\
                 [vms.far]\nplatform = \"small\"\nhost = \"lab\"\n",
                remote.port,
                remote.root.display()
            ));
        }
        fs_err::write(
            self.path().join("farm.toml"),
            format!("{}\n{toml}", trust.trim()),
        )
        .unwrap();
    }

    /// Starts the remote host: sshd on a free port of 127.0.0.1 letting `lab_key` in.
    fn start_remote(&mut self) {
        let dir = self.path().join("remote");
        fs_err::create_dir_all(&dir).unwrap();
        let keygen = |path: &Path| {
            let made = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path)
                .status()
                .unwrap();
            assert!(made.success());
            fs_err::read_to_string(path.with_extension("pub")).unwrap()
        };
        let client = keygen(&self.path().join("lab_key"));
        let host = keygen(&dir.join("host_key"));
        fs_err::write(dir.join("authorized_keys"), client).unwrap();
        let port = farm::sys::hostinfo::free_local_port().unwrap();
        fs_err::write(
            dir.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nAllowTcpForwarding yes\nAllowStreamLocalForwarding yes\n",
                d = dir.display()
            ),
        )
        .unwrap();
        fs_err::create_dir_all("/run/sshd").unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs_err::File::create(dir.join("sshd.log"))
                    .unwrap()
                    .into_parts()
                    .0,
            )
            .spawn()
            .expect("sshd starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let key: Vec<&str> = host.split_whitespace().take(2).collect();
        fs_err::write(
            self.path().join("lab_known_hosts"),
            format!("[127.0.0.1]:{port} {}\n", key.join(" ")),
        )
        .unwrap();
        self.remote = Some(Remote {
            port,
            root: dir.join("farm-root"),
            child,
        });
    }

    /// Damaged entries `farm store verify` reports (each is one `error:` line).
    fn damaged(&self) -> (usize, String) {
        let out = self
            .farm(&["store", "verify", "--no-qemu-check"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        (said.matches("error:").count(), said)
    }
}

/// One kind of command, and what it needs before it runs.
struct Scenario {
    name: &'static str,
    /// Brings the lab to where the command has work to do.
    prepare: fn(&mut Lab),
    args: fn(&Lab) -> Vec<String>,
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "build: download, convert, commit",
            prepare: |lab| lab.renew(),
            args: |_| strings(&["build", "-q", "blob"]),
        },
        Scenario {
            name: "build: a step in a build VM, commit",
            prepare: |lab| lab.renew(),
            args: |_| strings(&["build", "-q", "small"]),
        },
        Scenario {
            name: "up: start a VM",
            prepare: |lab| {
                lab.ok(&["build", "-q", "small"]);
                let _ = lab.farm(&["down", "-q", "--timeout", "0"]).output();
            },
            args: |_| strings(&["up", "-q", "--boot"]),
        },
        Scenario {
            name: "snapshot save",
            prepare: |lab| {
                // A VM restored from `chaos` backs onto it, and `rm` refuses that: down first.
                lab.ok(&["down", "-q", "--timeout", "0"]);
                let _ = lab.farm(&["snapshot", "rm", "chaos"]).output();
                lab.ok(&["up", "-q"]);
            },
            args: |_| strings(&["snapshot", "save", "-q", "chaos"]),
        },
        Scenario {
            name: "snapshot restore",
            prepare: |lab| {
                lab.ok(&["up", "-q"]);
                if !lab.path().join(".farm/snapshots/chaos").exists() {
                    lab.ok(&["snapshot", "save", "-q", "chaos"]);
                }
            },
            args: |_| strings(&["snapshot", "restore", "-q", "chaos"]),
        },
        Scenario {
            name: "store push",
            prepare: |lab| {
                lab.renew();
                lab.ok(&["build", "-q", "blob"]);
            },
            args: |lab| {
                let key = lab.path().join("chaos.secret");
                vec![
                    "store".into(),
                    "push".into(),
                    "-q".into(),
                    lab.cache_url.clone(),
                    "blob".into(),
                    "--key".into(),
                    key.display().to_string(),
                ]
            },
        },
        Scenario {
            name: "store pull",
            prepare: |lab| {
                lab.renew();
                lab.ok(&["build", "-q", "blob"]);
                let key = lab.path().join("chaos.secret");
                lab.ok(&[
                    "store",
                    "push",
                    "-q",
                    &lab.cache_url,
                    "blob",
                    "--key",
                    key.to_str().unwrap(),
                ]);
                // Gone from the store, so the pull has work to do.
                lab.write_toml(false);
                lab.ok(&["gc", "-q"]);
                lab.write_toml(true);
            },
            args: |lab| {
                vec![
                    "store".into(),
                    "pull".into(),
                    "-q".into(),
                    lab.cache_url.clone(),
                    "blob".into(),
                ]
            },
        },
        Scenario {
            name: "gc",
            prepare: |lab| {
                lab.renew();
                lab.ok(&["build", "-q", "blob"]);
                lab.renew();
            },
            args: |_| strings(&["gc", "-q"]),
        },
        Scenario {
            name: "store import",
            prepare: |lab| {
                lab.renew();
                lab.ok(&["build", "-q", "blob"]);
                let archive = lab.path().join("blob.farm");
                let _ = fs_err::remove_file(&archive);
                lab.ok(&[
                    "store",
                    "export",
                    "-q",
                    "blob",
                    "-o",
                    archive.to_str().unwrap(),
                ]);
                let _ = fs_err::remove_dir_all(lab.path().join("other"));
            },
            args: |lab| {
                vec![
                    "store".into(),
                    "import".into(),
                    "-q".into(),
                    lab.path().join("blob.farm").display().to_string(),
                    "--store".into(),
                    lab.path().join("other").display().to_string(),
                ]
            },
        },
    ]
}

/// One kill: when it fell, whether it took farm's whole process group, and how the command
/// had ended if it had already.
struct Kill {
    at: Duration,
    group: bool,
    finished: Option<std::process::ExitStatus>,
}

/// Runs farm with `args` and sends SIGKILL at a seeded uniform point of `length`, to farm
/// alone (as `kill -9 PID` does) or to its process group (as a CI runner cancelling a job
/// does).
fn kill_during(lab: &Lab, args: &[String], rng: &mut Rng, length: Duration) -> Kill {
    let at = length.mul_f64(0.02 + 0.96 * unit(rng));
    let group = rng.next_u64().is_multiple_of(2);
    let mut child = spawn(lab, args);
    std::thread::sleep(at);
    let finished = child.try_wait().unwrap();
    let pid = child.id() as i32;
    // SAFETY: plain signals to a child this program started (and its group).
    unsafe {
        libc::kill(if group { -pid } else { pid }, libc::SIGKILL);
    }
    let _ = child.wait();
    Kill {
        at,
        group,
        finished,
    }
}

/// Starts farm in a process group of its own, so the group can be killed.
fn spawn(lab: &Lab, args: &[String]) -> Child {
    use std::os::unix::process::CommandExt;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = lab.farm(&args);
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    cmd.spawn().unwrap()
}

fn main() {
    let seed: u64 = std::env::var("FARM_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rounds: usize = std::env::var("FARM_CHAOS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let mut rng = Rng::new(seed);
    let mut lab = Lab::new_in(&std::env::temp_dir());
    // A farm.toml from the start, for runs of only some scenarios.
    lab.renew();
    let (mut kills, mut damaged, mut stuck) = (0, 0, Vec::new());
    let started = Instant::now();
    // FARM_CHAOS_ONLY: run only the scenarios whose name holds it ("disk filled": only the
    // full-disk saves).
    let only = std::env::var("FARM_CHAOS_ONLY").unwrap_or_default();
    for scenario in scenarios().into_iter().filter(|s| s.name.contains(&only)) {
        // Once whole, to learn its length.
        (scenario.prepare)(&mut lab);
        let args = (scenario.args)(&lab);
        let t0 = Instant::now();
        let whole = lab
            .farm(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .output()
            .unwrap();
        let length = t0.elapsed();
        assert!(
            whole.status.success(),
            "{}, unkilled: {}",
            scenario.name,
            String::from_utf8_lossy(&whole.stderr)
        );
        // The first run may have done more (the tiny image built once): a kill that comes
        // after the command finished halves the window, so kills land inside it.
        let mut length = length;
        for round in 0..rounds {
            (scenario.prepare)(&mut lab);
            let args = (scenario.args)(&lab);
            let Kill {
                at,
                group,
                finished,
            } = kill_during(&lab, &args, &mut rng, length);
            kills += usize::from(finished.is_none());
            if finished.is_some() {
                length = length.mul_f64(0.5);
            }
            let (found, said) = lab.damaged();
            damaged += found;
            // A save killed after it committed has saved: the snapshot must then restore;
            // otherwise the same command must now succeed.
            let saved = scenario.name == "snapshot save"
                && lab
                    .path()
                    .join(".farm/snapshots/chaos")
                    .join(farm::model::lab::snapshot::MANIFEST_FILE)
                    .exists();
            let again_args: Vec<&str> = match saved {
                true => vec!["snapshot", "restore", "-q", "chaos"],
                false => args.iter().map(String::as_str).collect(),
            };
            let again = lab.farm(&again_args).output().unwrap();
            let converged = again.status.success();
            if !converged {
                stuck.push(format!(
                    "{} round {round}: {}",
                    scenario.name,
                    String::from_utf8_lossy(&again.stderr)
                ));
            }
            println!(
                "{:<40} kill at {:>6.2} s of {:>6.2} s ({}){}: {} damaged, {}",
                scenario.name,
                at.as_secs_f64(),
                length.as_secs_f64(),
                if group { "group" } else { "farm" },
                match finished {
                    None => "",
                    Some(status) if status.success() => " (had finished)",
                    Some(_) => " (had FAILED before the kill)",
                },
                found,
                if converged {
                    "converged"
                } else {
                    "DID NOT CONVERGE"
                }
            );
            if found > 0 {
                println!("{said}");
            }
        }
    }
    drop(lab);
    let pushes = match "up: push to a remote host, start".contains(&only) {
        true => push_to_a_remote_host(&mut rng, rounds, &mut damaged, &mut stuck),
        false => 0,
    };
    kills += pushes;
    let fills = match "snapshot save, disk filled".contains(&only) {
        true => fill_during_saves(&mut rng, rounds, &mut damaged, &mut stuck),
        false => 0,
    };
    println!(
        "chaos (seed {seed}): {kills} kills and {fills} disks filled during a save in {:.0} s; {damaged} damaged entries; {} runs after a kill or a full disk did not converge",
        started.elapsed().as_secs_f64(),
        stuck.len()
    );
    for s in &stuck {
        println!("  {s}");
    }
}

/// The disk filled in the middle of `snapshot save` (issue 31): the whole lab (project and
/// store) on a 1 GiB tmpfs, and at a seeded uniform point of the save a file takes all the
/// space left. Whatever the save then says, no entry is damaged; once the file is gone the
/// same save (or, when the snapshot was committed, its restore) succeeds, `up` succeeds
/// (resuming a VM qemu paused on the full disk) and the VM answers.
/// Returns how many saves had their disk filled; needs root (mount), else says so and does
/// none.
fn fill_during_saves(
    rng: &mut Rng,
    rounds: usize,
    damaged: &mut usize,
    stuck: &mut Vec<String>,
) -> usize {
    let mount = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1G", "tmpfs"])
        .arg(mount.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!("disk filled during a save: skipped (mounting a tmpfs needs root)");
        return 0;
    }
    let filled = {
        let lab = Lab::new_in(mount.path());
        lab.write_toml(false);
        let name = "snapshot save, disk filled";
        let prepare = |lab: &Lab| {
            let _ = lab.farm(&["down", "-q", "--timeout", "0"]).output();
            let _ = lab.farm(&["snapshot", "rm", "chaos"]).output();
            // The snapshots of earlier rounds go: the tmpfs holds a few, not twenty.
            lab.ok(&["gc", "-q"]);
            lab.ok(&["up", "-q"]);
        };
        let save = ["snapshot", "save", "-q", "chaos"];
        lab.ok(&["build", "-q", "small"]);
        prepare(&lab);
        let t0 = Instant::now();
        lab.ok(&save);
        let length = t0.elapsed();
        let filler = mount.path().join("filler");
        for round in 0..rounds {
            prepare(&lab);
            let at = length.mul_f64(0.02 + 0.96 * unit(rng));
            let child = spawn(&lab, &strings(&save));
            std::thread::sleep(at);
            // Most of the space at once, then the rest written until the kernel refuses: the
            // save writes meanwhile, so what is free changes under the filler.
            let free = farm::sys::space::filesystem_of(mount.path()).map_or(0, |fs| fs.free);
            let _ = Command::new("fallocate")
                .args(["-l", &free.saturating_sub(8 << 20).to_string()])
                .arg(&filler)
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("dd")
                .args(["if=/dev/zero", "bs=64k"])
                .arg(format!("of={}.rest", filler.display()))
                .stderr(Stdio::null())
                .status();
            let out = child.wait_with_output().unwrap();
            let said = String::from_utf8_lossy(&out.stderr).into_owned();
            let (found, report) = lab.damaged();
            *damaged += found;
            // What qemu made of the full disk: `io-error` when a guest write found no space.
            let qemu_said = farm::sys::qmp::Qmp::connect(
                &lab.path().join(".farm/vms/t/qmp.sock"),
                Duration::from_secs(5),
            )
            .and_then(|mut qmp| qmp.command("query-status", serde_json::json!({})))
            .map_or("no qemu".to_string(), |s| {
                s["status"].as_str().unwrap_or("?").to_string()
            });
            let _ = fs_err::remove_file(&filler);
            let _ = fs_err::remove_file(filler.with_extension("rest"));
            let saved = lab
                .path()
                .join(".farm/snapshots/chaos")
                .join(farm::model::lab::snapshot::MANIFEST_FILE)
                .exists();
            let again: &[&str] = if saved {
                &["snapshot", "restore", "-q", "chaos"]
            } else {
                &save
            };
            // The space is back: the same command succeeds, `up` finds the lab as it should
            // be (a VM qemu paused is resumed), and the VM answers.
            let again = lab.farm(again).output().unwrap();
            let up = lab.farm(&["up", "-q"]).output().unwrap();
            let running = lab.farm(&["ssh", "t", "--", "true"]).output().unwrap();
            let converged =
                again.status.success() && up.status.success() && running.status.success();
            if !converged {
                stuck.push(format!(
                    "{name} round {round}: {}; {}; {}",
                    String::from_utf8_lossy(&again.stderr).trim(),
                    String::from_utf8_lossy(&up.stderr).trim(),
                    String::from_utf8_lossy(&running.stderr).trim()
                ));
            }
            println!(
                "{name:<40} filled at {:>6.2} s of {:>6.2} s: the save {}; qemu then {qemu_said}; {found} damaged, {}",
                at.as_secs_f64(),
                length.as_secs_f64(),
                match (
                    out.status.success(),
                    said.lines().find(|l| l.starts_with("error:"))
                ) {
                    (true, _) => "succeeded".to_string(),
                    (false, Some(error)) => format!("failed ({error})"),
                    (false, None) => "failed".to_string(),
                },
                if converged {
                    "converged"
                } else {
                    "DID NOT CONVERGE"
                }
            );
            if found > 0 {
                println!("{report}");
            }
        }
        rounds
    };
    let _ = Command::new("umount").arg(mount.path()).status();
    filled
}

/// `up` of a VM on a remote host (sshd on 127.0.0.1, farm's root in a directory of the lab),
/// killed at a seeded point: each round has a new layer to push (a new step), so the kill
/// falls in the push, the VM's replacement or its start. After each kill nothing in the
/// local store is damaged, the same `up` converges and the VM answers, and the host's store
/// holds only whole entries and no push left half way. Returns how many kills landed.
fn push_to_a_remote_host(
    rng: &mut Rng,
    rounds: usize,
    damaged: &mut usize,
    stuck: &mut Vec<String>,
) -> usize {
    let name = "up: push to a remote host, start";
    let mut lab = Lab::new_in(&std::env::temp_dir());
    lab.start_remote();
    let up = strings(&["up", "-q", "far"]);
    let prepare = |lab: &mut Lab| {
        lab.renew();
        lab.ok(&["build", "-q", "small"]);
    };
    prepare(&mut lab);
    let t0 = Instant::now();
    lab.ok(&["up", "-q", "far"]);
    let mut length = t0.elapsed();
    let mut kills = 0;
    let root = lab.remote.as_ref().unwrap().root.clone();
    for round in 0..rounds {
        prepare(&mut lab);
        let Kill {
            at,
            group,
            finished,
        } = kill_during(&lab, &up, rng, length);
        kills += usize::from(finished.is_none());
        if finished.is_some() {
            length = length.mul_f64(0.5);
        }
        let (found, report) = lab.damaged();
        *damaged += found;
        let again = lab.farm(&["up", "-q", "far"]).output().unwrap();
        let answers = lab
            .farm(&["ssh", "far", "--", "cat", "/nonce"])
            .output()
            .unwrap();
        let nonce_there = String::from_utf8_lossy(&answers.stdout).trim() == lab.nonce.to_string();
        let store = root.join("cache/store");
        let partial: Vec<String> = fs_err::read_dir(&store)
            .map(|dir| {
                dir.flatten()
                    .filter(|e| !e.path().join("meta.json").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let left: Vec<String> = fs_err::read_dir(root.join("cache/tmp"))
            .map(|dir| {
                dir.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("push."))
                    .collect()
            })
            .unwrap_or_default();
        let converged = again.status.success() && nonce_there && partial.is_empty();
        if !converged {
            stuck.push(format!(
                "{name} round {round}: {} {} partial: {partial:?}",
                String::from_utf8_lossy(&again.stderr).trim(),
                String::from_utf8_lossy(&answers.stderr).trim(),
            ));
        }
        println!(
            "{name:<40} kill at {:>6.2} s of {:>6.2} s ({}){}: {found} damaged, {}{}",
            at.as_secs_f64(),
            length.as_secs_f64(),
            if group { "group" } else { "farm" },
            if finished.is_some() {
                " (had finished)"
            } else {
                ""
            },
            if converged {
                "converged"
            } else {
                "DID NOT CONVERGE"
            },
            if left.is_empty() {
                String::new()
            } else {
                format!(" (left on the host: {left:?})")
            }
        );
        if found > 0 {
            println!("{report}");
        }
    }
    kills
}
