//! `farm up`: build what is missing, then bring the lab to what farm.toml says.

use std::time::Duration;

use clap::Args;

use crate::build::realise::RealiseOptions;
use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions};
use crate::run::lab::UpOptions;
use crate::run::up::{UpOutcome, up};

use super::build::{AccelArg, FetchArgs, default_jobs};
use super::lab::{StateArgs, check_vm_names};
use super::status::table;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// VMs to bring up [default: all], with every hypervisor above them.
    pub names: Vec<String>,
    /// Print the plan (what is built, pushed, started, restarted or replaced, and why) and
    /// change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Accelerator, overriding every target's `accel`.
    #[arg(long, env = "FARM_ACCEL", value_enum)]
    pub accel: Option<AccelArg>,
    /// Seconds a VM may take to answer ssh.
    #[arg(long, env = "FARM_BOOT_TIMEOUT", default_value_t = crate::build::realise::DEFAULT_BOOT_TIMEOUT_SECS)]
    pub boot_timeout: u64,
    /// Seconds a VM that restarts may take to power off before qemu is told to quit.
    #[arg(long, default_value_t = 60)]
    pub stop_timeout: u64,
    /// How many derivations to build at once [default: what cores and memory allow].
    #[arg(short, long, env = "FARM_JOBS")]
    pub jobs: Option<usize>,
    #[command(flatten)]
    pub fetch: FetchArgs,
    #[command(flatten)]
    pub caches: super::build::SubstituteArgs,
    /// Start the lab from this snapshot (`farm snapshot restore NAME`) instead of booting it;
    /// VMs the snapshot does not hold come up as usual.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["names", "dry_run"])]
    pub snapshot: Option<String>,
    /// Boot the lab even where its converged snapshot (`[lab] converged_snapshot`) could
    /// start it; the snapshot is saved again afterwards.
    #[arg(long, conflicts_with = "snapshot")]
    pub boot: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

pub fn run(options: &ProjectOptions, args: UpArgs, reporter: &Reporter) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    if let Some(name) = &args.snapshot {
        let restored =
            crate::run::snapshot::restore(&project, &args.state.dir(&project), name, reporter)?;
        // A snapshot of some VMs: the others come up as farm.toml says.
        let saved: Vec<&String> = restored
            .vms
            .iter()
            .map(|v| &v.name)
            .chain(&restored.inside)
            .collect();
        if project
            .loaded
            .topology
            .vms
            .keys()
            .all(|vm| saved.contains(&vm))
        {
            return Ok(());
        }
    }
    check_vm_names(&project, &args.names)?;
    let up_options = UpOptions {
        names: args.names,
        dry_run: args.dry_run,
        realise: RealiseOptions {
            accel: args.accel.map(Into::into),
            boot_timeout: Duration::from_secs(args.boot_timeout),
            jobs: args.jobs.unwrap_or_else(default_jobs),
            fetch_attempts: args.fetch.fetch_attempts,
            fetch_timeout: args.fetch.timeout(),
            substitution: None,
            step_checkpoints: true,
        },
        caches: args.caches.choice()?,
        stop_timeout: Duration::from_secs(args.stop_timeout),
        boot: args.boot,
    };
    match up(&project, &args.state.dir(&project), &up_options, reporter)? {
        UpOutcome::Up(rows) => print!("{}", table(&project, &rows)),
        planned => {
            print!("{}", planned.render_plan());
            if let Some(refusal) = planned.refusal() {
                return Err(refusal.into());
            }
        }
    }
    Ok(())
}
