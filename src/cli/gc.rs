//! `farm gc`: remove store entries nothing needs, and the leftovers around them.

use std::time::Duration;

use clap::Args;

use crate::maintain::gc::{GcError, GcOptions, gc};
use crate::model::values::ByteSize;
use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions};
use crate::store::{Store, StoreError};

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Print what would be removed and why the rest stays; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep this entry (directory or label, as `farm store ls` shows) or what this
    /// farm.toml calls NAME (image, platform, VM), with everything it backs onto.
    #[arg(long, value_name = "NAME")]
    pub keep: Vec<String>,
    /// Only remove entries built at least this long ago: `30m`, `12h`, `7d`, `2w`.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub older_than: Option<Duration>,
    /// Remove only as much (oldest first) as brings the store under this size: `20G`.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// List every kept entry with the reason it stays.
    #[arg(long)]
    pub why: bool,
}

pub fn run(options: &ProjectOptions, args: GcArgs, reporter: &Reporter) -> anyhow::Result<()> {
    // Without a farm.toml here, gc keeps what the registered projects need; with one, it
    // must be valid: keeping the wrong set is worse than stopping.
    let project = match options.config.exists() {
        true => Some(Project::load(options)?),
        false => {
            reporter.line(format!(
                "{:>12} `{}` does not exist: keeping what registered projects need",
                "note",
                options.config.display()
            ));
            None
        }
    };
    let dir = match &project {
        Some(p) => p.store_dir.clone(),
        None => options.store_dir(),
    };
    let store = Store::open_existing(&dir)?.ok_or(StoreError::NoStore { path: dir })?;
    let report = gc(
        &store,
        project.as_ref(),
        &GcOptions {
            dry_run: args.dry_run,
            keep: args.keep,
            older_than: args.older_than,
            max_size: args.max_size,
        },
        reporter,
    )
    .map_err(|e| match e {
        // Unwrapped, so the exit code sees bad input (2).
        GcError::Usage(usage) => anyhow::Error::from(usage),
        GcError::Store(store) => anyhow::Error::from(store),
    })?;
    let plan = &report.plan;
    if args.why || args.dry_run {
        for (name, reason) in &plan.keep {
            reporter.line(format!("{:>12} {name}: {reason}", "keep"));
        }
    }
    for (name, reason) in &plan.missing_roots {
        reporter.line(format!(
            "{:>12} `{name}` ({reason}) is not in the store",
            "note"
        ));
    }
    let would = if args.dry_run { "would free" } else { "freed" };
    reporter.status(
        "done",
        format!(
            "{would} {} in {} entries, kept {}; {} leftovers ({}); {} gc roots of gone projects",
            crate::model::text::human_bytes(plan.freed_bytes),
            plan.remove.len(),
            plan.keep.len(),
            report.swept.items,
            crate::model::text::human_bytes(report.swept.bytes),
            report.forgotten_roots.len()
        ),
    );
    Ok(())
}

fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not an age: write a number and a unit, like `7d`"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "`{text}` has no unit farm knows: use s, m, h, d or w"
            ));
        }
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<ByteSize>().map(|s| s.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_sizes() {
        assert_eq!(parse_age("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_age("90m").unwrap(), Duration::from_secs(5400));
        assert!(parse_age("7").unwrap_err().contains("no unit"));
        assert!(parse_age("soon").is_err());
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
    }
}
