//! `farm store …`: look inside the store and check it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::build::realise::RealiseOptions;
use crate::maintain::chosen_entries;
use crate::maintain::verify::{AsideReason, DamageHint, plan_repair, repair, verify_store};
use crate::model::text::human_bytes;
use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions};
use crate::store::{Store, VerifyDepth};

use super::cache::{PullArgs, PushArgs, pull, push};

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// List the store's entries: directory, size, parent.
    Ls,
    /// Check every file of every entry (disk, boot files, metadata) against the hashes
    /// recorded when it was committed, and every backing chain.
    Verify(VerifyArgs),
    /// Write entries and everything they back onto to one archive (zstd-compressed tar, a
    /// manifest of hashes first), for a machine without network.
    Export(ExportArgs),
    /// Add the entries of an archive written by `export` to the store; every file is
    /// verified before anything enters.
    Import(ImportArgs),
    /// Make an ed25519 key pair for signing a binary cache: NAME.secret and NAME.public.
    Keygen(KeygenArgs),
    /// Upload entries and everything they back onto to a binary cache, signed.
    Push(PushArgs),
    /// Download derivations of farm.toml (and their parents) from a binary cache, without
    /// building anything.
    Pull(PullArgs),
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The key's name, as signatures and `trusted-public-keys` will show it (`ci-1`).
    pub name: String,
    /// Where to write NAME.secret and NAME.public.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Entries (directory or label, as `farm store ls` shows) or what farm.toml calls NAME
    /// (image, platform, VM) [default: everything `farm build` builds for farm.toml].
    pub names: Vec<String>,
    /// The archive to write.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// An archive written by `farm store export`.
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Move damaged entries (and those backed by them) to `damaged/` in the store and build
    /// again those this farm.toml describes.
    #[arg(long)]
    pub repair: bool,
    /// With `--repair`: print what would be set aside and built again; change nothing.
    #[arg(long, requires = "repair")]
    pub dry_run: bool,
    /// Skip `qemu-img check` of each disk's metadata: hashes and chains only.
    #[arg(long)]
    pub no_qemu_check: bool,
}

pub fn run(
    options: &ProjectOptions,
    command: StoreCommand,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    // Looking never creates: a mistyped --store is an error, not an empty new store.
    let existing = || -> anyhow::Result<Store> {
        let dir = options.store_dir();
        Ok(Store::open_existing(&dir)?.ok_or(crate::store::StoreError::NoStore { path: dir })?)
    };
    match command {
        // Importing into a new store is how an offline machine gets its first one.
        StoreCommand::Import(args) => import(options, &args, reporter)?,
        StoreCommand::Keygen(args) => keygen(&args)?,
        StoreCommand::Pull(args) => pull(options, &args, reporter)?,
        StoreCommand::Ls => {
            let store = existing()?;
            let (entries, problems) = store.scan()?;
            for problem in &problems {
                reporter.warn(problem.to_string());
            }
            for entry in entries {
                println!(
                    "{}\t{}\t{}",
                    entry.dir_name(),
                    crate::model::text::human_bytes(entry.meta.size),
                    entry.meta.parent.as_deref().unwrap_or("-")
                );
            }
        }
        StoreCommand::Verify(args) => verify(options, &existing()?, args, reporter)?,
        StoreCommand::Export(args) => export(options, &existing()?, &args, reporter)?,
        StoreCommand::Push(args) => push(options, &existing()?, &args, reporter)?,
    }
    Ok(())
}

