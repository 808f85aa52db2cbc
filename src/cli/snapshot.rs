//! `farm snapshot save|restore|ls|rm`: whole-lab snapshots (see `run::snapshot`).

use clap::{Args, Subcommand};

use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions};
use crate::run::snapshot;

use super::lab::StateArgs;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save the running lab (every VM of this machine, or those named, with the VMs inside
    /// them): memory, devices and disks; it runs on from the snapshot unless --stop.
    Save(SaveArgs),
    /// Stop the snapshot's VMs and start them from it; waits until every VM answers ssh.
    Restore(RestoreArgs),
    /// List the snapshots: name, when, VMs, size.
    Ls(StateOnly),
    /// Remove a snapshot.
    Rm(NameArgs),
}

#[derive(Debug, Args)]
pub struct SaveArgs {
    /// The snapshot's name: letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// Top-level VMs to save, with the VMs inside them (default: all of this machine's).
    pub vms: Vec<String>,
    /// Leave the lab stopped after saving it.
    #[arg(long)]
    pub stop: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// The snapshot's name, as `farm snapshot ls` lists it.
    pub name: String,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot's name, as `farm snapshot ls` lists it.
    pub name: String,
    /// Print which VMs would stop and which saved disks and states would be loaded on
    /// which host; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
pub struct StateOnly {
    #[command(flatten)]
    pub state: StateArgs,
}

pub fn run(
    options: &ProjectOptions,
    command: SnapshotCommand,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    match command {
        SnapshotCommand::Save(args) => {
            snapshot::save(
                &project,
                &args.state.dir(&project),
                &args.name,
                &args.vms,
                args.stop,
                reporter,
            )?;
        }
        SnapshotCommand::Restore(args) if args.dry_run => {
            let plan = snapshot::plan_restore(&project, &args.state.dir(&project), &args.name)?;
            print!("{}", plan.render());
        }
        SnapshotCommand::Restore(args) => {
            snapshot::restore(&project, &args.state.dir(&project), &args.name, reporter)?;
        }
        SnapshotCommand::Ls(args) => {
            let found = snapshot::list(&args.state.dir(&project));
            println!("{:<20} {:>12} {:>10}  VMS", "NAME", "SAVED", "SIZE");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            for m in found {
                let size: u64 = m.vms.iter().map(|v| v.disk_bytes + v.state_bytes).sum();
                // A VM saved on a remote host says where its entry is.
                let mut vms: Vec<String> = m
                    .vms
                    .iter()
                    .map(|v| match &v.host {
                        Some(host) => format!("{} (on {host})", v.name),
                        None => v.name.clone(),
                    })
                    .collect();
                vms.extend(m.inside.iter().cloned());
                println!(
                    "{:<20} {:>12} {:>10}  {}",
                    m.name,
                    age(now.saturating_sub(m.created)),
                    crate::model::text::human_bytes(size),
                    vms.join(", ")
                );
            }
        }
        SnapshotCommand::Rm(args) => {
            snapshot::remove(&project, &args.state.dir(&project), &args.name)?;
            reporter.status("removed", format!("snapshot {}", args.name));
        }
    }
    Ok(())
}

/// `seconds` ago, as people say it.
fn age(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86400 => format!("{} h ago", seconds / 3600),
        _ => format!("{} d ago", seconds / 86400),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(super::age(5), "5 s ago");
        assert_eq!(super::age(125), "2 min ago");
        assert_eq!(super::age(7300), "2 h ago");
        assert_eq!(super::age(3 * 86400 + 5), "3 d ago");
    }
}
