//! Applying a build plan: each missing derivation is realised into a staging directory and
//! committed to the store under its lock, parents first.
//!
//! Concurrency: two farm processes realising the same derivation serialise on the entry's
//! lock; the second finds the entry committed and does nothing. A crash leaves only a
//! staging directory, which the next `stage` of the same key removes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::build::layer::{BootFiles, LayerBuild};
use crate::fetch::{self, Compression, Download};
use crate::model::config::{Config, ImageSource};
use crate::model::derivation::{DrvId, DrvNode};
use crate::model::hash::{ContentHash, DrvHash};
use crate::model::plan::{Action, BuildPlan};
use crate::model::qemu::{MachineSpec, choose_accel};
use crate::model::values::{Accel, DiskFormat};
use crate::progress::Reporter;
use crate::store::{Entry, EntryMeta, LAYOUT_VERSION, Staging, Store, relative_backing};
use crate::sys::qemu_img;
use std::time::Duration;

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
        "Image `{name}`: `{url}` matches its declared {algo}, but the file itself is broken: {detail}\nhint: the file as published is damaged (and its checksum was taken of the damaged file): use another mirror or release of the image, and its own checksum"
    )]
    BrokenPublished {
        name: String,
        url: String,
        algo: &'static str,
        detail: String,
    },
}

/// A downloaded image that matched its declared hash but does not unpack was broken when
/// it was published: fetching it again cannot help, and the error must not say it might.
fn broken_published(name: &str, url: &str, algo: &'static str, e: BoxError) -> BuildError {
    match e.downcast::<fetch::FetchError>() {
        Ok(decompress) if matches!(*decompress, fetch::FetchError::Decompress { .. }) => {
            let fetch::FetchError::Decompress {
                compression,
                source,
                ..
            } = *decompress
            else {
                unreachable!("matched above")
            };
            BuildError::BrokenPublished {
                name: name.to_string(),
                url: url.to_string(),
                algo,
                detail: format!("it is not a valid {compression} stream ({source})"),
            }
        }
        Ok(other) => BuildError::Failed {
            name: name.to_string(),
            source: other,
        },
        Err(other) => BuildError::Failed {
            name: name.to_string(),
            source: other,
        },
    }
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
        }
    }
}

/// Under TCG a Debian guest takes ~20 s to reach ssh; leave room for slow, busy machines.
pub const DEFAULT_BOOT_TIMEOUT_SECS: u64 = 300;

/// How many derivations to build at once when not told: one per core, as long as memory
/// holds a build VM (up to 2 GiB) for each.
pub fn default_jobs() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let by_memory = crate::sys::hostinfo::memory_available()
        .map_or(cores as u64, |bytes| bytes / (2 << 30)) as usize;
    cores.min(by_memory).max(1)
}

