//! `farm store …`: look inside the store and check it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::build::realise::RealiseOptions;
use crate::build::realise::human_bytes;
use crate::maintain::verify::{AsideReason, repair, to_set_aside, verify_store};
use crate::maintain::{NamedError, closure_of, entries_named};
use crate::progress::Reporter;
use crate::project::ProjectOptions;
use crate::project::{Project, UsageError};
use crate::store::{Store, UseMode, VerifyDepth};

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
pub struct PushArgs {
    /// The cache: `file:///dir` or `http(s)://…` (a server that accepts PUT).
    pub url: String,
    /// Entries (directory or label) or what farm.toml calls NAME [default: everything
    /// `farm build` builds for farm.toml].
    pub names: Vec<String>,
    /// The secret key file `farm store keygen` wrote.
    #[arg(long, env = "FARM_SIGNING_KEY", value_name = "FILE")]
    pub key: PathBuf,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The cache to download from (trusted through farm.toml's `trusted-public-keys`).
    pub url: String,
    /// Images, platforms or VMs of farm.toml [default: everything `farm build` builds].
    pub names: Vec<String>,
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
    /// Skip `qemu-img check` of each disk's metadata: hashes and chains only.
    #[arg(long)]
    pub no_qemu_check: bool,
}

/// The store directory without loading farm.toml: `--store`, else `cache/` beside it.
pub(super) fn store_dir(options: &ProjectOptions) -> std::path::PathBuf {
    options.store.clone().unwrap_or_else(|| {
        options
            .config
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."))
            .join("cache")
    })
}

pub fn run(
    options: &ProjectOptions,
    command: StoreCommand,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    // Importing into a new store is how an offline machine gets its first one.
    match command {
        StoreCommand::Import(args) => return import(options, &args, reporter),
        StoreCommand::Keygen(args) => return keygen(&args),
        StoreCommand::Pull(args) => return super::cache::pull(options, &args, reporter),
        _ => {}
    }
    // Looking never creates: a mistyped --store is an error, not an empty new store.
    let dir = store_dir(options);
    let store = Store::open_existing(&dir)?
        .ok_or(crate::store::StoreError::NoStore { path: dir.clone() })?;
    match command {
        StoreCommand::Ls => {
            let (entries, problems) = store.scan()?;
            for problem in &problems {
                reporter.warn(problem.to_string());
            }
            for entry in entries {
                println!(
                    "{}\t{}\t{}",
                    entry.dir_name(),
                    crate::build::realise::human_bytes(entry.meta.size),
                    entry.meta.parent.as_deref().unwrap_or("-")
                );
            }
        }
        StoreCommand::Verify(args) => verify(options, &store, args, reporter)?,
        StoreCommand::Export(args) => export(options, &store, &args, reporter)?,
        StoreCommand::Push(args) => super::cache::push(options, &store, &args, reporter)?,
        StoreCommand::Import(_) | StoreCommand::Keygen(_) | StoreCommand::Pull(_) => {
            unreachable!("handled above")
        }
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
    let report = {
        // Shared: builds and labs go on; gc waits rather than remove what is being read.
        let _use = store.use_as(UseMode::Shared, || {
            reporter.line(format!("{:>12} for `farm gc` to finish", "waiting"))
        })?;
        verify_store(store, depth, |verdict| {
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
        })?
    };
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
    let damaged = report.damaged().count();
    if report.is_clean() {
        reporter.line(format!(
            "{:>12} {} entries, every file and backing chain intact",
            "verified",
            report.verdicts.len()
        ));
        return Ok(());
    }
    if args.repair && damaged > 0 {
        let project = options
            .config
            .exists()
            .then(|| Project::load(options))
            .transpose()?;
        let aside = to_set_aside(&report);
        for (entry, reason) in &aside {
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
            &aside,
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
        let mut left = Vec::new();
        if !repaired.not_rebuilt.is_empty() {
            left.push(format!(
                "{} entries were set aside but not built again (not in this farm.toml)",
                repaired.not_rebuilt.len()
            ));
        }
        if !report.strays.is_empty() {
            left.push(format!(
                "{} item(s) in `{}` are not entries",
                report.strays.len(),
                store.root().join("store").display()
            ));
        }
        if left.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "The store `{}` is not whole again: {}\nhint: build them from the farm.toml that \
             describes them; farm never removes what it did not put in `store/`",
            store.root().display(),
            left.join("; ")
        );
    }
    let mut what = Vec::new();
    if damaged > 0 {
        what.push(format!(
            "{damaged} of {} entries are damaged",
            report.verdicts.len()
        ));
    }
    if !report.strays.is_empty() {
        what.push(format!(
            "{} item(s) in `{}` are not entries",
            report.strays.len(),
            store.root().join("store").display()
        ));
    }
    let hint = match damaged {
        0 => "farm does not remove what it did not put in `store/`: move those items away",
        _ => "`farm store verify --repair` moves damaged entries aside and builds them again",
    };
    anyhow::bail!(
        "The store `{}` is damaged: {}\nhint: {hint}",
        store.root().display(),
        what.join("; ")
    );
}

fn export(
    options: &ProjectOptions,
    store: &Store,
    args: &ExportArgs,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let _use = store.use_as(UseMode::Shared, || {
        reporter.line(format!("{:>12} for `farm gc` to finish", "waiting"))
    })?;
    let chosen = chosen_entries(options, store, &args.names)?;
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
    let dir = store_dir(options);
    let store =
        Store::open(&dir).with_context(|| format!("Cannot open the store `{}`", dir.display()))?;
    let _use = store.use_as(UseMode::Shared, || {
        reporter.line(format!("{:>12} for `farm gc` to finish", "waiting"))
    })?;
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

/// Keeps a usage error a usage error (exit code 2).
fn named_error(e: NamedError) -> anyhow::Error {
    match e {
        NamedError::Store(e) => e.into(),
        NamedError::Usage(e) => e.into(),
    }
}

/// The entries `names` mean with everything they back onto, parents first; without names,
/// every derivation `farm build` builds for farm.toml (all must be in the store).
pub(super) fn chosen_entries(
    options: &ProjectOptions,
    store: &Store,
    names: &[String],
) -> anyhow::Result<Vec<crate::store::Entry>> {
    let entries = store.entries()?;
    let project = options
        .config
        .exists()
        .then(|| Project::load(options))
        .transpose()?;
    let mut dirs = Vec::new();
    if names.is_empty() {
        let Some(project) = &project else {
            anyhow::bail!(
                "`{}` does not exist, so there is no lab to take entries from\nhint: name the \
                 entries, as `farm store ls` lists them",
                options.config.display()
            );
        };
        let mut missing = Vec::new();
        for node in project.graph.closure(&project.default_build()) {
            match store.lookup(&node.hash, &node.name)? {
                Some(entry) => dirs.push(entry.dir_name().to_string()),
                None => missing.push(node.name.clone()),
            }
        }
        // The appliance of its chroot builds goes along when it is here (~8 MiB), so the
        // offline machine can rebuild such a platform after a change to its steps.
        for arch in crate::model::derivation::appliance_arches(&project.graph) {
            let node = crate::model::derivation::appliance_node(arch);
            if let Some(entry) = store.lookup(&node.hash, &node.name)? {
                dirs.push(entry.dir_name().to_string());
            }
        }
        if !missing.is_empty() {
            anyhow::bail!(
                "Not in the store yet: `{}`\nhint: run `farm build` first",
                missing.join("`, `")
            );
        }
    }
    for name in names {
        dirs.extend(
            entries_named(store, project.as_ref(), &entries, name, name).map_err(named_error)?,
        );
    }
    let chosen = closure_of(&entries, &dirs);
    let present: std::collections::BTreeSet<&str> = chosen.iter().map(|e| e.dir_name()).collect();
    for entry in &chosen {
        if let Some(parent) = &entry.meta.parent
            && !present.contains(parent.as_str())
        {
            anyhow::bail!(
                "Entry `{}` backs onto `{parent}`, which is not in the store\nhint: `farm store \
                 verify` finds what else is broken",
                entry.dir_name()
            );
        }
    }
    Ok(chosen)
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    let mut seed = [0u8; 32];
    std::io::Read::read_exact(&mut fs_err::File::open("/dev/urandom")?, &mut seed)?;
    let secret =
        crate::model::signing::SecretKey::from_seed(&args.name, seed).ok_or_else(|| {
            UsageError {
                message: format!("`{}` cannot name a key", args.name),
                hint: "use letters, digits, `.`, `_` and `-`, such as `ci-1`".into(),
            }
        })?;
    let secret_path = args.dir.join(format!("{}.secret", args.name));
    let public_path = args.dir.join(format!("{}.public", args.name));
    for path in [&secret_path, &public_path] {
        if path.exists() {
            anyhow::bail!(
                "`{}` already exists; farm does not overwrite keys\nhint: choose another name, \
                 or move the old key away first",
                path.display()
            );
        }
    }
    fs_err::create_dir_all(&args.dir)?;
    {
        use fs_err::os::unix::fs::OpenOptionsExt;
        use std::io::Write;
        let mut file = fs_err::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret_path)?;
        writeln!(file, "{}", secret.to_text())?;
    }
    let public = secret.public().to_string();
    fs_err::write(&public_path, format!("{public}\n"))?;
    eprintln!(
        "{:>12} `{}` (keep it secret: `farm store push --key` signs with it)",
        "wrote",
        secret_path.display()
    );
    eprintln!(
        "{:>12} `{}`; trust it in farm.toml with:",
        "wrote",
        public_path.display()
    );
    println!("trusted-public-keys = [\"{public}\"]");
    Ok(())
}
