//! `farm up`'s last phase: each VM's own playbook (`[vms.NAME] playbook = "…"`), applied
//! with `ansible-playbook` from this machine through the generated inventory and ssh_config
//! (host keys pinned and checked), once the whole lab answers, so a playbook may reach any
//! VM at any depth.
//!
//! Once: a marker in the VM's local state directory (`provisioned`) holds the content hash
//! the playbook succeeded with. A replaced VM has a new overlay and no marker; a changed
//! playbook (or its `roles/`) runs again, as `farm up` converges on farm.toml.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::model::hash::ContentHash;
use crate::model::lab::inventory::Inventory;
use crate::model::lab::provision::{ProvisionReason, marker_text, reason, succeeded_hosts};
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::state::StatePaths;
use crate::sys::ansible::{ansible_playbook, playbook_command};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(
        "VM `{vm}` names the playbook `{playbook}`, but `ansible-playbook` is not installed here\nhint: install ansible-core (`pip install ansible-core`, or Debian's `ansible-core`) or set FARM_ANSIBLE_PLAYBOOK to its path"
    )]
    NoAnsible { vm: String, playbook: PathBuf },
    #[error(
        "The playbook `{playbook}` failed on {}\n{tail}\nhint: the whole output is in `{log}`; fix the playbook and run `farm up` again (VMs it went through on are not provisioned twice)",
        failed.join(", ")
    )]
    Failed {
        playbook: PathBuf,
        failed: Vec<String>,
        tail: String,
        log: PathBuf,
    },
    #[error(
        "The playbook `{playbook}` succeeded, but what it wrote could not be flushed to disk on {}\nhint: `farm up` runs it again on them",
        vms.join("; ")
    )]
    Unflushed { playbook: PathBuf, vms: Vec<String> },
    #[error(transparent)]
    State(#[from] crate::run::state::StateError),
    #[error("Cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Cannot run `{program}`: {source}")]
    Run {
        program: PathBuf,
        source: std::io::Error,
    },
}

/// One VM whose playbook is due.
#[derive(Clone, Debug)]
pub struct Due {
    pub vm: String,
    pub playbook: PathBuf,
    pub hash: ContentHash,
    pub reason: ProvisionReason,
}

/// The playbook's content: the file and the `roles/` tree beside it.
pub(crate) fn content_hash(playbook: &Path) -> Result<ContentHash, ProvisionError> {
    let read = |source| ProvisionError::Read {
        path: playbook.to_path_buf(),
        source,
    };
    let mut hasher = blake3::Hasher::new();
    hasher.update(
        crate::project::inputs::hash_file(playbook)
            .map_err(read)?
            .to_string()
            .as_bytes(),
    );
    let roles = crate::model::build::derivation::roles_dir(playbook);
    if roles.is_dir() {
        let tree =
            crate::project::inputs::hash_tree(&roles).map_err(|source| ProvisionError::Read {
                path: roles.clone(),
                source,
            })?;
        hasher.update(tree.to_string().as_bytes());
    }
    Ok(ContentHash::from_blake3(hasher.finalize()))
}

fn marker(state: &StatePaths, vm: &str) -> PathBuf {
    state.instance(vm).dir.join("provisioned")
}

/// Forgets that `vm` was provisioned: its overlay is about to be new.
pub fn forget(state: &StatePaths, vm: &str) -> Result<(), ProvisionError> {
    let path = marker(state, vm);
    match fs_err::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(ProvisionError::Write { path, source: e })
        }
        _ => Ok(()),
    }
}

/// The VMs of `selected` whose playbook is due, in name order.
pub fn due(
    project: &Project,
    state: &StatePaths,
    selected: &BTreeSet<String>,
) -> Result<Vec<Due>, ProvisionError> {
    let mut due = Vec::new();
    for vm in project.loaded.topology.vms.values() {
        let Some(playbook) = vm.playbook.as_ref().filter(|_| selected.contains(&vm.name)) else {
            continue;
        };
        let hash = content_hash(playbook)?;
        let text = fs_err::read_to_string(marker(state, &vm.name)).ok();
        if let Some(reason) = reason(text.as_deref(), &hash) {
            due.push(Due {
                vm: vm.name.clone(),
                playbook: playbook.clone(),
                hash,
                reason,
            });
        }
    }
    Ok(due)
}

/// Refuses before anything runs when a playbook is due and Ansible is missing.
pub fn check_ansible(due: &[Due]) -> Result<(), ProvisionError> {
    match (due.first(), ansible_playbook()) {
        (Some(first), None) => Err(ProvisionError::NoAnsible {
            vm: first.vm.clone(),
            playbook: first.playbook.clone(),
        }),
        _ => Ok(()),
    }
}

