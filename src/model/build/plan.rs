//! Build planning: which derivations are already in the store and how each missing one is
//! realised. Pure: the caller says which hashes the store holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::model::build::derivation::{DrvGraph, DrvId, DrvNode, Make, Recipe};
use crate::model::hash::DrvHash;
use crate::model::text::counted;
use crate::model::values::Builder;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Already in the store: nothing to do.
    Cached,
    /// Fetch, import or build it, as the derivation says it is made.
    Make(Make),
    /// Download from a binary cache whose signed record matched; `fallback` is how it is
    /// made if that fails (`None` for `farm store pull`, which never builds).
    Substitute {
        from: String,
        bytes: u64,
        fallback: Option<Make>,
    },
}

impl Action {
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Cached => "cached",
            Action::Make(Make::Fetch { .. }) => "fetch",
            Action::Make(Make::Import { .. }) => "import",
            Action::Make(Make::Debootstrap { .. }) => "debootstrap",
            Action::Make(Make::BuildTiny { .. } | Make::EmptyLayer | Make::Layer(_)) => "build",
            Action::Substitute { .. } => "substitute",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PlannedDrv {
    pub node: DrvNode,
    pub action: Action,
}

/// Derivations in build order (parents first), each with what will be done for it.
#[derive(Clone, Debug, Default)]
pub struct BuildPlan {
    pub steps: Vec<PlannedDrv>,
}

impl BuildPlan {
    pub fn is_noop(&self) -> bool {
        self.steps.iter().all(|s| s.action == Action::Cached)
    }
}

/// Plans realising `wanted` and its ancestors, given the hashes `present` in the store.
pub fn plan_build(graph: &DrvGraph, wanted: &[DrvId], present: &BTreeSet<DrvHash>) -> BuildPlan {
    let steps = graph
        .closure(wanted)
        .into_iter()
        .map(|node| PlannedDrv {
            action: if present.contains(&node.hash) {
                Action::Cached
            } else {
                Action::Make(node.make.clone())
            },
            node: node.clone(),
        })
        .collect();
    BuildPlan { steps }
}

/// A cache's offer of a derivation: its URL and the bytes to download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheOffer {
    pub from: String,
    pub bytes: u64,
}

/// Every step that would fetch, import or build and that a cache offers becomes
/// `Substitute`, keeping what it was as the fallback.
pub fn substitute_offered(plan: &mut BuildPlan, offers: &BTreeMap<DrvHash, CacheOffer>) {
    for step in &mut plan.steps {
        let Action::Make(make) = &step.action else {
            continue;
        };
        if let Some(offer) = offers.get(&step.node.hash) {
            step.action = Action::Substitute {
                from: offer.from.clone(),
                bytes: offer.bytes,
                fallback: Some(make.clone()),
            };
        }
    }
}

/// What the plan says of making a derivation, after its verb.
fn detail(make: &Make) -> String {
    match make {
        Make::Fetch { url, .. } => url.clone(),
        Make::Import { path, .. } => path.display().to_string(),
        Make::Debootstrap { spec, .. } => format!("{} from {}", spec.suite, spec.mirror),
        Make::BuildTiny { .. } => "tiny image (kernel, busybox, dropbear) from apt".to_string(),
        Make::EmptyLayer => "empty layer".to_string(),
        Make::Layer(layer) => match layer.recipe.builder {
            Builder::Chroot => format!(
                "{} in a chroot from farm's appliance",
                counted(layer.step_kinds, "step kind")
            ),
            Builder::Boot => format!("{} in a build VM", counted(layer.step_kinds, "step kind")),
        },
    }
}

impl fmt::Display for BuildPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .steps
            .iter()
            .map(|s| s.node.name.len())
            .max()
            .unwrap_or(0);
        for step in &self.steps {
            let detail = match &step.action {
                Action::Cached => String::new(),
                Action::Make(make) => detail(make),
                Action::Substitute { from, bytes, .. } => {
                    format!("from {from} ({:.1} MiB)", *bytes as f64 / (1 << 20) as f64)
                }
            };
            let short = &step.node.hash.to_hex()[..12];
            writeln!(
                f,
                "{:<11} {:<width$}  blake3-{short}  {detail}",
                step.action.verb(),
                step.node.name
            )?;
        }
        Ok(())
    }
}

/// Whether a recipe needs a parent layer realised first.
pub fn needs_parent(recipe: &Recipe) -> bool {
    matches!(recipe, Recipe::Layer(_))
}
