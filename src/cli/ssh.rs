//! `farm ssh` and `farm inventory`: reaching the lab's VMs through the generated
//! ssh_config. They only read.

use std::os::unix::process::CommandExt;
use std::process::Command;

use clap::Args;

use crate::project::{Project, ProjectOptions};
use crate::run::state::StatePaths;

use super::lab::{StateArgs, check_vm_names};

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
    /// How to print it: a static YAML or INI inventory, or JSON as `--list` prints it.
    #[arg(long, value_enum, default_value = "yaml")]
    pub format: InventoryFormat,
    /// Ansible's dynamic inventory protocol: every group and host as JSON
    /// (`ansible -i inventory.sh`, where the script runs `farm inventory "$@"`).
    #[arg(long, conflicts_with_all = ["host", "format"])]
    pub list: bool,
    /// Ansible's dynamic inventory protocol: one host's variables as JSON.
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
    /// List every VM farm.toml declares, not only those brought up.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InventoryFormat {
    Yaml,
    Ini,
    Json,
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

/// An Ansible inventory whose hosts are the VMs, reached through farm's ssh_config (see
/// `model::inventory` for its groups and variables).
///
/// Which VMs are up comes from their instance records, without reaching any site: a VM
/// `farm up` brought up and no `farm down` took down is listed; `--all` lists the rest as
/// `missing` (or `stopped`, after `farm down --keep`).
pub fn run_inventory(options: &ProjectOptions, args: InventoryArgs) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let state = StatePaths::new(&args.state.dir(&project));
    let inventory = crate::run::provision::lab_inventory(&project, &state, args.all);
    let text = if let Some(host) = &args.host {
        format!("{:#}", inventory.host_json(host))
    } else if args.list {
        format!("{:#}", inventory.to_json())
    } else {
        match args.format {
            InventoryFormat::Yaml => inventory.to_yaml(),
            InventoryFormat::Ini => inventory.to_ini(),
            InventoryFormat::Json => format!("{:#}", inventory.to_json()),
        }
    };
    println!("{}", text.trim_end());
    Ok(())
}
