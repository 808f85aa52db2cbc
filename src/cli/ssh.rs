//! `farm ssh` and `farm inventory`: reaching the lab's VMs through the generated
//! ssh_config. They only read.

use std::os::unix::process::CommandExt;
use std::process::Command;

use clap::Args;

use crate::project::{Project, ProjectOptions};
use crate::run::state::StatePaths;

use super::status::check_vm_names;
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
pub struct InventoryArgs {
    #[command(flatten)]
    pub state: StateArgs,
}

/// Replaces farm with `ssh -F .farm/ssh_config NAME [CMD…]`: an interactive shell, exit
/// status and signals behave exactly as plain ssh's.
pub fn run_ssh(options: &ProjectOptions, args: SshArgs) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    check_vm_names(&project, std::slice::from_ref(&args.name))?;
    let state = StatePaths::new(&args.state.dir(&project));
    if !state.instance(&args.name).dir.is_dir() {
        anyhow::bail!(
            "VM `{}` is not up\nhint: `farm up {}` starts it",
            args.name,
            args.name
        );
    }
    let err = Command::new("ssh")
        .arg("-F")
        .arg(state.ssh_config())
        .arg(&args.name)
        .args(&args.command)
        .exec();
    Err(anyhow::anyhow!(
        "Cannot run `ssh`: {err}\nhint: apt-get install openssh-client"
    ))
}

/// An Ansible inventory (YAML) whose hosts are the VMs, reached through farm's ssh_config.
pub fn run_inventory(options: &ProjectOptions, args: InventoryArgs) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let state = StatePaths::new(&args.state.dir(&project));
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
