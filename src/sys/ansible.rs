//! `ansible-playbook`, as both of farm's playbook runners call it (a platform's build step,
//! a VM's provisioning in `farm up`): host keys checked, no colours, no retry files, run
//! from the playbook's directory so its relative paths and `roles/` resolve, and modules
//! piped to the guest's python (pipelining) unless `ANSIBLE_PIPELINING` says otherwise:
//! without it each task also makes a temporary directory, copies the module over sftp and
//! removes it, round trips that cost most of a second each through a jump chain into TCG
//! guests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `ansible-playbook`: `FARM_ANSIBLE_PLAYBOOK`, or found on PATH.
pub fn ansible_playbook() -> Option<PathBuf> {
    std::env::var_os("FARM_ANSIBLE_PLAYBOOK")
        .map(PathBuf::from)
        .or_else(|| crate::sys::programs::find_program("ansible-playbook"))
}

/// `program -i inventory playbook` (`playbook` absolute), ready for extra arguments.
pub fn playbook_command(program: &Path, inventory: &Path, playbook: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .arg("-i")
        .arg(inventory)
        .arg(playbook)
        .current_dir(playbook.parent().unwrap_or(Path::new("/")))
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
        .stdin(std::process::Stdio::null());
    if std::env::var_os("ANSIBLE_PIPELINING").is_none() {
        command.env("ANSIBLE_PIPELINING", "True");
    }
    command
}
