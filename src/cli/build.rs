//! `farm build [NAME…]` and `farm plan`: load → validate → plan → print or apply
//! (`build::missing`).

use anyhow::Context;
use clap::Args;

use crate::build::missing::{LockOutcome, build_and_lock, plan_missing};
use crate::build::realise::RealiseOptions;
pub use crate::build::realise::default_jobs;
use crate::build::reproduce::{Outcome, rebuild_and_compare};
use crate::build::substitution::CacheChoice;
use crate::model::build::derivation::DrvId;
use crate::model::build::plan::plan_build;
use crate::model::values::Accel;
use crate::progress::Reporter;
use crate::project::UsageError;
use crate::project::{Project, ProjectOptions};
use crate::run::lab::state_dir_for;
use crate::store::Store;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Images, platforms, `<platform>_<target>` names or VMs to build [default: all that
    /// farm.toml's VMs use, every unused platform, and every image].
    pub names: Vec<String>,
    /// Print the plan (cached / fetch / build for each derivation) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub fetch: FetchArgs,
    /// Accelerator for build VMs, overriding every target's `accel`: auto, kvm or tcg.
    #[arg(long, env = "FARM_ACCEL", value_enum)]
    pub accel: Option<AccelArg>,
    /// Seconds a build VM may take to answer ssh before the build fails.
    #[arg(long, env = "FARM_BOOT_TIMEOUT", default_value_t = crate::build::realise::DEFAULT_BOOT_TIMEOUT_SECS)]
    pub boot_timeout: u64,
    /// How many derivations to build at once [default: what cores and memory allow].
    #[arg(short, long, env = "FARM_JOBS")]
    pub jobs: Option<usize>,
    /// Fail, naming each image or platform and what changed, when a derivation differs
    /// from farm.lock; farm.lock is left as it is.
    #[arg(long, env = "FARM_LOCKED")]
    pub locked: bool,
    /// Build what is already in the store again, into scratch directories, and report
    /// whether each output is the same bit for bit; the store is not changed.
    #[arg(long, conflicts_with = "dry_run")]
    pub check: bool,
    /// Run every step of the platforms built, ignoring step checkpoints and keeping none.
    #[arg(long)]
    pub no_checkpoints: bool,
    /// With `--check`: fail when an output differs.
    #[arg(long, requires = "check")]
    pub strict: bool,
    #[command(flatten)]
    pub caches: SubstituteArgs,
}

/// How downloads behave, for `build` and `up`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// How many times a download is attempted, each resuming where the last stopped.
    #[arg(
        long,
        env = "FARM_FETCH_ATTEMPTS",
        default_value_t = crate::build::realise::DEFAULT_FETCH_ATTEMPTS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub fetch_attempts: u32,
    /// Seconds a download may go without receiving a byte before it counts as stalled
    /// (and is retried).
    #[arg(
        long,
        env = "FARM_FETCH_TIMEOUT",
        default_value_t = crate::fetch::DEFAULT_STALL_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub fetch_timeout: u64,
}

impl FetchArgs {
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.fetch_timeout)
    }
}

/// Which binary caches to ask, for `build`, `plan` and `up`.
#[derive(Debug, Args)]
pub struct SubstituteArgs {
    /// A binary cache to ask before building (before farm.toml's `substituters`); may be
    /// given more than once. `FARM_SUBSTITUTERS` takes space-separated URLs.
    #[arg(
        long = "substituter",
        value_name = "URL",
        env = "FARM_SUBSTITUTERS",
        value_delimiter = ' '
    )]
    pub substituters: Vec<String>,
    /// Ask no binary cache: build (or fetch) everything that is missing.
    #[arg(long)]
    pub no_substitute: bool,
}

impl SubstituteArgs {
    /// The caches to ask; each URL given here is checked like farm.toml's.
    pub fn choice(&self) -> anyhow::Result<CacheChoice> {
        for url in &self.substituters {
            cache_url(url, "--substituter ")?;
        }
        Ok(CacheChoice {
            extra: self.substituters.clone(),
            disabled: self.no_substitute,
            timeouts: Default::default(),
        })
    }
}

/// Checks a cache URL given on the command line as farm.toml's are checked; `said` goes
/// before the message (`--substituter `).
pub(super) fn cache_url(url: &str, said: &str) -> Result<(), UsageError> {
    crate::model::config::limits::substituter(url).map_err(|r| UsageError {
        message: format!("{said}{}", r.message),
        hint: r.hint,
    })
}

/// `--accel` values (clap's view of `Accel`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

