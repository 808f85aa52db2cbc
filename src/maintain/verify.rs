//! `farm store verify [--repair [--dry-run]]`: checks every entry against what was recorded
//! when it was committed (`verify_store`) and, when asked, plans the repair
//! (`plan_repair`: what is set aside, what is built again), which is printed (`--dry-run`)
//! or carried out (`repair`: the entries moved aside, then built again).
//!
//! An entry backed by a damaged one is set aside with it: its disk holds only the blocks
//! that differ from its parent, so a parent rebuilt with other bytes (an `upgrade` is not
//! bit-reproducible) would make it a different disk.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::PathBuf;

use crate::build::realise::{BuildError, RealiseOptions, present_hashes, realise};
use crate::model::build::derivation::{DrvId, DrvNode};
use crate::model::build::plan::plan_build;
use crate::progress::Reporter;
use crate::project::Project;
use crate::store::{Entry, Finding, Store, StoreError, VerifyDepth};

/// What verify found in one entry.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub entry: Entry,
    pub findings: Vec<Finding>,
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub verdicts: Vec<Verdict>,
    /// Things in `store/` that are not entries at all (a stray file, unreadable metadata).
    pub strays: Vec<StoreError>,
    /// Entries written by an older farm, whose files other than the disk have no record.
    pub unrecorded: usize,
}

impl VerifyReport {
    pub fn damaged(&self) -> impl Iterator<Item = &Verdict> {
        self.verdicts.iter().filter(|v| !v.findings.is_empty())
    }

    pub fn is_clean(&self) -> bool {
        self.damaged().next().is_none() && self.strays.is_empty()
    }

    /// How `farm store verify` ends when nothing was repaired: fine for a clean store, else
    /// the error that sums up the damage; `hint` says how to go on.
    pub fn outcome(&self, store: &Store, hint: DamageHint) -> Result<(), VerifyError> {
        if self.is_clean() {
            return Ok(());
        }
        let damaged = self.damaged().count();
        let mut what = Vec::new();
        if damaged > 0 {
            what.push(format!(
                "{damaged} of {} entries are damaged",
                self.verdicts.len()
            ));
        }
        if !self.strays.is_empty() {
            what.push(strays_line(store, self.strays.len()));
        }
        let hint = match (damaged, hint) {
            (0, _) => "farm does not remove what it did not put in `store/`: move those items away",
            (_, DamageHint::Repair) => {
                "`farm store verify --repair` moves damaged entries aside and builds them again"
            }
            (_, DamageHint::DryRun) => {
                "`farm store verify --repair` without `--dry-run` does what is listed above"
            }
        };
        Err(VerifyError::Damaged {
            store: store.root().to_path_buf(),
            what,
            hint,
        })
    }
}

/// What the hint of a damaged store's error suggests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DamageHint {
    /// `--repair`.
    Repair,
    /// `--repair` without `--dry-run`: its plan was just shown.
    DryRun,
}

fn strays_line(store: &Store, count: usize) -> String {
    format!(
        "{count} item(s) in `{}` are not entries",
        store.root().join("store").display()
    )
}

/// What ends `farm store verify` in failure, after it has said what it found.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("The store `{}` is damaged: {}\nhint: {hint}", store.display(), what.join("; "))]
    Damaged {
        store: PathBuf,
        what: Vec<String>,
        hint: &'static str,
    },
    #[error(
        "The store `{}` is not whole again: {}\nhint: build them from the farm.toml that \
         describes them; farm never removes what it did not put in `store/`",
        store.display(),
        left.join("; ")
    )]
    NotWhole { store: PathBuf, left: Vec<String> },
}

/// Checks every entry, calling `each` as each is done (a store holds many gigabytes; the
/// user sees progress as it goes). The store is in shared use meanwhile: builds and labs
/// go on; gc waits rather than remove what is being read.
pub fn verify_store(
    store: &Store,
    depth: VerifyDepth,
    reporter: &Reporter,
    mut each: impl FnMut(&Verdict),
) -> Result<VerifyReport, StoreError> {
    let _use = store.use_shared(reporter)?;
    let (entries, strays) = store.scan()?;
    let mut report = VerifyReport {
        strays,
        ..Default::default()
    };
    for entry in entries {
        let findings = store.findings(&entry, depth)?;
        if entry.meta.meta_blake3.is_none() {
            report.unrecorded += 1;
        }
        let verdict = Verdict { entry, findings };
        each(&verdict);
        report.verdicts.push(verdict);
    }
    Ok(report)
}

/// Why an entry is set aside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AsideReason {
    /// These of its files are damaged.
    Damaged { files: Vec<String> },
    /// It backs onto this damaged (or itself set-aside) entry.
    BackedBy(String),
}

/// What `--repair` does: the entries it moves to `damaged/` in the store, and which of
/// them it builds again.
#[derive(Debug)]
pub struct RepairPlan {
    /// The damaged entries and every entry that backs onto one, parents first.
    pub aside: Vec<(Entry, AsideReason)>,
    /// The derivations of farm.toml whose entries are set aside: built again.
    pub rebuild: Vec<DrvNode>,
    /// Entries set aside that farm.toml does not describe (or with no farm.toml), so farm
    /// cannot build them again.
    pub not_rebuilt: Vec<String>,
}

impl RepairPlan {
    /// The plan as `--dry-run` prints it.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "repair, in this order (entries set aside go to `damaged/` in the store):\n",
        );
        for (entry, reason) in &self.aside {
            let why = match reason {
                AsideReason::Damaged { files } => format!("damaged: `{}`", files.join("`, `")),
                AsideReason::BackedBy(parent) => format!("it backs onto `{parent}`"),
            };
            let _ = writeln!(out, "  set aside {} ({why})", entry.dir_name());
        }
        for node in &self.rebuild {
            let _ = writeln!(out, "  build again {}", node.name);
        }
        for name in &self.not_rebuilt {
            let _ = writeln!(
                out,
                "  leave {name} set aside: not a derivation of this farm.toml, so not built again"
            );
        }
        out
    }
}

