//! Shared labs: a running lab brought up once and saved with `farm snapshot save`, then
//! restored (seconds, not minutes of booting under TCG) by every test that needs it.
//!
//! A lab lives in a kept project directory under the test home, named by its recipe's key
//! (the farm.toml, the files beside it, and the derivation hash of every VM's platform), because
//! a snapshot restores only from the state directory that saved it. Its snapshot's entries
//! are in the shared test store, so a later run on the same machine restores it without
//! booting anything; a changed recipe is another directory and brings the lab up anew.
//!
//! Tests of one lab take turns: [`Lab::restore`] holds an exclusive file lock on the lab until
//! the test ends (nextest's test groups also keep them apart, so no test slot waits on it).
//! Every test gets the saved moment, whatever the test before it did: the farm.toml and files
//! are written again, and `restore` stops what runs. When the test ends, the lab is stopped
//! at once (nothing needs a clean power-off: the snapshot keeps the moment).

use std::io::Write;
use std::path::PathBuf;
use std::process::Output;
use std::time::Instant;

use super::fixture::take_turn;
use super::project::{self, Project, text};
use super::skip::{ANSIBLE, require_vm};
use super::test_home::{labs_dir, shared_store};

/// The snapshot every shared lab is saved as.
pub const BASE: &str = "base";

/// What a lab is: its farm.toml and files, how it is brought up, and what it must hold
/// before it is saved.
pub struct LabRecipe {
    /// Names the lab's directory and lock.
    pub name: &'static str,
    pub farm_toml: String,
    /// Files written into the project, relative path and bytes.
    pub files: Vec<(&'static str, Vec<u8>)>,
    /// The lab's VMs: the derivation hash of each one's platform is part of the lab's key.
    pub vms: &'static [&'static str],
    /// `farm up`'s arguments for the first bring-up.
    pub up_args: &'static [&'static str],
    /// Checks of the first bring-up's log (stderr), and what to do in the lab before it is
    /// saved.
    pub after_up: fn(&Project, &str),
}

/// A shared lab restored to its saved moment, this test's until it is dropped.
pub struct Lab {
    pub project: Project,
    _turn: fs_err::File,
}

/// The lab of `recipe` at its saved moment for `test`, or `None` when this machine cannot run
/// it (said loudly, and a failure under CI, by `require_vm`): a lab is brought up with
/// Ansible, which provisions its L2s.
pub fn restored(test: &str, recipe: &LabRecipe) -> Option<Lab> {
    if !require_vm(test, &[ANSIBLE]) {
        return None;
    }
    Some(Lab::restore(recipe))
}

impl Lab {
    /// The lab of `recipe` at its saved moment: restored from its snapshot, or brought up
    /// and saved first when no snapshot of this recipe restores.
    pub fn restore(recipe: &LabRecipe) -> Lab {
        let turn = take_turn(&labs_dir(), recipe.name);

        first_in_line();
        let project = lab_project(recipe);
        let started = Instant::now();
        let restored = project
            .farm_with_ansible(&["snapshot", "restore", BASE])
            .output()
            .unwrap();
        if restored.status.success() {
            eprintln!(
                "lab `{}`: restored snapshot `{BASE}` in {:.1} s",
                recipe.name,
                started.elapsed().as_secs_f64()
            );
            return Lab {
                project,
                _turn: turn,
            };
        }
        eprintln!(
            "lab `{}`: no snapshot to restore ({}); bringing it up",
            recipe.name,
            first_line(&restored)
        );
        // Whatever a broken earlier attempt left: stopped, its snapshot name freed; and the
        // directories of this lab's earlier recipes, which no test restores again.
        let _ = project.farm(&["down", "--timeout", "0"]).output();
        let _ = project.farm(&["snapshot", "rm", BASE]).output();
        remove_other_recipes(recipe.name, project.path());
        let log = bring_up(recipe, &project);
        (recipe.after_up)(&project, &log);
        project.ok(&["snapshot", "save", BASE]);
        eprintln!(
            "lab `{}`: up and saved in {:.0} s",
            recipe.name,
            started.elapsed().as_secs_f64()
        );
        Lab {
            project,
            _turn: turn,
        }
    }
}

/// `farm up` of the lab; its log. A first `up` that fails is said on the real stderr and
/// converged once more, as a user would: KVM inside an L1 under TCG now and then spoils a
/// guest (a file Ansible just wrote gone, a connection dropped at key exchange), and `up`
/// picks up where it failed. A second failure fails the test.
fn bring_up(recipe: &LabRecipe, project: &Project) -> String {
    let first = project.farm_with_ansible(recipe.up_args).output().unwrap();
    let log = String::from_utf8_lossy(&first.stderr).into_owned();
    if first.status.success() {
        return log;
    }
    let _ = writeln!(
        std::io::stderr(),
        "lab `{}`: the first `farm up` failed; converging once more:\n{}",
        recipe.name,
        text(&first)
    );
    let again = project.ok_with_ansible(recipe.up_args);
    format!("{log}{}", String::from_utf8_lossy(&again.stderr))
}

