//! What realising a plan shares between the scheduler (`realise`), the producers
//! (`produce`) and `reproduce`: the options and context of a run, its error, and the small
//! helpers they all use. A leaf: it imports none of them.

use std::time::Duration;

use crate::build::layer::BootFiles;
use crate::fetch;
use crate::model::config::Config;
use crate::model::values::Accel;
use crate::progress::Reporter;
use crate::store::{Entry, Store};

/// How many times a download is attempted (each attempt resumes) before giving up.
pub const DEFAULT_FETCH_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("Cannot build `{name}`")]
    Failed {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Cannot build `{name}`")]
    Layer {
        name: String,
        #[source]
        source: Box<crate::build::layer::BuilderError>,
    },
    #[error("Cannot build image `{name}` from a Debian mirror")]
    Debian {
        name: String,
        #[source]
        source: Box<crate::build::debian_image::DebianImageError>,
    },
    #[error("Cannot build the tiny image `{name}`")]
    Tiny {
        name: String,
        #[source]
        source: Box<crate::build::tiny_image::TinyImageError>,
    },
    #[error("The build was interrupted")]
    Interrupted,
    #[error(
        "Image `{name}`: `{origin}` matches its declared {algo}, but the file itself is broken: {detail}\nhint: {hint}"
    )]
    BrokenPublished {
        name: String,
        /// The `url` or `path` it came from.
        origin: String,
        algo: &'static str,
        detail: String,
        hint: &'static str,
    },
}

pub(super) fn failed<E: std::error::Error + Send + Sync + 'static>(
    name: &str,
) -> impl FnOnce(E) -> BuildError {
    let name = name.to_string();
    move |source| BuildError::Failed {
        name,
        source: Box::new(source),
    }
}

/// Options that come from the command line or environment, not from farm.toml.
#[derive(Clone, Debug)]
pub struct RealiseOptions {
    pub fetch_attempts: u32,
    /// How long a download may go without a byte before it counts as stalled.
    pub fetch_timeout: Duration,
    /// Overrides every target's `accel` (`--accel`, `FARM_ACCEL`).
    pub accel: Option<Accel>,
    /// How long a build VM may take to answer ssh.
    pub boot_timeout: Duration,
    /// How many derivations are built at once.
    pub jobs: usize,
    /// The caches `Substitute` steps fetch from (set by `plan_with_caches`).
    pub substitution: Option<std::sync::Arc<crate::build::substitution::Substitution>>,
    /// Resume layer builds from step checkpoints and keep new ones (`false` for
    /// `--no-checkpoints` and `--check`, which must run every step).
    pub step_checkpoints: bool,
}

impl Default for RealiseOptions {
    fn default() -> Self {
        Self {
            fetch_attempts: DEFAULT_FETCH_ATTEMPTS,
            fetch_timeout: fetch::DEFAULT_STALL_TIMEOUT,
            accel: None,
            boot_timeout: Duration::from_secs(DEFAULT_BOOT_TIMEOUT_SECS),
            jobs: 1,
            substitution: None,
            step_checkpoints: true,
        }
    }
}

/// Under TCG a Debian guest takes ~20 s to reach ssh; leave room for slow, busy machines.
pub const DEFAULT_BOOT_TIMEOUT_SECS: u64 = 300;

/// What every realisation needs besides the derivation itself.
pub(super) struct Context<'a> {
    pub(super) config: &'a Config,
    pub(super) store: &'a Store,
    pub(super) options: &'a RealiseOptions,
    pub(super) reporter: &'a Reporter,
}

/// What a derivation is made on: its parent's entry and the boot files it builds with.
pub(super) struct Ancestry {
    pub(super) parent: Option<Entry>,
    pub(super) boot: Option<BootFiles>,
}
