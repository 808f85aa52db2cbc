//! `farm store pull`: derivations of farm.toml downloaded from one binary cache, without
//! building anything. The build plan is made as for `farm build`; every step the store
//! lacks becomes a substitution from that cache with no fallback, so a record the cache
//! lacks, or one farm does not trust, stops the pull before anything is downloaded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::binary_cache::{BackendError, Offer, Substituters, Timeouts};
use crate::build::realise::{BuildError, RealiseOptions, default_jobs, present_hashes, realise};
use crate::build::substitution::{Substitution, summarise};
use crate::model::build::derivation::DrvId;
use crate::model::build::plan::{Action, BuildPlan, plan_build, substitute_offered};
use crate::progress::Reporter;
use crate::project::Project;
use crate::store::{Store, StoreError};

/// What a pull did.
#[derive(Debug)]
pub struct Pulled {
    /// Derivations downloaded (the store lacked them).
    pub downloaded: usize,
    /// Derivations of the plan the store had already.
    pub present: usize,
    pub took: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(
        "Nothing was pulled:\n  {}\nhint: `farm store push {url} …` from a machine that built them",
        problems.join("\n  ")
    )]
    NotOffered { url: String, problems: Vec<String> },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cache(#[from] BackendError),
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Downloads `wanted`, and what they are built on, from the cache at `url` into `store`;
/// records are trusted through farm.toml's `trusted-public-keys`.
pub fn pull(
    project: &Project,
    store: &Store,
    url: &str,
    wanted: &[DrvId],
    reporter: &Reporter,
) -> Result<Pulled, PullError> {
    let present = present_hashes(store, project.graph.closure(wanted))?;
    let mut plan = plan_build(&project.graph, wanted, &present);
    let trusted = project
        .loaded
        .config
        .cache
        .trusted_public_keys
        .iter()
        .map(|k| k.value.clone())
        .collect();
    let caches = Substituters::new(&[url.to_string()], trusted, Timeouts::default())?;
    let missing: Vec<_> = plan
        .steps
        .iter()
        .filter(|s| s.action != Action::Cached)
        .map(|s| s.node.clone())
        .collect();
    let mut offers = BTreeMap::new();
    let mut problems = Vec::new();
    for node in &missing {
        match caches.record(0, node) {
            Ok(Some(record)) => {
                offers.insert(
                    node.hash,
                    Offer {
                        backend: 0,
                        url: url.to_string(),
                        record,
                    },
                );
            }
            Ok(None) => problems.push(format!("`{}` is not in `{url}`", node.name)),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if !problems.is_empty() {
        return Err(PullError::NotOffered {
            url: url.to_string(),
            problems,
        });
    }
    substitute_only(&mut plan, &offers);
    let options = RealiseOptions {
        substitution: Some(Arc::new(Substitution { caches, offers })),
        jobs: default_jobs(),
        ..RealiseOptions::default()
    };
    let started = Instant::now();
    let done = realise(&project.loaded.config, &plan, store, &options, reporter)?;
    Ok(Pulled {
        downloaded: missing.len(),
        present: done.len() - missing.len(),
        took: started.elapsed(),
    })
}

/// Every step `offers` covers becomes a substitution, without the fallback `farm build`
/// would build when a download fails: pulling never builds.
fn substitute_only(plan: &mut BuildPlan, offers: &BTreeMap<crate::model::hash::DrvHash, Offer>) {
    substitute_offered(plan, &summarise(offers));
    for step in &mut plan.steps {
        if let Action::Substitute { fallback, .. } = &mut step.action {
            *fallback = None;
        }
    }
}
