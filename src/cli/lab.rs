//! What the lab's subcommands (`up`, `down`, `status`, `ssh`, `logs`, `snapshot`) share: the
//! `--state` flag and the check that the VMs named are the project's. A leaf of `cli/`:
//! those files import it, it imports none of them.

use std::path::PathBuf;

use clap::Args;

use crate::model::config::diagnostic::list_names;
use crate::project::{Project, UsageError};
use crate::run::lab::state_dir_for;

#[derive(Debug, Args)]
pub struct StateArgs {
    /// The state directory for instances, keys and ssh_config [default: `.farm/` beside
    /// farm.toml].
    #[arg(long, env = "FARM_STATE")]
    pub state: Option<PathBuf>,
}

impl StateArgs {
    pub fn dir(&self, project: &Project) -> PathBuf {
        state_dir_for(project, self.state.as_deref())
    }
}

/// Fails with a usage error (exit 2) for a name that is not a VM of the project.
pub fn check_vm_names(project: &Project, names: &[String]) -> anyhow::Result<()> {
    for name in names {
        if !project.loaded.topology.vms.contains_key(name) {
            return Err(UsageError {
                message: format!(
                    "`{name}` is not a VM of `{}`",
                    project.config_path.display()
                ),
                hint: format!("VMs: {}", list_names(project.loaded.topology.vms.keys())),
            }
            .into());
        }
    }
    Ok(())
}
