//! Planning with binary caches: which missing derivations a cache offers, asked before
//! anything is built, so `farm plan` and `farm up --dry-run` show "substitute" too.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::binary_cache::{BackendError, Offer, Substituters, Timeouts};
use crate::model::build::derivation::DrvId;
use crate::model::build::plan::{BuildPlan, CacheOffer, plan_build, substitute_offered};
use crate::model::hash::DrvHash;
use crate::progress::Reporter;
use crate::project::Project;

/// Which caches a command asks: farm.toml's `substituters`, after those given with
/// `--substituter` (or `FARM_SUBSTITUTERS`); none with `--no-substitute`.
#[derive(Clone, Debug, Default)]
pub struct CacheChoice {
    pub extra: Vec<String>,
    pub disabled: bool,
    pub timeouts: Timeouts,
}

/// The caches of a build and what each offers; `realise` fetches from them.
#[derive(Debug)]
pub struct Substitution {
    pub caches: Substituters,
    pub offers: BTreeMap<DrvHash, Offer>,
}

/// What the plan shows of each offer: where from, and how much.
pub fn summarise(offers: &BTreeMap<DrvHash, Offer>) -> BTreeMap<DrvHash, CacheOffer> {
    offers
        .iter()
        .map(|(hash, offer)| {
            (
                *hash,
                CacheOffer {
                    from: offer.url.clone(),
                    bytes: offer.record.download_size(),
                },
            )
        })
        .collect()
}

/// The caches `choice` and `project` name, or `None` when there are none.
pub fn caches_for(
    project: &Project,
    choice: &CacheChoice,
) -> Result<Option<Substituters>, BackendError> {
    if choice.disabled {
        return Ok(None);
    }
    let settings = &project.loaded.config.cache;
    let mut urls: Vec<String> = choice.extra.clone();
    for url in &settings.substituters {
        if !urls.contains(&url.value) {
            urls.push(url.value.clone());
        }
    }
    if urls.is_empty() {
        return Ok(None);
    }
    Ok(Some(Substituters::new(
        &urls,
        trusted_keys(project),
        choice.timeouts,
    )?))
}

/// farm.toml's `trusted-public-keys`: the keys a cache's records must be signed by.
pub fn trusted_keys(project: &Project) -> Vec<crate::model::signing::PublicKey> {
    project
        .loaded
        .config
        .cache
        .trusted_public_keys
        .iter()
        .map(|k| k.value.clone())
        .collect()
}

/// Plans `wanted` given what the store has, then asks the caches for every derivation
/// that would be fetched or built.
pub fn plan_with_caches(
    project: &Project,
    wanted: &[DrvId],
    present: &BTreeSet<DrvHash>,
    choice: &CacheChoice,
    reporter: &Reporter,
) -> Result<(BuildPlan, Option<Arc<Substitution>>), BackendError> {
    let mut plan = plan_build(&project.graph, wanted, present);
    if plan.is_noop() {
        return Ok((plan, None));
    }
    let Some(caches) = caches_for(project, choice)? else {
        return Ok((plan, None));
    };
    let missing: Vec<_> = plan
        .steps
        .iter()
        .filter(|s| !present.contains(&s.node.hash))
        .map(|s| &s.node)
        .collect();
    let warn = |line: String| reporter.warn(line);
    let offers = caches.query(&missing, &warn);
    let summary = summarise(&offers);
    substitute_offered(&mut plan, &summary);
    Ok((plan, Some(Arc::new(Substitution { caches, offers }))))
}