fn verify(
    options: &ProjectOptions,
    store: &Store,
    args: VerifyArgs,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let depth = VerifyDepth {
        qemu_img_check: !args.no_qemu_check,
    };
    let report = verify_store(store, depth, reporter, |verdict| {
        let name = verdict.entry.dir_name();
        if verdict.findings.is_empty() {
            reporter.line(format!("{:>12} {name}", "ok"));
        }
        for finding in &verdict.findings {
            eprintln!(
                "error: `{}` of entry `{name}`: {}",
                finding.file, finding.problem
            );
        }
    })?;
    for stray in &report.strays {
        eprintln!("error: {stray}");
    }
    if report.unrecorded > 0 {
        reporter.line(format!(
            "{:>12} {} entries were committed by an older farm: their boot files have no \
             recorded hashes, only their disks and chains were checked",
            "note", report.unrecorded
        ));
    }
    if report.is_clean() {
        reporter.line(format!(
            "{:>12} {} entries, every file and backing chain intact",
            "verified",
            report.verdicts.len()
        ));
        return Ok(());
    }
    if !args.repair || report.damaged().next().is_none() {
        return Ok(report.outcome(store, DamageHint::Repair)?);
    }
    let project = Project::load_if_present(options)?;
    let plan = plan_repair(&report, project.as_ref());
    if args.dry_run {
        print!("{}", plan.render());
        return Ok(report.outcome(store, DamageHint::DryRun)?);
    }
    for (entry, reason) in &plan.aside {
        if let AsideReason::BackedBy(parent) = reason {
            reporter.line(format!(
                "{:>12} {} too: it backs onto `{parent}`",
                "setting aside",
                entry.dir_name()
            ));
        }
    }
    let repaired = repair(
        store,
        &plan,
        project.as_ref(),
        &RealiseOptions::default(),
        reporter,
    )?;
    for name in &repaired.not_rebuilt {
        reporter.warn(format!(
            "`{name}` is not a derivation of `{}`, so it was not built again",
            options.config.display()
        ));
    }
    reporter.line(format!(
        "{:>12} {} entries set aside, {} built again",
        "repaired",
        repaired.set_aside.len(),
        repaired.rebuilt.len()
    ));
    Ok(repaired.outcome(&report, store)?)
}

fn export(
    options: &ProjectOptions,
    store: &Store,
    args: &ExportArgs,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let _use = store.use_shared(reporter)?;
    let project = Project::load_if_present(options)?;
    let chosen = chosen_entries(store, project.as_ref(), &options.config, &args.names)?;
    let started = Instant::now();
    let report = store
        .export(&chosen, &args.output)
        .with_context(|| format!("Cannot export to `{}`", args.output.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    let archive = fs_err::metadata(&args.output)?.len();
    reporter.line(format!(
        "{:>12} {} entries ({}) to `{}`: {} compressed, {:.1} s, {}/s",
        "exported",
        report.entries.len(),
        human_bytes(report.bytes),
        args.output.display(),
        human_bytes(archive),
        seconds,
        human_bytes((report.bytes as f64 / seconds.max(1e-3)) as u64)
    ));
    Ok(())
}

fn import(options: &ProjectOptions, args: &ImportArgs, reporter: &Reporter) -> anyhow::Result<()> {
    let dir = options.store_dir();
    let store =
        Store::open(&dir).with_context(|| format!("Cannot open the store `{}`", dir.display()))?;
    let _use = store.use_shared(reporter)?;
    let started = Instant::now();
    let report = store.import(&args.file)?;
    let seconds = started.elapsed().as_secs_f64();
    for name in &report.entries {
        reporter.line(format!("{:>12} {name}", "added"));
    }
    for name in &report.present {
        reporter.line(format!("{:>12} {name} (already in the store)", "present"));
    }
    reporter.line(format!(
        "{:>12} {} entries added, {} already present ({} verified in {:.1} s, {}/s)",
        "imported",
        report.entries.len(),
        report.present.len(),
        human_bytes(report.bytes),
        seconds,
        human_bytes((report.bytes as f64 / seconds.max(1e-3)) as u64)
    ));
    Ok(())
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    let written = crate::binary_cache::keys::generate(&args.name, &args.dir)?;
    eprintln!(
        "{:>12} `{}` (keep it secret: `farm store push --key` signs with it)",
        "wrote",
        written.secret.display()
    );
    eprintln!(
        "{:>12} `{}`; trust it in farm.toml with:",
        "wrote",
        written.public.display()
    );
    println!("trusted-public-keys = [\"{}\"]", written.public_key);
    Ok(())
}