/// The lab's inventory: the VMs whose record says they run (every declared one with `all`,
/// in its recorded state or `missing`), reached through the state's ssh_config.
pub fn lab_inventory(project: &Project, state: &StatePaths, all: bool) -> Inventory {
    let recorded = |vm: &str| -> Option<String> {
        let bytes = fs_err::read(state.instance(vm).record()).ok()?;
        let record = crate::model::lab::instance::InstanceRecord::parse(&bytes).ok()?;
        Some(if record.kept { "stopped" } else { "running" }.to_string())
    };
    let states = |vm: &str| match recorded(vm) {
        Some(state) if all || state == "running" => Some(state),
        None if all => Some("missing".to_string()),
        _ => None,
    };
    crate::model::lab::inventory::inventory(
        &project.loaded.topology,
        &states,
        &state.ssh_config().display().to_string(),
    )
}

/// Runs every due playbook (one `ansible-playbook` per playbook, limited to its VMs, which
/// Ansible serves in parallel) and marks the VMs it went through on.
pub fn apply(
    project: &Project,
    state: &StatePaths,
    due: &[Due],
    reporter: &Reporter,
) -> Result<(), ProvisionError> {
    if due.is_empty() {
        return Ok(());
    }
    check_ansible(due)?;
    let program = ansible_playbook().expect("checked above");
    let inventory_path = state.inventory();
    let write = |path: &Path, text: &str| {
        fs_err::write(path, text).map_err(|source| ProvisionError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    // Written again: VMs started since the lab's ssh files were last written are in it.
    state.write_inventory(&lab_inventory(project, state, false).to_yaml())?;
    let mut by_playbook: BTreeMap<&Path, Vec<&Due>> = BTreeMap::new();
    for d in due {
        by_playbook.entry(&d.playbook).or_default().push(d);
    }
    let log_path = state.root().join("provision.log");
    for (playbook, vms) in by_playbook {
        let names: Vec<&str> = vms.iter().map(|d| d.vm.as_str()).collect();
        for d in &vms {
            reporter.status(
                "playbook",
                format!("{} on {} ({})", playbook.display(), d.vm, d.reason),
            );
        }
        let spinner = reporter.spinner(&names.join(","), "ansible-playbook");
        let started = Instant::now();
        let playbook_abs =
            std::path::absolute(playbook).map_err(|source| ProvisionError::Read {
                path: playbook.to_path_buf(),
                source,
            })?;
        let out = playbook_command(&program, &inventory_path, &playbook_abs)
            .arg("--limit")
            .arg(names.join(","))
            .output()
            .map_err(|source| ProvisionError::Run {
                program: program.clone(),
                source,
            })?;
        spinner.finish_and_clear();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        append_log(&log_path, playbook, &names, &text, &out.status)?;
        let through: Vec<&Due> = {
            let succeeded = succeeded_hosts(&text);
            vms.iter()
                .filter(|d| out.status.success() || succeeded.contains(&d.vm))
                .copied()
                .collect()
        };
        // A VM is marked only once what the playbook wrote is on its disk: a crash of its
        // hypervisor right after (its page cache lost) must not leave it marked but
        // unprovisioned.
        let flushed = crate::run::parallel::each(through, |d| {
            (d, flush_disk(&state.own_ssh_config(), &d.vm))
        });
        let mut unflushed = Vec::new();
        for (d, result) in flushed {
            match result {
                Ok(()) => write(&marker(state, &d.vm), &marker_text(&d.hash))?,
                Err(why) => unflushed.push(format!("`{}`: {why}", d.vm)),
            }
        }
        let through = succeeded_hosts(&text);
        if !out.status.success() {
            return Err(ProvisionError::Failed {
                playbook: playbook.to_path_buf(),
                failed: names
                    .iter()
                    .filter(|n| !through.contains(**n))
                    .map(|n| format!("`{n}`"))
                    .collect(),
                tail: crate::model::text::last_lines(&text, 15),
                log: log_path,
            });
        }
        if !unflushed.is_empty() {
            return Err(ProvisionError::Unflushed {
                playbook: playbook.to_path_buf(),
                vms: unflushed,
            });
        }
        reporter.status(
            "provisioned",
            format!(
                "{} ({}, {:.0} s)",
                names.join(", "),
                playbook.display(),
                started.elapsed().as_secs_f64()
            ),
        );
    }
    Ok(())
}

/// `sync` in the VM, over ssh: its writes go to its disk, and through its qemu's flush to
/// the disk of whatever it runs on.
fn flush_disk(ssh_config: &Path, vm: &str) -> Result<(), String> {
    let out = std::process::Command::new("timeout")
        .arg("120")
        .arg("ssh")
        .arg("-F")
        .arg(ssh_config)
        .args(["-o", "BatchMode=yes", vm, "sync"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ssh: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`sync` over ssh failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn append_log(
    path: &Path,
    playbook: &Path,
    vms: &[&str],
    text: &str,
    status: &std::process::ExitStatus,
) -> Result<(), ProvisionError> {
    let failed = |source| ProvisionError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(failed)?;
    write!(
        file,
        "== ansible-playbook {} on {}\n{text}== {status}\n",
        playbook.display(),
        vms.join(", ")
    )
    .map_err(failed)
}