impl From<AccelArg> for Accel {
    fn from(a: AccelArg) -> Accel {
        match a {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
        }
    }
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// As for `farm build`.
    pub names: Vec<String>,
    #[command(flatten)]
    pub caches: SubstituteArgs,
}

pub fn plan(options: &ProjectOptions, args: PlanArgs, reporter: &Reporter) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    // Planning only reads: no store is made.
    let store = Store::open_existing(&project.store_dir)?;
    let wanted = project.resolve_all(&args.names)?;
    let caches = args.caches.choice()?;
    let (plan, _) =
        plan_missing::<anyhow::Error>(&project, store.as_ref(), &wanted, &caches, reporter)?;
    print!("{plan}");
    Ok(())
}

pub fn run(options: &ProjectOptions, args: BuildArgs, reporter: &Reporter) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let wanted = project.resolve_all(&args.names)?;
    let locked = match args.locked {
        true => Some(project.check_locked(&wanted)?),
        false => None,
    };
    let caches = args.caches.choice()?;
    if args.dry_run {
        let store = Store::open_existing(&project.store_dir)?;
        let (plan, _) =
            plan_missing::<anyhow::Error>(&project, store.as_ref(), &wanted, &caches, reporter)?;
        print!("{plan}");
        return Ok(());
    }
    let store = open_store(&project)?;
    let _store_use = store.use_shared(reporter)?;
    let realise_options = RealiseOptions {
        fetch_attempts: args.fetch.fetch_attempts,
        fetch_timeout: args.fetch.timeout(),
        accel: args.accel.map(Accel::from),
        boot_timeout: std::time::Duration::from_secs(args.boot_timeout),
        jobs: args.jobs.unwrap_or_else(default_jobs),
        substitution: None,
        // A check must run every step again: a checkpoint would only repeat the store.
        step_checkpoints: !args.no_checkpoints && !args.check,
    };
    if args.check {
        return check_reproducible(&project, &store, &wanted, &args, &realise_options, reporter);
    }
    let (built, lock) = build_and_lock::<anyhow::Error>(
        &project,
        &store,
        &wanted,
        &caches,
        &realise_options,
        &state_dir_for(&project, None),
        locked.as_ref(),
        reporter,
    )?;
    if built.plan.is_noop() {
        reporter.line(format!(
            "{:>12} all {} derivations are cached",
            "done",
            built.plan.steps.len()
        ));
    }
    match lock {
        LockOutcome::Written(path) => {
            reporter.line(format!("{:>12} `{}`", "locked", path.display()));
        }
        LockOutcome::Unchanged => {}
        // Built here from the same derivation (an `upgrade` is not bit-reproducible):
        // worth knowing, not an error.
        LockOutcome::Kept { differs } => {
            for d in differs {
                reporter.warn(format!(
                    "`{}` was built from the locked derivation but its output differs from \
                     farm.lock's ({}, locked {}): it is not bit-reproducible; \
                     `farm build --check {}` tells whether it ever is",
                    d.name, d.built, d.locked, d.name
                ));
            }
        }
    }
    Ok(())
}

/// `--check [--strict]`.
fn check_reproducible(
    project: &Project,
    store: &Store,
    ids: &[DrvId],
    args: &BuildArgs,
    options: &RealiseOptions,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let plan = plan_build(&project.graph, ids, &Default::default());
    let checked =
        rebuild_and_compare(&project.loaded.config, &plan, ids, store, options, reporter)?;
    let differs: Vec<&str> = checked
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Differs { .. }))
        .map(|c| c.node.name.as_str())
        .collect();
    let same = checked
        .iter()
        .filter(|c| c.outcome == Outcome::Same)
        .count();
    reporter.line(format!(
        "{:>12} {same} reproduced, {} differ, {} fixed-output",
        "checked",
        differs.len(),
        checked.len() - same - differs.len()
    ));
    if args.strict && !differs.is_empty() {
        anyhow::bail!(
            "{} not reproducible: `{}`\nhint: a step whose result depends on time or the \
             network (`upgrade`, package installs from a moving mirror) cannot be; pin it or \
             drop `--strict`",
            match differs.len() {
                1 => "1 derivation is".to_string(),
                n => format!("{n} derivations are"),
            },
            differs.join("`, `")
        );
    }
    Ok(())
}

pub fn open_store(project: &Project) -> anyhow::Result<Store> {
    Store::open(&project.store_dir)
        .with_context(|| format!("Cannot open the store `{}`", project.store_dir.display()))
}
