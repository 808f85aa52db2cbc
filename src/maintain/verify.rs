//! `farm store verify [--repair]`: checks every entry against what was recorded when it was
//! committed and, when asked, moves the damaged ones aside and builds them again.
//!
//! An entry backed by a damaged one is set aside with it: its disk holds only the blocks
//! that differ from its parent, so a parent rebuilt with other bytes (an `upgrade` is not
//! bit-reproducible) would make it a different disk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::build::realise::{BuildError, RealiseOptions, present_hashes, realise};
use crate::model::derivation::DrvId;
use crate::model::plan::plan_build;
use crate::progress::Reporter;
use crate::project::Project;
use crate::store::{Entry, Finding, Store, StoreError, UseMode, VerifyDepth};

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
}

/// Checks every entry, calling `each` as each is done (a store holds many gigabytes; the
/// user sees progress as it goes).
pub fn verify_store(
    store: &Store,
    depth: VerifyDepth,
    mut each: impl FnMut(&Verdict),
) -> Result<VerifyReport, StoreError> {
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
    Damaged,
    /// It backs onto this damaged (or itself set-aside) entry.
    BackedBy(String),
}

/// The damaged entries and every entry that backs onto one, parents first.
pub fn to_set_aside(report: &VerifyReport) -> Vec<(Entry, AsideReason)> {
    let mut chosen: BTreeMap<String, AsideReason> = report
        .damaged()
        .map(|v| (v.entry.dir_name().to_string(), AsideReason::Damaged))
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
    let mut ordered = Vec::new();
    let mut placed = BTreeSet::new();
    while ordered.len() < chosen.len() {
        for verdict in &report.verdicts {
            let name = verdict.entry.dir_name();
            let Some(reason) = chosen.get(name) else {
                continue;
            };
            let parent_ready = match reason {
                AsideReason::BackedBy(parent) => placed.contains(parent.as_str()),
                AsideReason::Damaged => true,
            };
            if parent_ready && placed.insert(name) {
                ordered.push((verdict.entry.clone(), reason.clone()));
            }
        }
    }
    ordered
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

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Moves `aside` out of the store (under the store-wide exclusive lock: nothing is using an
/// entry while it moves) and builds again those `project` describes.
pub fn repair(
    store: &Store,
    aside: &[(Entry, AsideReason)],
    project: Option<&Project>,
    options: &RealiseOptions,
    reporter: &Reporter,
) -> Result<RepairReport, RepairError> {
    let mut report = RepairReport::default();
    {
        let _exclusive = store.use_as(UseMode::Exclusive, || {
            reporter.line(format!(
                "{:>12} for other farm processes to finish with the store",
                "waiting"
            ))
        })?;
        for (entry, _) in aside {
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
    let hashes: BTreeSet<_> = aside.iter().map(|(e, _)| e.meta.drv_hash).collect();
    let matching: Vec<&crate::model::derivation::DrvNode> = project
        .map(|p| {
            p.graph
                .nodes
                .values()
                .filter(|n| hashes.contains(&n.hash))
                .collect()
        })
        .unwrap_or_default();
    let ids: Vec<DrvId> = matching.iter().map(|n| n.id.clone()).collect();
    let known: BTreeSet<_> = matching.iter().map(|n| n.hash).collect();
    report.not_rebuilt = aside
        .iter()
        .filter(|(e, _)| !known.contains(&e.meta.drv_hash))
        .map(|(e, _)| e.dir_name().to_string())
        .collect();
    if let (Some(project), false) = (project, ids.is_empty()) {
        let _shared = store.use_as(UseMode::Shared, || {})?;
        let closure = project.graph.closure(&ids);
        let present = present_hashes(store, closure)?;
        let plan = plan_build(&project.loaded.config, &project.graph, &ids, &present);
        let built = realise(&project.loaded.config, &plan, store, options, reporter)?;
        report.rebuilt = plan
            .steps
            .iter()
            .filter(|s| hashes.contains(&s.node.hash) && built.contains_key(&s.node.id))
            .map(|s| s.node.name.clone())
            .collect();
    }
    Ok(report)
}
