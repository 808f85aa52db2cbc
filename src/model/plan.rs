//! Build planning: which derivations are already in the store and how each missing one is
//! realised. Pure: the caller says which hashes the store holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use super::config::{Config, ImageSource};
use super::derivation::{DrvGraph, DrvId, DrvNode, Recipe};
use super::hash::DrvHash;
use super::values::Builder;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Already in the store: nothing to do.
    Cached,
    /// Download and verify.
    Fetch { url: String },
    /// Copy a local file into the store, verifying it.
    Import { path: PathBuf },
    /// Build a root filesystem from a Debian mirror.
    Debootstrap { suite: String, mirror: String },
    /// Assemble farm's tiny image from Debian packages.
    BuildTiny,
    /// Run a platform's steps in a build VM (or, with no steps, make an empty layer).
    Layer { steps: usize },
    /// Download from a binary cache whose signed record matched; `fallback` is what is
    /// done if that fails (`None` for `farm store pull`, which never builds).
    Substitute {
        from: String,
        bytes: u64,
        fallback: Option<Box<Action>>,
    },
}

impl Action {
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Cached => "cached",
            Action::Fetch { .. } => "fetch",
            Action::Import { .. } => "import",
            Action::Debootstrap { .. } => "debootstrap",
            Action::BuildTiny => "build",
            Action::Layer { .. } => "build",
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
pub fn plan_build(
    config: &Config,
    graph: &DrvGraph,
    wanted: &[DrvId],
    present: &BTreeSet<DrvHash>,
) -> BuildPlan {
    let steps = graph
        .closure(wanted)
        .into_iter()
        .map(|node| PlannedDrv {
            action: if present.contains(&node.hash) {
                Action::Cached
            } else {
                action_for(config, node)
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
        if step.action == Action::Cached {
            continue;
        }
        if let Some(offer) = offers.get(&step.node.hash) {
            let fallback = std::mem::replace(&mut step.action, Action::Cached);
            step.action = Action::Substitute {
                from: offer.from.clone(),
                bytes: offer.bytes,
                fallback: Some(Box::new(fallback)),
            };
        }
    }
}

fn action_for(config: &Config, node: &DrvNode) -> Action {
    match (&node.id, &node.derivation.recipe) {
        (DrvId::Image { image, .. }, _) => match &config.images[image].source {
            ImageSource::Url { url, .. } => Action::Fetch {
                url: url.value.clone(),
            },
            ImageSource::Path { path, .. } => Action::Import {
                path: path.value.clone(),
            },
            ImageSource::Debian(spec) => Action::Debootstrap {
                suite: spec.suite.clone(),
                mirror: spec.mirror.clone(),
            },
            ImageSource::Tiny => Action::BuildTiny,
        },
        (DrvId::Platform { platform, .. }, _) => Action::Layer {
            steps: config.platforms[platform].steps.count(),
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
                Action::Fetch { url } => url.clone(),
                Action::Import { path } => path.display().to_string(),
                Action::Debootstrap { suite, mirror } => format!("{suite} from {mirror}"),
                Action::BuildTiny => "tiny image (kernel, busybox, dropbear) from apt".to_string(),
                Action::Layer { steps: 0 } => "empty layer".to_string(),
                Action::Layer { steps } => match &step.node.derivation.recipe {
                    Recipe::Layer {
                        builder: Builder::Chroot,
                        ..
                    } => format!("{steps} step kinds in a chroot from farm's appliance"),
                    _ => format!("{steps} step kinds in a build VM"),
                },
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
    matches!(recipe, Recipe::Layer { .. })
}