/// Realises `plan`, up to `options.jobs` derivations at once, each as soon as its parent is
/// in the store; returns the store entry of every derivation. The first failure stops new
/// work; what is already running finishes (its entry is committed or discarded whole).
pub fn realise(
    config: &Config,
    plan: &BuildPlan,
    store: &Store,
    options: &RealiseOptions,
    reporter: &Reporter,
) -> Result<BTreeMap<DrvId, Entry>, BuildError> {
    struct Schedule {
        done: BTreeMap<DrvId, Entry>,
        running: usize,
        taken: Vec<bool>,
        failed: Option<BuildError>,
    }
    let in_plan: std::collections::BTreeSet<&DrvId> =
        plan.steps.iter().map(|s| &s.node.id).collect();
    let schedule = std::sync::Mutex::new(Schedule {
        done: BTreeMap::new(),
        running: 0,
        taken: vec![false; plan.steps.len()],
        failed: None,
    });
    let changed = std::sync::Condvar::new();
    let context = Context {
        config,
        store,
        options,
        reporter,
    };
    let worker = || {
        loop {
            let mut s = schedule.lock().unwrap_or_else(|e| e.into_inner());
            let index = loop {
                if s.failed.is_some() {
                    return;
                }
                let ready = (0..plan.steps.len()).find(|&i| {
                    let node = &plan.steps[i].node;
                    !s.taken[i]
                        && node
                            .parent
                            .as_ref()
                            .is_none_or(|p| !in_plan.contains(p) || s.done.contains_key(p))
                });
                match ready {
                    Some(i) => break i,
                    None if s.running == 0 => return,
                    None => s = changed.wait(s).unwrap_or_else(|e| e.into_inner()),
                }
            };
            s.taken[index] = true;
            s.running += 1;
            let step = &plan.steps[index];
            let node = &step.node;
            let parent = node.parent.as_ref().and_then(|p| s.done.get(p)).cloned();
            let boot = boot_files_for(plan, &s.done, node);
            drop(s);
            let result = match lookup(store, node) {
                Ok(Some(entry)) => Ok(entry),
                Ok(None) => realise_one(&context, node, &step.action, parent.as_ref(), boot),
                Err(e) => Err(e),
            };
            let mut s = schedule.lock().unwrap_or_else(|e| e.into_inner());
            s.running -= 1;
            match result {
                Ok(entry) => {
                    s.done.insert(node.id.clone(), entry);
                }
                Err(e) => {
                    s.failed.get_or_insert(e);
                }
            }
            changed.notify_all();
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..options.jobs.max(1).min(plan.steps.len().max(1)) {
            scope.spawn(worker);
        }
        worker();
    });
    let s = schedule.into_inner().unwrap_or_else(|e| e.into_inner());
    match s.failed {
        Some(e) => Err(e),
        None => Ok(s.done),
    }
}

fn lookup(store: &Store, node: &DrvNode) -> Result<Option<Entry>, BuildError> {
    store
        .lookup(&node.hash, &node.name)
        .map_err(failed(&node.name))
}

/// The boot files a derivation's output boots with: the nearest ancestor's (or its own)
/// `boot/`. None means the disk boots through firmware and its own bootloader.
pub(super) fn boot_files_for(
    plan: &BuildPlan,
    entries: &BTreeMap<DrvId, Entry>,
    node: &DrvNode,
) -> Option<BootFiles> {
    let mut current = node.parent.clone();
    while let Some(id) = current {
        if let Some(boot) = entries
            .get(&id)
            .and_then(|e| e.boot_dir())
            .and_then(|dir| BootFiles::in_dir(&dir))
        {
            return Some(boot);
        }
        current = plan
            .steps
            .iter()
            .find(|s| s.node.id == id)
            .and_then(|s| s.node.parent.clone());
    }
    None
}

/// What every realisation needs besides the derivation itself.
pub(super) struct Context<'a> {
    pub(super) config: &'a Config,
    pub(super) store: &'a Store,
    pub(super) options: &'a RealiseOptions,
    pub(super) reporter: &'a Reporter,
}

fn realise_one(
    cx: &Context,
    node: &DrvNode,
    action: &Action,
    parent: Option<&Entry>,
    boot: Option<BootFiles>,
) -> Result<Entry, BuildError> {
    let (store, reporter) = (cx.store, cx.reporter);
    let name = node.name.as_str();
    let lock = match store.try_lock(&node.hash).map_err(failed(name))? {
        Some(lock) => lock,
        None => {
            reporter.line(format!(
                "waiting for another farm process building `{name}`"
            ));
            store.lock(&node.hash).map_err(failed(name))?
        }
    };
    if let Some(entry) = lookup(store, node)? {
        reporter.line(format!(
            "{:>12} {name} (built by another farm process)",
            "cached"
        ));
        return Ok(entry);
    }
    let started = Instant::now();
    let mut staging = store.stage(&lock, name).map_err(failed(name))?;
    let output = match (
        produce(cx, node, action, parent, boot.clone(), &staging, started),
        action,
    ) {
        (
            Err(e),
            Action::Substitute {
                from,
                fallback: Some(fallback),
                ..
            },
        ) => {
            reporter.warn(format!(
                "{}; building `{name}` instead",
                crate::sys::ssh::error_chain(&e).replace('\n', " ")
            ));
            let _ = from;
            drop(staging);
            staging = store.stage(&lock, name).map_err(failed(name))?;
            produce(cx, node, fallback, parent, boot, &staging, started)?
        }
        (result, _) => result?,
    };
    let (output_blake3, size) = output;
    let meta = EntryMeta {
        layout: LAYOUT_VERSION,
        name: name.to_string(),
        drv_hash: node.hash,
        derivation: serde_json::to_value(&node.derivation).expect("derivations serialize"),
        output_blake3,
        size,
        parent: parent.map(|p| p.dir_name().to_string()),
        built_at_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        build_seconds: started.elapsed().as_secs_f64(),
        disk_mtime_ns: None,
        files: Default::default(),
        meta_blake3: None,
    };
    let entry = store.commit(staging, meta).map_err(failed(name))?;
    drop(lock);
    Ok(entry)
}

