//! A platform's playbook step: `ansible-playbook` run from this machine against the build
//! VM, through the build VM's own ssh_config (host key pinned and checked).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::context::{BuilderError, LayerBuild, Log};
use crate::model::shell::quote_path;

/// `ansible-playbook`: `FARM_ANSIBLE_PLAYBOOK`, or found on PATH.
pub(super) fn ansible_playbook(build: &LayerBuild) -> Result<PathBuf, BuilderError> {
    crate::sys::ansible::ansible_playbook().ok_or_else(|| BuilderError::NoAnsible {
        platform: build.name.to_string(),
    })
}

/// Runs `ansible-playbook` here against the build VM, through its own ssh_config (host key
/// pinned, checked).
pub(super) fn run_playbook(
    build: &LayerBuild,
    label: &str,
    playbook: &Path,
    log: &mut Log,
) -> Result<(), BuilderError> {
    let program = ansible_playbook(build)?;
    let work = build.staging.dir().join("build");
    let inventory = work.join("inventory.yml");
    // Ansible names its ControlMaster socket by host, port and user alone, and every build
    // VM is `farm-build` as root: two builds side by side would share one master, and one
    // build's modules would run in the other's VM. Each build's socket gets its own name.
    let control_path = format!(
        "%(directory)s/farm-build-{}",
        &blake3::hash(work.as_os_str().as_encoded_bytes()).to_hex()[..16]
    );
    fs_err::write(
        &inventory,
        format!(
            "all:\n  hosts:\n    farm-build:\n      ansible_user: root\n      ansible_ssh_common_args: {}\n      ansible_control_path: {}\n",
            serde_json::Value::String(format!("-F {}", quote_path(&work.join("ssh_config")))),
            serde_json::Value::String(control_path),
        ),
    )?;
    let playbook = std::path::absolute(playbook)?;
    let started = Instant::now();
    log.line(&format!("== {label}"));
    let out = crate::sys::ansible::playbook_command(&program, &inventory, &playbook).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    log.raw(&text);
    log.line(&format!(
        "== {label} finished in {:.1} s with {}",
        started.elapsed().as_secs_f64(),
        out.status
    ));
    if out.status.success() {
        return Ok(());
    }
    Err(BuilderError::StepFailed {
        platform: build.name.to_string(),
        step: label.to_string(),
        status: out
            .status
            .code()
            .map_or_else(|| "unknown (killed by a signal)".into(), |c| c.to_string()),
        tail: crate::model::text::last_lines(&text, 15),
        log: build.log.to_path_buf(),
    })
}
