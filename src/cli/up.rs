//! `farm up`, `farm down`, `farm status`: the lab's lifecycle.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::build::realise::RealiseOptions;
use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions};
use crate::run::orchestrator::{UpOptions, VmStatus, down, state_dir_for, status, up};

use super::build::{AccelArg, open_store};

#[derive(Debug, Args)]
pub struct StateArgs {
    /// The state directory for instances, keys and ssh_config [default: `.farm/` beside
    /// farm.toml].
    #[arg(long, env = "FARM_STATE")]
    pub state: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// VMs to bring up [default: all].
    pub names: Vec<String>,
    /// Print what would be built, started, restarted or replaced, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Accelerator, overriding every target's `accel`.
    #[arg(long, env = "FARM_ACCEL", value_enum)]
    pub accel: Option<AccelArg>,
    /// Seconds a VM may take to answer ssh.
    #[arg(long, env = "FARM_BOOT_TIMEOUT", default_value_t = crate::build::realise::DEFAULT_BOOT_TIMEOUT_SECS)]
    pub boot_timeout: u64,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// VMs to stop [default: all], deepest first.
    pub names: Vec<String>,
    /// Keep the overlays (the VMs' disks): the next `farm up` restarts them as they were.
    #[arg(long)]
    pub keep: bool,
    /// Seconds to wait for a clean power-off before killing qemu.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

fn check_names(project: &Project, names: &[String]) -> anyhow::Result<()> {
    for name in names {
        if !project.loaded.topology.vms.contains_key(name) {
            return Err(super::UsageError {
                message: format!(
                    "`{name}` is not a VM of `{}`",
                    project.config_path.display()
                ),
                hint: format!(
                    "VMs: {}",
                    crate::model::diagnostic::list_names(project.loaded.topology.vms.keys())
                ),
            }
            .into());
        }
    }
    Ok(())
}

pub fn run_up(options: &ProjectOptions, args: UpArgs, reporter: &Reporter) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    check_names(&project, &args.names)?;
    let store = open_store(&project)?;
    let state = state_dir_for(&project, args.state.state.as_deref());
    let up_options = UpOptions {
        names: args.names,
        dry_run: args.dry_run,
        realise: RealiseOptions {
            accel: args.accel.map(Into::into),
            boot_timeout: Duration::from_secs(args.boot_timeout),
            ..RealiseOptions::default()
        },
    };
    let rows = up(&project, &store, &state, &up_options, reporter)?;
    if !args.dry_run {
        print!("{}", table(&rows));
    }
    Ok(())
}

pub fn run_down(
    options: &ProjectOptions,
    args: DownArgs,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    check_names(&project, &args.names)?;
    let state = state_dir_for(&project, args.state.state.as_deref());
    let stopped = down(
        &project,
        &state,
        &args.names,
        args.keep,
        Duration::from_secs(args.timeout),
        reporter,
    )?;
    if stopped.is_empty() {
        reporter.line(format!("{:>12} no VM was running", "done"));
    }
    Ok(())
}

pub fn run_status(options: &ProjectOptions, args: StatusArgs) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let state = state_dir_for(&project, args.state.state.as_deref());
    let rows = status(&project, &state, &Reporter::new(false))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table(&rows));
    }
    Ok(())
}

/// The table `up` and `status` print: aligned columns, one VM a row, indented by level.
pub fn table(rows: &[VmStatus]) -> String {
    let header = ["NAME", "HOST", "PLATFORM", "ADDRESS", "STATE", "SSH"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                format!(
                    "{}{}",
                    "  ".repeat(r.level.saturating_sub(1) as usize),
                    r.name
                ),
                r.host.clone(),
                r.platform.clone(),
                r.address.clone().unwrap_or_else(|| "-".into()),
                r.state.to_string(),
                r.ssh.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |row: [&str; 6]| {
        let mut s = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header);
    for row in &cells {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out
}
