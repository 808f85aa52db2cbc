//! `farm store …`: look inside the store and check it.

use clap::{Args, Subcommand};

use crate::build::realise::RealiseOptions;
use crate::maintain::verify::{AsideReason, repair, to_set_aside, verify_store};
use crate::progress::Reporter;
use crate::project::Project;
use crate::project::ProjectOptions;
use crate::store::{Store, UseMode, VerifyDepth};

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// List the store's entries: directory, size, parent.
    Ls,
    /// Check every file of every entry (disk, boot files, metadata) against the hashes
    /// recorded when it was committed, and every backing chain.
    Verify(VerifyArgs),
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