/// Gives this test's processes (farm, its build VMs, the lab's qemus) a larger share of the
/// CPU than the tests beside it. A lab's chain (its layers, its first `up`, then its tests one
/// after another) is the longest of a run, and under TCG everything it does is CPU: the run
/// ends when it does. Needs root; without it the lab just takes its turn.
fn first_in_line() {
    // SAFETY: setpriority on this process; no pointers involved.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -5) };
}

/// The lab's kept project, its farm.toml and files written anew (a test may have changed
/// them), in the directory of its recipe's key.
fn lab_project(recipe: &LabRecipe) -> Project {
    // The key needs the derivation hashes, which need the farm.toml and files: write them in a
    // scratch project first.
    let scratch = Project::with_store(&recipe.farm_toml, &shared_store());
    write_files(&scratch, recipe);
    let mut hasher = blake3::Hasher::new();
    hasher.update(recipe.farm_toml.as_bytes());
    for (path, bytes) in &recipe.files {
        hasher.update(path.as_bytes());
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    for vm in recipe.vms {
        let shown: serde_json::Value =
            serde_json::from_slice(&scratch.ok(&["show", "--json", vm]).stdout).unwrap();
        for node in shown.as_array().unwrap() {
            hasher.update(node["hash"].as_str().unwrap().as_bytes());
        }
    }
    for arg in machine_shape() {
        hasher.update(arg.as_bytes());
        hasher.update(b"\0");
    }
    let key = hasher.finalize().to_hex();
    let dir: PathBuf = labs_dir().join(format!("{}-{}", recipe.name, &key[..16]));
    // What an earlier test added beside the recipe's files (a playbook, host_vars) goes.
    for name in project::list(&dir) {
        if name != ".farm" {
            let path = dir.join(&name);
            if path.is_dir() {
                fs_err::remove_dir_all(&path).unwrap();
            } else {
                fs_err::remove_file(&path).unwrap();
            }
        }
    }
    let project = Project::kept(&dir, &recipe.farm_toml, &shared_store());
    write_files(&project, recipe);
    project
}

/// The qemu command line this farm gives a VM like the labs' hypervisor VM. A snapshot
/// restores only the devices its guest booted with: one saved by a farm that gave its
/// machines other devices is another lab (a guest restored under a panic device it never
/// probed would not use it).
fn machine_shape() -> Vec<String> {
    use farm::model::build::qemu::{MachineSpec, QemuVm, ResolvedAccel};
    use farm::model::values::Arch;
    QemuVm {
        name: "hv".into(),
        hw: MachineSpec {
            arch: Arch::X86_64,
            machine: None,
            cpu: None,
            accel: ResolvedAccel::Tcg,
            memory_mib: 2048,
            cpus: 2,
        },
        disks: Vec::new(),
        boot: None,
        uefi_vars: None,
        nics: Vec::new(),
        serial_log: "serial.log".into(),
        qmp_socket: None,
        pidfile: None,
        daemonize: false,
        tag: None,
        incoming: false,
        display: false,
    }
    .argv()
}

/// Removes the directories of lab `name` other than `keep` (stopping what still runs there).
fn remove_other_recipes(name: &str, keep: &std::path::Path) {
    let prefix = format!("{name}-");
    for dir_name in project::list(&labs_dir()) {
        let dir = labs_dir().join(&dir_name);
        if !dir_name.starts_with(&prefix) || dir == keep || !dir.is_dir() {
            continue;
        }
        let _ = std::process::Command::new(env!("CARGO_BIN_EXE_farm"))
            .args(["down", "--timeout", "0"])
            .current_dir(&dir)
            .env("FARM_STORE", shared_store())
            .output();
        let _ = fs_err::remove_dir_all(&dir);
    }
}

fn write_files(project: &Project, recipe: &LabRecipe) {
    for (path, bytes) in &recipe.files {
        let at = project.path().join(path);
        if let Some(parent) = at.parent() {
            fs_err::create_dir_all(parent).unwrap();
        }
        fs_err::write(at, bytes).unwrap();
    }
}

fn first_line(out: &Output) -> String {
    let said = text(out);
    said.lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with("status:") && !l.starts_with("std"))
        .unwrap_or_default()
        .to_string()
}
