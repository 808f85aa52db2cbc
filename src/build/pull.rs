//! `farm store pull`: derivations of farm.toml downloaded from one binary cache, without
//! building anything. The build plan is made as for `farm build`; every step the store
//! lacks becomes a substitution from that cache with no fallback, so a record the cache
//! lacks, or one farm does not trust, stops the pull before anything is downloaded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::binary_cache::{BackendError, Offer, Substituters, Timeouts};
use crate::build::realise::{BuildError, RealiseOptions, default_jobs, present_hashes, realise};
use crate::build::substitution::{Substitution, summarise, trusted_keys};
use crate::model::build::cache_record::SnapshotRecord;
use crate::model::build::derivation::DrvId;
use crate::model::build::plan::{Action, BuildPlan, plan_build, substitute_offered};
use crate::progress::Reporter;
use crate::project::Project;
use crate::store::{EntryMeta, Store, StoreError};

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
    let caches = Substituters::new(
        &[url.to_string()],
        trusted_keys(project),
        Timeouts::default(),
    )?;
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

/// Downloads snapshot `name` from the cache at `url` into `store`: the layers of its VMs
/// as farm.toml builds them ([`pull`]), then its own entries, each checked as a
/// substitution is (trusted, its derivation, its files, the parent it backs onto). Returns
/// the cache's record of the snapshot, and how many entries were downloaded.
pub fn pull_snapshot(
    project: &Project,
    store: &Store,
    url: &str,
    name: &str,
    reporter: &Reporter,
) -> Result<(SnapshotRecord, usize), PullError> {
    let caches = Substituters::new(
        &[url.to_string()],
        trusted_keys(project),
        Timeouts::default(),
    )?;
    let not_offered = |problem: String| PullError::NotOffered {
        url: url.to_string(),
        problems: vec![problem],
    };
    let snapshot = caches
        .snapshot(0, name)
        .map_err(|e| not_offered(e.to_string()))?
        .ok_or_else(|| {
            not_offered(format!(
                "no snapshot `{name}` is in `{url}`, and farm.toml has no image, platform or VM of that name"
            ))
        })?;
    let wanted = project.resolve_all(&snapshot.vms).map_err(|e| {
        not_offered(format!(
            "snapshot `{name}` holds VMs this farm.toml does not have ({e})"
        ))
    })?;
    pull(project, store, url, &wanted, reporter)?;
    let entries = store.entries()?;
    let mut downloaded = 0;
    for hash in &snapshot.entries {
        if entries.iter().any(|e| e.meta.drv_hash == *hash) {
            continue;
        }
        let label = format!("an entry of snapshot {name}");
        let record = caches
            .record_by_hash(0, hash, &label)
            .map_err(|e| not_offered(e.to_string()))?
            .ok_or_else(|| not_offered(format!("{label} ({}) is not in `{url}`", hash.to_hex())))?;
        let parent = match &record.parent {
            Some(parent) => Some(
                store
                    .entries()?
                    .into_iter()
                    .find(|e| e.meta.drv_hash == *parent)
                    .ok_or_else(|| {
                        not_offered(format!(
                            "`{}` backs onto an entry this store lacks ({})",
                            record.name,
                            parent.to_hex()
                        ))
                    })?,
            ),
            None => None,
        };
        let started = Instant::now();
        let lock = store.lock(hash)?;
        let staging = store.stage(&lock, &record.name)?;
        let offer = Offer {
            backend: 0,
            url: url.to_string(),
            record,
        };
        let record = &offer.record;
        let bar = reporter.bytes_for(
            "substitute",
            &format!("{} from {url}", record.name),
            Some(record.download_size()),
        );
        let checked = caches
            .fetch(&offer, staging.dir(), &|n| bar.inc(n))
            .and_then(|output| {
                caches
                    .check_parent(&offer, parent.as_ref())
                    .map(|()| output)
            })
            .map_err(|e| not_offered(e.to_string()))?;
        bar.finish_and_clear();
        let meta = EntryMeta::made_now(
            record.name.clone(),
            *hash,
            record.derivation.clone(),
            checked,
            parent.map(|p| p.dir_name().to_string()),
            started,
        );
        store.commit(staging, meta)?;
        drop(lock);
        reporter.line(format!(
            "{:>12} {} from {url} ({}, {:.0} s, signature and hashes checked)",
            "substituted",
            record.name,
            crate::model::text::human_bytes(record.download_size()),
            started.elapsed().as_secs_f64()
        ));
        downloaded += 1;
    }
    Ok((snapshot, downloaded))
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
