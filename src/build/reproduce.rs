//! `farm build --check`: builds derivations that are already in the store again, into
//! scratch staging directories that are never committed, and compares the outputs.
//!
//! Each derivation is rebuilt on its parent's *stored* entry, so a difference belongs to
//! that derivation alone. Downloads and local images are fixed-output (their declared or
//! content hash is the key), so there is nothing to rebuild.

use std::collections::BTreeMap;
use std::time::Instant;

use super::context::{BuildError, Context, RealiseOptions, failed};
use super::produce::produce;
use super::realise::boot_files_for;
use crate::model::build::derivation::{DrvId, DrvNode, Make};
use crate::model::build::plan::BuildPlan;
use crate::model::config::Config;
use crate::model::hash::ContentHash;
use crate::progress::Reporter;
use crate::store::{Entry, Store};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The rebuild gave the stored bytes.
    Same,
    Differs {
        stored: ContentHash,
        rebuilt: ContentHash,
    },
    /// A download or local file: its hash is its key.
    FixedOutput,
}

#[derive(Clone, Debug)]
pub struct Checked {
    pub node: DrvNode,
    pub outcome: Outcome,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(
        "`{name}` is not in the store, so there is nothing to compare a rebuild with\nhint: run \
         `farm build` first"
    )]
    NotBuilt { name: String },
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Rebuilds each derivation of `plan` listed in `wanted` (the plan is made as if nothing
/// were present, and holds their ancestors too), one at a time, and compares it with the
/// stored entry. As `nix build --check`, ancestors are not rebuilt: name them to check them.
pub fn rebuild_and_compare(
    config: &Config,
    plan: &BuildPlan,
    wanted: &[DrvId],
    store: &Store,
    options: &RealiseOptions,
    reporter: &Reporter,
) -> Result<Vec<Checked>, CheckError> {
    let mut stored: BTreeMap<DrvId, Entry> = BTreeMap::new();
    for step in &plan.steps {
        let node = &step.node;
        let entry = store
            .lookup_intact(&node.hash, &node.name)
            .map_err(failed(&node.name))?
            .ok_or_else(|| CheckError::NotBuilt {
                name: node.name.clone(),
            })?;
        stored.insert(node.id.clone(), entry);
    }
    let cx = Context {
        config,
        store,
        options,
        reporter,
    };
    let mut checked = Vec::new();
    for step in plan.steps.iter().filter(|s| wanted.contains(&s.node.id)) {
        let node = &step.node;
        let name = node.name.as_str();
        let entry = &stored[&node.id];
        // Rebuilt as its derivation is made, whatever the plan would have done.
        let outcome = match &node.make {
            Make::Fetch { .. } | Make::Import { .. } => Outcome::FixedOutput,
            make => {
                let parent = node.parent.as_ref().map(|p| &stored[p]);
                let boot = boot_files_for(plan, &stored, node);
                let lock = store.lock(&node.hash).map_err(failed(name))?;
                // A scratch directory: dropped, never committed, whatever the outcome.
                let staging = store.stage(&lock, name).map_err(failed(name))?;
                let (rebuilt, _) =
                    produce(&cx, node, make, parent, boot, &staging, Instant::now())?;
                drop(staging);
                match rebuilt == entry.meta.output_blake3 {
                    true => Outcome::Same,
                    false => Outcome::Differs {
                        stored: entry.meta.output_blake3,
                        rebuilt,
                    },
                }
            }
        };
        let (verb, detail) = match &outcome {
            Outcome::Same => ("reproduced", "the same output, bit for bit".to_string()),
            Outcome::Differs { stored, rebuilt } => {
                ("differs", format!("rebuilt {rebuilt}, stored {stored}"))
            }
            Outcome::FixedOutput => ("fixed", "its hash is its key: nothing to rebuild".into()),
        };
        reporter.line(format!("{verb:>12} {name}: {detail}"));
        checked.push(Checked {
            node: node.clone(),
            outcome,
        });
    }
    Ok(checked)
}