/// Makes the derivation's output in `staging` (download, import, mmdebstrap, tiny image,
/// layer build) and returns its disk's blake3 and size. Commits nothing.
pub(super) fn produce(
    cx: &Context,
    node: &DrvNode,
    action: &Action,
    parent: Option<&Entry>,
    boot: Option<BootFiles>,
    staging: &Staging,
    started: Instant,
) -> Result<(ContentHash, u64), BuildError> {
    let (config, store, options, reporter) = (cx.config, cx.store, cx.options, cx.reporter);
    let name = node.name.as_str();
    let output = match (action, &node.id) {
        (Action::Fetch { url }, DrvId::Image { image, .. }) => {
            let ImageSource::Url { hash, .. } = &config.images[image].source else {
                unreachable!("fetch actions come from url images")
            };
            let bar = reporter.bytes_for("fetch", &format!("{name} from {url}"), None);
            // Retries and cut-offs are problems, shown even with `--quiet`; resumes are news.
            let say = |line: &str| match line.strip_prefix("warning: ") {
                Some(warning) => reporter.warn(warning),
                None => reporter.line(line),
            };
            let downloaded = fetch::download(
                &Download {
                    url,
                    expected: hash,
                    partial: &store.partial_path(&node.hash),
                    attempts: options.fetch_attempts,
                    stall_timeout: options.fetch_timeout,
                    say: &say,
                },
                &bar,
            )
            .map_err(failed(name))?;
            bar.finish_and_clear();
            let format = config.images[image].format;
            let out = place_image(
                &downloaded.path,
                downloaded.compression,
                Some(downloaded.blake3),
                format,
                staging,
                true,
                reporter,
            )
            .map_err(|e| broken_published(name, url, hash.algo.name(), e))?;
            reporter.line(format!(
                "{:>12} {name} from {url} ({}, verified {})",
                "fetched",
                human_bytes(downloaded.size),
                hash.algo.name()
            ));
            out
        }
        (Action::Import { path }, DrvId::Image { image, .. }) => {
            let img = &config.images[image];
            let ImageSource::Path { hash, .. } = &img.source else {
                unreachable!("import actions come from path images")
            };
            let bar =
                reporter.bytes_for("import", &format!("{name} from `{}`", path.display()), None);
            let hashes = match hash {
                Some(expected) => fetch::verify_file(path, expected, &bar),
                None => fetch::hash_file(path, None, &bar),
            }
            .map_err(failed(name))?;
            bar.finish_and_clear();
            let compression =
                Compression::detect(path, &path.to_string_lossy()).map_err(failed(name))?;
            let out = place_image(
                path,
                compression,
                Some(hashes.blake3),
                img.format,
                staging,
                false,
                reporter,
            )
            .map_err(|e| BuildError::Failed {
                name: name.to_string(),
                source: e,
            })?;
            reporter.line(format!(
                "{:>12} {name} from `{}`",
                "imported",
                path.display()
            ));
            out
        }
        (Action::Layer { steps: 0 }, DrvId::Platform { .. }) => {
            let parent = parent.expect("parents are realised first");
            empty_layer(staging, parent).map_err(failed(name))?;
            reporter.line(format!(
                "{:>12} {name} (empty layer on {})",
                "built",
                parent.dir_name()
            ));
            staging.hash_disk().map_err(failed(name))?
        }
        (Action::Layer { .. }, DrvId::Platform { platform, target }) => {
            let parent = parent.expect("parents are realised first");
            let target = &config.targets[target];
            let platform = &config.platforms[platform];
            let host_arch = crate::sys::hostinfo::host_arch().unwrap_or(target.arch);
            let accel = choose_accel(
                options.accel.unwrap_or(target.accel),
                crate::sys::hostinfo::kvm_facts(),
                host_arch,
                target.arch,
            );
            let build = LayerBuild {
                name,
                platform,
                recipe: &node.derivation.recipe,
                parent,
                boot,
                staging,
                hw: MachineSpec {
                    arch: target.arch,
                    machine: target.machine.clone(),
                    cpu: target.cpu.clone(),
                    accel,
                    memory_mib: platform
                        .resources
                        .memory
                        .map(|m| m.mib())
                        .unwrap_or(1024)
                        .max(1024),
                    cpus: std::thread::available_parallelism()
                        .map(|n| n.get() as u32)
                        .unwrap_or(1)
                        .min(4),
                },
                boot_timeout: options.boot_timeout,
                log: &store.log_path(&node.hash, name),
            };
            crate::build::layer::build_layer(&build, reporter).map_err(|source| {
                BuildError::Layer {
                    name: name.to_string(),
                    source: Box::new(source),
                }
            })?;
            reporter.line(format!(
                "{:>12} {name} ({} steps, {:.0} s, {accel})",
                "built",
                node_step_count(config, &node.id),
                started.elapsed().as_secs_f64()
            ));
            staging.hash_disk().map_err(failed(name))?
        }
        (Action::Debootstrap { .. }, DrvId::Image { image, arch }) => {
            let ImageSource::Debian(spec) = &config.images[image].source else {
                unreachable!("debootstrap actions come from debian images")
            };
            let arch = arch.expect("Debian image ids carry an arch");
            let bar = reporter.spinner(name, "mmdebstrap");
            let report = crate::build::debian_image::build_debian_image(
                &crate::build::debian_image::DebianImageRequest {
                    spec,
                    arch,
                    out_dir: staging.dir(),
                    log: &store.log_path(&node.hash, name),
                },
                &bar,
            )
            .map_err(|source| BuildError::Debian {
                name: name.to_string(),
                source: Box::new(source),
            })?;
            bar.finish_and_clear();
            reporter.line(format!(
                "{:>12} {name} (Debian {} {}, kernel {}, {}, {:.0} s)",
                "built",
                spec.suite,
                arch.debian_name(),
                report.kernel_version,
                human_bytes(report.disk_file_bytes),
                started.elapsed().as_secs_f64()
            ));
            staging.hash_disk().map_err(failed(name))?
        }
        (Action::BuildTiny, DrvId::Image { arch, .. }) => {
            let arch = arch.expect("tiny image ids carry an arch");
            let bar = reporter.spinner(name, "tiny image");
            let report = crate::build::tiny_image::build_tiny_image(
                &crate::build::tiny_image::TinyImageRequest {
                    arch,
                    out_dir: staging.dir(),
                    log: &store.log_path(&node.hash, name),
                    cache_dir: &store.deb_cache_dir(),
                },
                &bar,
            )
            .map_err(|source| BuildError::Tiny {
                name: name.to_string(),
                source: Box::new(source),
            })?;
            bar.finish_and_clear();
            reporter.line(format!(
                "{:>12} {name} (tiny: kernel {}, {} modules, {}, {:.0} s)",
                "built",
                report.kernel_version,
                report.modules.len(),
                human_bytes(report.disk_file_bytes),
                started.elapsed().as_secs_f64()
            ));
            staging.hash_disk().map_err(failed(name))?
        }
        (Action::Substitute { from, .. }, _) => {
            let substitution = options
                .substitution
                .as_ref()
                .expect("substitute steps come with their caches");
            let offer = &substitution.offers[&node.hash];
            let bar = reporter.bytes_for(
                "substitute",
                &format!("{name} from {from}"),
                Some(offer.record.download_size()),
            );
            let output = substitution
                .caches
                .fetch(offer, parent, staging.dir(), &|n| bar.inc(n))
                .map_err(failed(name))?;
            bar.finish_and_clear();
            reporter.line(format!(
                "{:>12} {name} from {from} ({}, {:.0} s, signature and hashes checked)",
                "substituted",
                human_bytes(offer.record.download_size()),
                started.elapsed().as_secs_f64()
            ));
            output
        }
        (action, id) => unreachable!("plan gave {action:?} for {id:?}"),
    };
    Ok(output)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Puts an image file into `staging` as `disk.qcow2`: decompressing, converting raw to
/// qcow2, and moving (downloads, which the store owns) or copying (the user's files).
/// Returns the disk's blake3 and size, reusing `known_blake3` when the bytes are unchanged.
fn place_image(
    src: &Path,
    compression: Compression,
    known_blake3: Option<ContentHash>,
    format: Option<DiskFormat>,
    staging: &Staging,
    owned: bool,
    reporter: &Reporter,
) -> Result<(ContentHash, u64), BoxError> {
    let unpacked = staging.dir().join("image");
    let mut blake3 = known_blake3;
    if compression == Compression::None {
        if owned {
            fs_err::rename(src, &unpacked)?;
        } else {
            fs_err::copy(src, &unpacked)?;
        }
    } else {
        let bar = reporter.bytes_for("unpack", &src.display().to_string(), None);
        let (_, out_hash) = fetch::decompress(src, compression, &unpacked, &bar)?;
        bar.finish_and_clear();
        blake3 = Some(out_hash);
        if owned {
            fs_err::remove_file(src)?;
        }
    }
    let is_qcow2 = match format {
        Some(f) => f == DiskFormat::Qcow2,
        None => has_qcow2_magic(&unpacked)?,
    };
    if is_qcow2 {
        fs_err::rename(&unpacked, staging.disk_path())?;
        let size = fs_err::metadata(staging.disk_path())?.len();
        match blake3 {
            Some(hash) => Ok((hash, size)),
            None => Ok(staging.hash_disk()?),
        }
    } else {
        qemu_img::convert_to_qcow2(&unpacked, "raw", &staging.disk_path())?;
        fs_err::remove_file(&unpacked)?;
        Ok(staging.hash_disk()?)
    }
}

fn has_qcow2_magic(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = fs_err::File::open(path)?;
    let n = file.read(&mut magic)?;
    Ok(n == 4 && &magic == b"QFI\xfb")
}

/// A platform without steps: an empty overlay whose backing file is the parent's entry,
/// recorded relative so the store can move.
fn empty_layer(staging: &Staging, parent: &Entry) -> Result<(), qemu_img::QemuImgError> {
    let disk = staging.disk_path();
    qemu_img::create_overlay(&disk, &parent.disk_path(), None)?;
    qemu_img::rebase_unsafe(&disk, &relative_backing(parent))
}

fn node_step_count(config: &Config, id: &DrvId) -> usize {
    match id {
        DrvId::Platform { platform, .. } => config.platforms[platform].steps.count(),
        DrvId::Image { .. } => 0,
    }
}

pub fn human_bytes(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
}

/// The store hashes of every entry present and intact, for planning (a damaged entry is
/// an error, not "cached").
pub fn present_hashes<'a>(
    store: &Store,
    nodes: impl IntoIterator<Item = &'a DrvNode>,
) -> Result<std::collections::BTreeSet<DrvHash>, crate::store::StoreError> {
    let mut present = std::collections::BTreeSet::new();
    for node in nodes {
        if store.lookup_intact(&node.hash, &node.name)?.is_some() {
            present.insert(node.hash);
        }
    }
    Ok(present)
}
