//! `farm store …`: look inside the store and check it.

use clap::Subcommand;

use crate::progress::Reporter;
use crate::project::ProjectOptions;
use crate::store::Store;

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// List the store's entries: directory, size, parent.
    Ls,
    /// Re-hash every entry's disk and compare with the blake3 recorded when it was built.
    Verify,
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
    let (entries, problems) = store.scan()?;
    for problem in &problems {
        reporter.warn(problem.to_string());
    }
    match command {
        StoreCommand::Ls => {
            for entry in entries {
                println!(
                    "{}\t{}\t{}",
                    entry.dir_name(),
                    crate::build::realise::human_bytes(entry.meta.size),
                    entry.meta.parent.as_deref().unwrap_or("-")
                );
            }
        }
        StoreCommand::Verify => {
            let mut bad = 0;
            for entry in &entries {
                match store.verify(entry) {
                    Ok(()) => reporter.line(format!("{:>12} {}", "ok", entry.dir_name())),
                    Err(e) => {
                        bad += 1;
                        eprintln!("error: {e}");
                    }
                }
            }
            if bad > 0 || !problems.is_empty() {
                let mut what = Vec::new();
                if bad > 0 {
                    what.push(format!(
                        "{bad} of {} entries failed verification",
                        entries.len()
                    ));
                }
                if !problems.is_empty() {
                    what.push(format!(
                        "{} item(s) in `{}` are not entries",
                        problems.len(),
                        store.root().join("store").display()
                    ));
                }
                anyhow::bail!("The store is damaged: {}", what.join("; "));
            }
            reporter.line(format!("{:>12} {} entries", "verified", entries.len()));
        }
    }
    Ok(())
}
