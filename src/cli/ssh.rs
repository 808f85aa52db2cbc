//! `farm ssh`, `farm logs`, `farm inventory`: reaching the lab's VMs.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use clap::Args;

use crate::project::{Project, ProjectOptions};
use crate::run::orchestrator::state_dir_for;
use crate::run::state::StateDir;

use super::up::StateArgs;

#[derive(Debug, Args)]
pub struct SshArgs {
    /// The VM.
    pub name: String,
    /// A command to run instead of a login shell (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The VM.
    pub name: String,
    /// Keep printing what the console writes.
    #[arg(short, long)]
    pub follow: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
pub struct InventoryArgs {
    #[command(flatten)]
    pub state: StateArgs,
}

fn known_vm(project: &Project, name: &str) -> anyhow::Result<()> {
    if project.loaded.topology.vms.contains_key(name) {
        return Ok(());
    }
    Err(super::UsageError {
        message: format!(
            "`{name}` is not a VM of `{}`",
            project.config_path.display()
        ),
        hint: format!(
            "VMs: {}",
            crate::model::diagnostic::list_names(project.loaded.topology.vms.keys())
        ),
    }
    .into())
}

/// Replaces farm with `ssh -F .farm/ssh_config NAME [CMD…]`: an interactive shell, exit
/// status and signals behave exactly as plain ssh's.
pub fn run_ssh(options: &ProjectOptions, args: SshArgs) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    known_vm(&project, &args.name)?;
    let state = state_dir_for(&project, args.state.state.as_deref());
    let config = state.join("ssh_config");
    if !state.join("vms").join(&args.name).is_dir() {
        anyhow::bail!(
            "VM `{}` is not up\nhint: `farm up {}` starts it",
            args.name,
            args.name
        );
    }
    let err = Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .arg(&args.name)
        .args(&args.command)
        .exec();
    Err(anyhow::anyhow!(
        "Cannot run `ssh`: {err}\nhint: apt-get install openssh-client"
    ))
}

pub fn run_logs(options: &ProjectOptions, args: LogsArgs) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    known_vm(&project, &args.name)?;
    let state = state_dir_for(&project, args.state.state.as_deref());
    let path = state.join("vms").join(&args.name).join("serial.log");
    let mut file = fs_err::File::open(&path).map_err(|e| {
        anyhow::anyhow!(
            "{e}\nhint: the VM has not been started; `farm up {}`",
            args.name
        )
    })?;
    let mut stdout = std::io::stdout();
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    stdout.write_all(&buf)?;
    if !args.follow {
        return Ok(());
    }
    let mut pos = file.stream_position()?;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let len = fs_err::metadata(&path)?.len();
        if len < pos {
            pos = 0; // the VM restarted: its console log was truncated
        }
        if len > pos {
            file.seek(SeekFrom::Start(pos))?;
            buf.clear();
            file.read_to_end(&mut buf)?;
            stdout.write_all(&buf)?;
            stdout.flush()?;
            pos += buf.len() as u64;
        }
    }
}

/// An Ansible inventory (YAML) whose hosts are the VMs, reached through farm's ssh_config.
pub fn run_inventory(options: &ProjectOptions, args: InventoryArgs) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let state = StateDir::open(&state_dir_for(&project, args.state.state.as_deref()))?;
    let mut out = String::from("all:\n  vars:\n");
    out.push_str(&format!(
        "    ansible_ssh_common_args: \"-F {}\"\n    ansible_user: root\n  hosts:\n",
        state.ssh_config().display()
    ));
    for vm in project.loaded.topology.vms.values() {
        out.push_str(&format!("    {}:\n", vm.name));
    }
    print!("{out}");
    Ok(())
}
