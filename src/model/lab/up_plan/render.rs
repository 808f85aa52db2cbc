//! The plan as people read it: per site, what is checked, pushed, started, and each VM's
//! action with its reasons.

use std::fmt::{self, Write};

use super::{Basis, SitePlan, UpPlan, VmAction};
use crate::model::config::topology::Placement;

impl UpPlan {
    /// Every step, kept VMs included (`farm up --dry-run`).
    pub fn render(&self) -> String {
        self.lines(true)
    }

    /// What changes, and how many VMs stay as they are: printed before `farm up` acts.
    pub fn summary(&self) -> String {
        self.lines(false)
    }

    fn lines(&self, with_keeps: bool) -> String {
        let mut out = String::new();
        for site in &self.sites {
            if !with_keeps && !site.changes() && site.problems.is_empty() {
                continue;
            }
            let _ = writeln!(out, "{}", heading(site));
            for entry in &site.push {
                let _ = writeln!(out, "  {:<8} {entry}", "push");
            }
            for step in &site.networks {
                let mut what = Vec::new();
                if step.start_switch {
                    what.push("start vde_switch".to_string());
                }
                if let Some(address) = step.network.attach.filter(|_| step.start_tap) {
                    what.push(format!("start tap {address}"));
                }
                if what.is_empty() {
                    if !with_keeps {
                        continue;
                    }
                    what.push("running".into());
                }
                let _ = writeln!(
                    out,
                    "  {:<8} {}: {}",
                    "network",
                    step.network.name,
                    what.join(", ")
                );
            }
            let width = site.vms.iter().map(|v| v.name.len()).max().unwrap_or(0);
            let mut kept = 0;
            for vm in &site.vms {
                if vm.action == VmAction::Keep && !with_keeps {
                    kept += 1;
                    continue;
                }
                let reasons: Vec<String> = vm.reasons.iter().map(ToString::to_string).collect();
                let line = format!(
                    "  {:<8} {:<width$}  {}",
                    vm.action.verb(),
                    vm.name,
                    reasons.join("; ")
                );
                let _ = writeln!(out, "{}", line.trim_end());
            }
            if kept > 0 {
                let _ = writeln!(out, "  {:<8} {kept} VM(s) as they are", "keep");
            }
            for warning in &site.warnings {
                let _ = writeln!(out, "  warning: {warning}");
            }
            for problem in &site.problems {
                let _ = writeln!(out, "  problem: {problem}");
            }
        }
        out
    }
}

fn heading(site: &SitePlan) -> String {
    let name = match &site.placement {
        Placement::Host(name) if !site.layout.remote => format!("{name} (this machine)"),
        Placement::Host(name) => format!("host {name}"),
        Placement::Vm(vm) => format!("inside VM {vm}"),
    };
    let note = match (&site.basis, &site.placement) {
        (Basis::Observed, _) => String::new(),
        (Basis::Fresh | Basis::AfterRestart, Placement::Vm(vm)) => {
            format!(" (planned again once {vm} is up)")
        }
        (Basis::Unreachable, Placement::Vm(vm)) => {
            format!(" ({vm} runs, but farm cannot log in to look)")
        }
        _ => String::new(),
    };
    format!("{name}{note}:")
}

impl fmt::Display for UpPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}
