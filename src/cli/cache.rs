//! `farm store push` and `farm store pull`: the binary cache from the command line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use crate::binary_cache::{Timeouts, keys, open, push as push_entries, push_snapshot};
use crate::build::pull::pull as pull_entries;
use crate::maintain::chosen_entries;
use crate::model::text::human_bytes;
use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions};
use crate::store::Store;

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The cache: `file:///dir` or `http(s)://…` (a server that accepts PUT).
    pub url: String,
    /// Entries (directory or label), snapshots (their entries, the layers inside them, and
    /// a record of the name), or what farm.toml calls NAME [default: everything `farm build`
    /// builds for farm.toml].
    pub names: Vec<String>,
    /// The secret key file `farm store keygen` wrote.
    #[arg(long, env = "FARM_SIGNING_KEY", value_name = "FILE")]
    pub key: PathBuf,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The cache to download from (trusted through farm.toml's `trusted-public-keys`).
    pub url: String,
    /// Images, platforms or VMs of farm.toml, or snapshots pushed with `farm store push URL
    /// NAME` (with every layer of the lab) [default: everything `farm build` builds].
    pub names: Vec<String>,
    /// Where a pulled snapshot goes (the lab's state directory).
    #[command(flatten)]
    pub state: super::lab::StateArgs,
}

pub(super) fn push(
    options: &ProjectOptions,
    store: &Store,
    args: &PushArgs,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    super::build::cache_url(&args.url, "")?;
    let key = keys::read_secret(&args.key)?;
    let _use = store.use_shared(reporter)?;
    let project = Project::load_if_present(options)?;
    let entries = chosen_entries(store, project.as_ref(), &options.config, &args.names)?;
    let cache = open(&args.url, Timeouts::default())?;
    let started = Instant::now();
    let report = push_entries(store, cache.as_ref(), &entries, &key, reporter)?;
    // A snapshot named goes with a record of its name, which a store without it pulls by.
    let all = store.entries()?;
    let state_root = project.as_ref().map(|p| p.project_dir().join(".farm"));
    for name in &args.names {
        if let Some(snapshot) =
            crate::run::snapshot::cache_record(&all, state_root.as_deref(), name)
        {
            push_snapshot(store, cache.as_ref(), snapshot, &key)?;
            reporter.status("pushed", format!("snapshot {name}"));
        }
    }
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
    // A name farm.toml does not know is a snapshot's.
    let (snapshots, names): (Vec<&String>, Vec<&String>) = args
        .names
        .iter()
        .partition(|name| project.resolve(name).is_err());
    let names: Vec<String> = names.into_iter().cloned().collect();
    let dir = options.store_dir();
    let store =
        Store::open(&dir).with_context(|| format!("Cannot open the store `{}`", dir.display()))?;
    let _use = store.use_shared(reporter)?;
    let started = Instant::now();
    if snapshots.is_empty() || !names.is_empty() {
        let wanted = project.resolve_all(&names)?;
        let pulled = pull_entries(&project, &store, &args.url, &wanted, reporter)?;
        reporter.line(format!(
            "{:>12} {} entries from {} in {:.1} s ({} were here already)",
            "pulled",
            pulled.downloaded,
            args.url,
            pulled.took.as_secs_f64(),
            pulled.present
        ));
    }
    let state_root = args.state.dir(&project);
    for name in snapshots {
        let (snapshot, downloaded) =
            crate::build::pull::pull_snapshot(&project, &store, &args.url, name, reporter)?;
        crate::run::snapshot::adopt(&store, &state_root, &snapshot)?;
        reporter.status(
            "pulled",
            format!(
                "snapshot {name} ({downloaded} entries, {:.1} s): `farm snapshot restore {name}` starts it{}",
                started.elapsed().as_secs_f64(),
                if snapshot.converged_key.is_some() {
                    ", and so do `farm up` and `farm test` of this lab"
                } else {
                    ""
                }
            ),
        );
    }
    Ok(())
}
