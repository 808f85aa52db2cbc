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
fn store_dir(options: &ProjectOptions) -> std::path::PathBuf {
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
    let store = Store::open(&store_dir(options))?;
    let entries = store.entries()?;
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
            if bad > 0 {
                anyhow::bail!(
                    "{bad} of {} store entries failed verification",
                    entries.len()
                );
            }
            reporter.line(format!("{:>12} {} entries", "verified", entries.len()));
        }
    }
    Ok(())
}
