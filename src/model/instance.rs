//! Instances: what `farm up` wants running against what is running, as a plan.
//!
//! Pure: the orchestrator observes (pidfiles, instance records) and applies; this decides.
//! A VM whose derivation did not change and whose qemu runs is left alone; a VM that died
//! is restarted on its existing overlay; a VM whose platform changed is replaced (its
//! overlay belongs to the old layer).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::hash::DrvHash;

/// A VM as farm.toml wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredVm {
    pub name: String,
    pub drv_hash: DrvHash,
    /// Parents first: the level of nesting (1 = on a host).
    pub level: u32,
}

/// A VM as found in the state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedVm {
    pub name: String,
    /// The derivation its overlay was made from.
    pub drv_hash: DrvHash,
    pub running: bool,
}

/// A VM's state for `farm status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Running the derivation farm.toml asks for.
    Running,
    /// Has an overlay, but its qemu is not running.
    Stopped,
    /// Never started, or taken down.
    Missing,
    /// Running or stopped, but farm.toml now asks for another derivation.
    Changed,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Stopped => "stopped",
            VmState::Missing => "missing",
            VmState::Changed => "changed",
        })
    }
}

pub fn state_of(desired: &DesiredVm, observed: Option<&ObservedVm>) -> VmState {
    match observed {
        None => VmState::Missing,
        Some(o) if o.drv_hash != desired.drv_hash => VmState::Changed,
        Some(o) if o.running => VmState::Running,
        Some(_) => VmState::Stopped,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpAction {
    /// Running as wanted: nothing to do.
    Keep,
    /// No instance: make an overlay and a seed, start it.
    Create,
    /// The overlay exists but qemu does not run: start it again.
    Restart,
    /// The platform changed: stop it if running, remove its overlay, create it anew.
    Replace,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpStep {
    pub name: String,
    pub level: u32,
    pub action: UpAction,
}

/// `farm up`'s plan: one step per desired VM, parents (lower levels) first.
pub fn plan_up(desired: &[DesiredVm], observed: &[ObservedVm]) -> Vec<UpStep> {
    let mut steps: Vec<UpStep> = desired
        .iter()
        .map(|d| {
            let o = observed.iter().find(|o| o.name == d.name);
            let action = match state_of(d, o) {
                VmState::Running => UpAction::Keep,
                VmState::Stopped => UpAction::Restart,
                VmState::Missing => UpAction::Create,
                VmState::Changed => UpAction::Replace,
            };
            UpStep {
                name: d.name.clone(),
                level: d.level,
                action,
            }
        })
        .collect();
    steps.sort_by(|a, b| (a.level, &a.name).cmp(&(b.level, &b.name)));
    steps
}

/// `farm down`'s order: the deepest VMs first, so no hypervisor stops under its guests.
pub fn down_order(mut vms: Vec<(String, u32)>) -> Vec<String> {
    vms.sort_by(|a, b| (std::cmp::Reverse(a.1), &a.0).cmp(&(std::cmp::Reverse(b.1), &b.0)));
    vms.into_iter().map(|(name, _)| name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(name: &str, h: u8, level: u32) -> DesiredVm {
        DesiredVm {
            name: name.into(),
            drv_hash: DrvHash([h; 32]),
            level,
        }
    }

    fn o(name: &str, h: u8, running: bool) -> ObservedVm {
        ObservedVm {
            name: name.into(),
            drv_hash: DrvHash([h; 32]),
            running,
        }
    }

    #[test]
    fn plan_keeps_restarts_creates_and_replaces_parents_first() {
        let desired = [
            d("l2", 1, 2),
            d("keep", 1, 1),
            d("dead", 2, 1),
            d("new", 3, 1),
            d("moved", 4, 1),
        ];
        let observed = [
            o("keep", 1, true),
            o("dead", 2, false),
            o("moved", 9, true),
            o("gone", 5, true),
        ];
        let plan = plan_up(&desired, &observed);
        let got: Vec<(&str, &UpAction)> =
            plan.iter().map(|s| (s.name.as_str(), &s.action)).collect();
        assert_eq!(
            got,
            [
                ("dead", &UpAction::Restart),
                ("keep", &UpAction::Keep),
                ("moved", &UpAction::Replace),
                ("new", &UpAction::Create),
                ("l2", &UpAction::Create),
            ]
        );
    }

    #[test]
    fn states_follow_observation() {
        let want = d("a", 1, 1);
        assert_eq!(state_of(&want, None), VmState::Missing);
        assert_eq!(state_of(&want, Some(&o("a", 1, true))), VmState::Running);
        assert_eq!(state_of(&want, Some(&o("a", 1, false))), VmState::Stopped);
        assert_eq!(state_of(&want, Some(&o("a", 2, true))), VmState::Changed);
    }

    #[test]
    fn down_goes_deepest_first() {
        let order = down_order(vec![
            ("l1".into(), 1),
            ("l3".into(), 3),
            ("l2b".into(), 2),
            ("l2a".into(), 2),
        ]);
        assert_eq!(order, ["l3", "l2a", "l2b", "l1"]);
    }
}