/// The repair of what `report` found damaged: every damaged entry and every entry that
/// backs onto one (its disk holds only the blocks that differ from its parent), parents
/// first; those `project` describes are built again.
pub fn plan_repair(report: &VerifyReport, project: Option<&Project>) -> RepairPlan {
    let mut chosen: BTreeMap<String, AsideReason> = report
        .damaged()
        .map(|v| {
            let files = v.findings.iter().map(|f| f.file.clone()).collect();
            (
                v.entry.dir_name().to_string(),
                AsideReason::Damaged { files },
            )
        })
        .collect();
    loop {
        let more: Vec<(String, String)> = report
            .verdicts
            .iter()
            .filter(|v| !chosen.contains_key(v.entry.dir_name()))
            .filter_map(|v| {
                let parent = v.entry.meta.parent.as_ref()?;
                chosen
                    .contains_key(parent)
                    .then(|| (v.entry.dir_name().to_string(), parent.clone()))
            })
            .collect();
        if more.is_empty() {
            break;
        }
        for (child, parent) in more {
            chosen.insert(child, AsideReason::BackedBy(parent));
        }
    }
    // Parents first: an entry is listed after the one it backs onto.
    let mut aside = Vec::new();
    let mut placed = BTreeSet::new();
    while aside.len() < chosen.len() {
        for verdict in &report.verdicts {
            let name = verdict.entry.dir_name();
            let Some(reason) = chosen.get(name) else {
                continue;
            };
            let parent_ready = match reason {
                AsideReason::BackedBy(parent) => placed.contains(parent.as_str()),
                AsideReason::Damaged { .. } => true,
            };
            if parent_ready && placed.insert(name) {
                aside.push((verdict.entry.clone(), reason.clone()));
            }
        }
    }
    let hashes: BTreeSet<_> = aside.iter().map(|(e, _)| e.meta.drv_hash).collect();
    let rebuild: Vec<DrvNode> = project
        .map(|p| {
            p.graph
                .nodes
                .values()
                .filter(|n| hashes.contains(&n.hash))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let known: BTreeSet<_> = rebuild.iter().map(|n| n.hash).collect();
    let not_rebuilt = aside
        .iter()
        .filter(|(e, _)| !known.contains(&e.meta.drv_hash))
        .map(|(e, _)| e.dir_name().to_string())
        .collect();
    RepairPlan {
        aside,
        rebuild,
        not_rebuilt,
    }
}

/// What `--repair` did.
#[derive(Debug, Default)]
pub struct RepairReport {
    /// Entry directory → where it was moved.
    pub set_aside: Vec<(String, PathBuf)>,
    /// Entries built again (store names).
    pub rebuilt: Vec<String>,
    /// Entries set aside that the current farm.toml does not describe, so farm cannot
    /// build them again.
    pub not_rebuilt: Vec<String>,
}

impl RepairReport {
    /// How `farm store verify --repair` ends: fine when the store is whole again, else the
    /// error that says what is left: entries farm could not build again, items in `store/`
    /// that are not entries (`report`'s strays).
    pub fn outcome(&self, report: &VerifyReport, store: &Store) -> Result<(), VerifyError> {
        let mut left = Vec::new();
        if !self.not_rebuilt.is_empty() {
            left.push(format!(
                "{} entries were set aside but not built again (not in this farm.toml)",
                self.not_rebuilt.len()
            ));
        }
        if !report.strays.is_empty() {
            left.push(strays_line(store, report.strays.len()));
        }
        if left.is_empty() {
            return Ok(());
        }
        Err(VerifyError::NotWhole {
            store: store.root().to_path_buf(),
            left,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Carries `plan` out: moves its entries out of the store (under the store-wide exclusive
/// lock: nothing is using an entry while it moves), then builds again those of `project`
/// (the project `plan_repair` was given).
pub fn repair(
    store: &Store,
    plan: &RepairPlan,
    project: Option<&Project>,
    options: &RealiseOptions,
    reporter: &Reporter,
) -> Result<RepairReport, RepairError> {
    let mut report = RepairReport {
        not_rebuilt: plan.not_rebuilt.clone(),
        ..Default::default()
    };
    {
        let _exclusive = store.use_exclusive(reporter)?;
        for (entry, _) in &plan.aside {
            let moved = store.set_aside(entry.dir_name())?;
            reporter.line(format!(
                "{:>12} {} to `{}`",
                "moved",
                entry.dir_name(),
                moved.display()
            ));
            report.set_aside.push((entry.dir_name().to_string(), moved));
        }
    }
    let ids: Vec<DrvId> = plan.rebuild.iter().map(|n| n.id.clone()).collect();
    if let (Some(project), false) = (project, ids.is_empty()) {
        let hashes: BTreeSet<_> = plan.aside.iter().map(|(e, _)| e.meta.drv_hash).collect();
        let _shared = store.use_shared(reporter)?;
        let closure = project.graph.closure(&ids);
        let present = present_hashes(store, closure)?;
        let build = plan_build(&project.graph, &ids, &present);
        let built = realise(&project.loaded.config, &build, store, options, reporter)?;
        report.rebuilt = build
            .steps
            .iter()
            .filter(|s| hashes.contains(&s.node.hash) && built.contains_key(&s.node.id))
            .map(|s| s.node.name.clone())
            .collect();
    }
    Ok(report)
}
