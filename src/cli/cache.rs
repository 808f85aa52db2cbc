//! `farm store push` and `farm store pull`: the binary cache from the command line.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use super::store::{PullArgs, PushArgs, chosen_entries, store_dir};
use crate::binary_cache::{Substituters, Timeouts, open, push as push_entries};
use crate::build::realise::{RealiseOptions, human_bytes, present_hashes, realise};
use crate::build::substitution::{Substitution, summarise};
use crate::model::plan::{Action, plan_build, substitute_offered};
use crate::model::signing::SecretKey;
use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions, UsageError};
use crate::store::{Store, UseMode};

pub(super) fn push(
    options: &ProjectOptions,
    store: &Store,
    args: &PushArgs,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    super::build::cache_url(&args.url, "")?;
    let text = fs_err::read_to_string(&args.key)
        .with_context(|| format!("Cannot read the signing key `{}`", args.key.display()))?;
    let key: SecretKey = text.parse().map_err(|e| UsageError {
        message: format!("`{}` is not a secret key: {e}", args.key.display()),
        hint: "give the `.secret` file `farm store keygen NAME` wrote".into(),
    })?;
    let _use = store.use_as(UseMode::Shared, || {
        reporter.line(format!("{:>12} for `farm gc` to finish", "waiting"))
    })?;
    let entries = chosen_entries(options, store, &args.names)?;
    let cache = open(&args.url, Timeouts::default())?;
    let started = Instant::now();
    let report = push_entries(store, cache.as_ref(), &entries, &key, reporter)?;
    reporter.line(format!(
        "{:>12} {} entries to {} ({} blobs, {} compressed, {:.1} s); {} already there",
        "pushed",
        report.pushed.len(),
        args.url,
        report.blobs_uploaded,
        human_bytes(report.bytes_uploaded),
        started.elapsed().as_secs_f64(),
        report.present.len()
    ));
    Ok(())
}

pub(super) fn pull(
    options: &ProjectOptions,
    args: &PullArgs,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    super::build::cache_url(&args.url, "")?;
    let project = Project::load(options)?;
    let ids = match args.names.is_empty() {
        true => project.default_build(),
        false => {
            let mut ids = Vec::new();
            for name in &args.names {
                ids.extend(project.resolve(name)?);
            }
            ids
        }
    };
    let dir = store_dir(options);
    let store =
        Store::open(&dir).with_context(|| format!("Cannot open the store `{}`", dir.display()))?;
    let _use = store.use_as(UseMode::Shared, || {
        reporter.line(format!("{:>12} for `farm gc` to finish", "waiting"))
    })?;
    let present = present_hashes(&store, project.graph.closure(&ids))?;
    let mut plan = plan_build(&project.loaded.config, &project.graph, &ids, &present);
    let trusted = project
        .loaded
        .config
        .cache
        .trusted_public_keys
        .iter()
        .map(|k| k.value.clone())
        .collect();
    let caches = Substituters::new(
        std::slice::from_ref(&args.url),
        trusted,
        Timeouts::default(),
    )?;
    let missing: Vec<_> = plan
        .steps
        .iter()
        .filter(|s| s.action != Action::Cached)
        .map(|s| s.node.clone())
        .collect();
    // Pulling never builds: a record the cache lacks, or one farm does not trust, is an error.
    let mut offers = BTreeMap::new();
    let mut problems = Vec::new();
    for node in &missing {
        match caches.record(0, node) {
            Ok(Some(record)) => {
                offers.insert(
                    node.hash,
                    crate::binary_cache::Offer {
                        backend: 0,
                        url: args.url.clone(),
                        record,
                    },
                );
            }
            Ok(None) => problems.push(format!("`{}` is not in `{}`", node.name, args.url)),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "Nothing was pulled:\n  {}\nhint: `farm store push {} …` from a machine that built them",
            problems.join("\n  "),
            args.url
        );
    }
    let summary = summarise(&offers);
    substitute_offered(&mut plan, &summary);
    for step in &mut plan.steps {
        if let Action::Substitute { fallback, .. } = &mut step.action {
            *fallback = None;
        }
    }
    let realise_options = RealiseOptions {
        substitution: Some(Arc::new(Substitution { caches, offers })),
        jobs: crate::build::realise::default_jobs(),
        ..RealiseOptions::default()
    };
    let started = Instant::now();
    let done = realise(
        &project.loaded.config,
        &plan,
        &store,
        &realise_options,
        reporter,
    )?;
    reporter.line(format!(
        "{:>12} {} entries from {} in {:.1} s ({} were here already)",
        "pulled",
        missing.len(),
        args.url,
        started.elapsed().as_secs_f64(),
        done.len() - missing.len()
    ));
    Ok(())
}
