//! `farm status`: every VM, as a tree under the hosts it runs on.

use std::collections::BTreeMap;

use clap::Args;

use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions};
use crate::run::status::{VmStatus, status};

use super::lab::StateArgs;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

pub fn run(options: &ProjectOptions, args: StatusArgs, reporter: &Reporter) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let rows = status(&project, &args.state.dir(&project), reporter)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table(&project, &rows));
    }
    Ok(())
}

/// The table `up` and `status` print: a tree, each host on a line of its own, then its VMs
/// (and the VMs inside those, indented), in aligned columns.
pub fn table(project: &Project, rows: &[VmStatus]) -> String {
    let headings: BTreeMap<&str, String> = project
        .loaded
        .topology
        .hosts
        .values()
        .map(|h| {
            let label = match &h.remote {
                Some(remote) => format!("{} ({})", h.name, remote.address),
                None => format!("{} (this machine)", h.name),
            };
            (h.name.as_str(), label)
        })
        .collect();
    let header = ["NAME", "PLATFORM", "ADDRESS", "STATE", "ACCEL", "SSH"];
    let mut cells: Vec<[String; 6]> = Vec::new();
    let mut host = None;
    for r in rows {
        if r.level == 1 && host != Some(&r.host) {
            host = Some(&r.host);
            let label = headings
                .get(r.host.as_str())
                .cloned()
                .unwrap_or_else(|| format!("{} (this machine)", r.host));
            cells.push([
                label,
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        cells.push([
            format!("{}{}", "  ".repeat(r.level as usize), r.name),
            r.platform.clone(),
            r.address.clone().unwrap_or_else(|| "-".into()),
            r.state.to_string(),
            r.accel.clone().unwrap_or_else(|| "-".into()),
            r.ssh.clone(),
        ]);
    }
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
