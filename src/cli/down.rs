//! `farm down`: stop VMs, deepest first.

use std::time::Duration;

use clap::Args;

use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions};
use crate::run::down::{DownOutcome, down};

use super::lab::{StateArgs, check_vm_names};

#[derive(Debug, Args)]
pub struct DownArgs {
    /// VMs to stop [default: all], with every VM inside them, deepest first.
    pub names: Vec<String>,
    /// Keep the overlays (the VMs' disks): the next `farm up` restarts them as they were.
    #[arg(long)]
    pub keep: bool,
    /// Seconds to wait for a clean power-off before qemu is told to quit (then killed).
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Print what would stop, on which site and in what order; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

pub fn run(options: &ProjectOptions, args: DownArgs, reporter: &Reporter) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    check_vm_names(&project, &args.names)?;
    let outcome = down(
        &project,
        &args.state.dir(&project),
        &args.names,
        args.keep,
        Duration::from_secs(args.timeout),
        args.dry_run,
        reporter,
    )?;
    match outcome {
        DownOutcome::Planned(plan) => print!("{}", plan.render()),
        DownOutcome::Stopped(stopped) if stopped.is_empty() => {
            reporter.status("done", "no VM was running")
        }
        DownOutcome::Stopped(_) => {}
    }
    Ok(())
}
