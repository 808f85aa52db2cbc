//! Realising one derivation: under its lock, its output is produced in a staging directory
//! (downloading or importing an image, building one from a Debian mirror or farm's tiny
//! recipe, booting a build VM for a platform's steps) or substituted from a binary cache,
//! then committed to the store. `realise` schedules these; `reproduce` calls `produce`
//! alone and commits nothing.
//!
//! `realise_one`, `realise_appliance` and `produce` live together because they recurse: a
//! chroot layer's production realises farm's appliance first.

use std::path::Path;
use std::time::Instant;

use super::context::{Ancestry, BuildError, Context, failed};
use crate::build::layer::{Appliance, BootFiles, LayerBuild};
use crate::fetch::{self, Compression, Download};
use crate::model::build::derivation::{DrvNode, Make};
use crate::model::build::plan::Action;
use crate::model::build::qemu::{MachineSpec, choose_accel};
use crate::model::hash::ContentHash;
use crate::model::text::human_bytes;
use crate::model::values::{Arch, Builder, DiskFormat};
use crate::progress::Reporter;
use crate::store::{Entry, EntryMeta, LAYOUT_VERSION, Staging, Store, relative_backing};
use crate::sys::qemu_img;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(super) fn lookup(store: &Store, node: &DrvNode) -> Result<Option<Entry>, BuildError> {
    store
        .lookup(&node.hash, &node.name)
        .map_err(failed(&node.name))
}

/// Realises one derivation under its lock. `ancestry` blocks until the parent is in the
/// store (None: the run failed meanwhile); a substitution calls it only after downloading.
pub(super) fn realise_one(
    cx: &Context,
    node: &DrvNode,
    action: &Action,
    ancestry: &dyn Fn() -> Option<Ancestry>,
) -> Result<Entry, BuildError> {
    let (store, reporter) = (cx.store, cx.reporter);
    let name = node.name.as_str();
    let parent_failed = || failed(name)(std::io::Error::other("its parent could not be made"));
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
    // Everything but a substitution needs its parent in the store before it starts.
    let build = |make: &Make, staging: &Staging| {
        let ancestry = ancestry().ok_or_else(parent_failed)?;
        let output = produce(
            cx,
            node,
            make,
            ancestry.parent.as_ref(),
            ancestry.boot,
            staging,
            started,
        )?;
        Ok::<_, BuildError>((output, ancestry.parent))
    };
    let mut staging = store
        .stage(&lock, committed_label(cx, node, action))
        .map_err(failed(name))?;
    let (output, parent) = match action {
        Action::Substitute { from, fallback, .. } => {
            match substitute(cx, node, from, &staging, ancestry) {
                Ok(Some(done)) => done,
                Ok(None) => return Err(parent_failed()),
                Err(e) => {
                    let Some(fallback) = fallback else {
                        return Err(e);
                    };
                    reporter.warn(format!(
                        "{}; building `{name}` instead",
                        crate::model::text::error_chain(&e).replace('\n', " ")
                    ));
                    drop(staging);
                    staging = store.stage(&lock, name).map_err(failed(name))?;
                    build(fallback, &staging)?
                }
            }
        }
        Action::Make(make) => build(make, &staging)?,
        // Planned as present, and removed since (the lookup above found nothing).
        Action::Cached => {
            return Err(failed(name)(std::io::Error::other(
                "it was in the store when the build was planned, and is no longer",
            )));
        }
    };
    let (output_blake3, size) = output;
    let meta = EntryMeta {
        layout: LAYOUT_VERSION,
        ..EntryMeta::made_now(
            staging.name().to_string(),
            node.hash,
            serde_json::to_value(&node.derivation).expect("derivations serialize"),
            (output_blake3, size),
            parent.map(|p| p.dir_name().to_string()),
            started,
        )
    };
    let entry = store.commit(staging, meta).map_err(failed(name))?;
    drop(lock);
    Ok(entry)
}

/// The label `node`'s entry is committed under: its own name, except that a substitute
/// keeps the label it has in the cache. The cache's children of it name their backing
/// file by that label (`../<key>-<label>/disk.qcow2`), and the same derivation can have
/// another name there (farm's appliance is the tiny image; a tests' `plain` is a `leaf`).
fn committed_label<'a>(cx: &'a Context, node: &'a DrvNode, action: &Action) -> &'a str {
    let offered = || {
        let offer = cx.options.substitution.as_ref()?.offers.get(&node.hash)?;
        Some(offer.record.name.as_str())
    };
    match action {
        Action::Substitute { .. } => offered().unwrap_or(&node.name),
        Action::Make(_) | Action::Cached => &node.name,
    }
}

/// farm's appliance for `arch` (see `derivation::appliance_node`), realised when a chroot
/// build first needs it, under its own lock.
fn realise_appliance(cx: &Context, arch: Arch) -> Result<Entry, BuildError> {
    let node = crate::model::build::derivation::appliance_node(arch);
    if let Some(entry) = lookup(cx.store, &node)? {
        return Ok(entry);
    }
    realise_one(cx, &node, &Action::Make(node.make.clone()), &|| {
        Some(Ancestry {
            parent: None,
            boot: None,
        })
    })
}

/// Downloads `node` from the cache that offers it into `staging`, then waits for its
/// parent (which may still be arriving) and checks the download backs onto it. Returns the
/// disk's blake3 and size with the parent; `None` when the parent never came.
fn substitute(
    cx: &Context,
    node: &DrvNode,
    from: &str,
    staging: &Staging,
    ancestry: &dyn Fn() -> Option<Ancestry>,
) -> Result<Option<SubstitutedOutput>, BuildError> {
    let started = Instant::now();
    let name = node.name.as_str();
    // The plan names the cache; the offer itself comes with the options (`plan_with_caches`).
    let (substitution, offer) = cx
        .options
        .substitution
        .as_ref()
        .and_then(|s| Some((s, s.offers.get(&node.hash)?)))
        .ok_or_else(|| {
            failed(name)(std::io::Error::other(format!(
                "the plan substitutes it from {from}, but the build was given no offer of it"
            )))
        })?;
    let bar = cx.reporter.bytes_for(
        "substitute",
        &format!("{name} from {from}"),
        Some(offer.record.download_size()),
    );
    let output = substitution
        .caches
        .fetch(offer, staging.dir(), &|n| bar.inc(n))
        .map_err(failed(name))?;
    bar.finish_and_clear();
    let Some(ancestry) = ancestry() else {
        return Ok(None);
    };
    substitution
        .caches
        .check_parent(offer, ancestry.parent.as_ref())
        .map_err(failed(name))?;
    cx.reporter.line(format!(
        "{:>12} {name} from {from} ({}, {:.0} s, signature and hashes checked)",
        "substituted",
        human_bytes(offer.record.download_size()),
        started.elapsed().as_secs_f64()
    ));
    Ok(Some((output, ancestry.parent)))
}

/// A substituted disk's blake3 and size, and the parent entry it backs onto.
type SubstitutedOutput = ((ContentHash, u64), Option<Entry>);

/// Makes the derivation's output in `staging` (download, import, mmdebstrap, tiny image,
/// layer build) and returns its disk's blake3 and size. Commits nothing.
pub(super) fn produce(
    cx: &Context,
    node: &DrvNode,
    make: &Make,
    parent: Option<&Entry>,
    boot: Option<BootFiles>,
    staging: &Staging,
    started: Instant,
) -> Result<(ContentHash, u64), BuildError> {
    let (config, store, options, reporter) = (cx.config, cx.store, cx.options, cx.reporter);
    let name = node.name.as_str();
    // Only layers have one; the plan puts their parents before them.
    let parent = || {
        parent.ok_or_else(|| failed(name)(std::io::Error::other("its parent is not in the store")))
    };
    let output = match make {
        Make::Fetch { url, hash, format } => {
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
            let out = place_image(
                &downloaded.path,
                downloaded.compression,
                Some(downloaded.blake3),
                *format,
                staging,
                true,
                reporter,
            )
            .map_err(|e| broken_published(name, url, hash.algo.name(), BROKEN_AT_URL, e))?;
            reporter.line(format!(
                "{:>12} {name} from {url} ({}, verified {})",
                "fetched",
                human_bytes(downloaded.size),
                hash.algo.name()
            ));
            out
        }
        Make::Import { path, hash, format } => {
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
                *format,
                staging,
                false,
                reporter,
            )
            .map_err(|e| match hash {
                Some(expected) => broken_published(
                    name,
                    &path.display().to_string(),
                    expected.algo.name(),
                    BROKEN_AT_PATH,
                    e,
                ),
                None => BuildError::Failed {
                    name: name.to_string(),
                    source: e,
                },
            })?;
            reporter.line(format!(
                "{:>12} {name} from `{}`",
                "imported",
                path.display()
            ));
            out
        }
        Make::EmptyLayer => {
            let parent = parent()?;
            empty_layer(staging, parent).map_err(failed(name))?;
            reporter.line(format!(
                "{:>12} {name} (empty layer on {})",
                "built",
                parent.dir_name()
            ));
            staging.hash_disk().map_err(failed(name))?
        }
        Make::Layer(layer) => {
            let parent = parent()?;
            let target = &config.targets[&layer.target];
            let platform = &config.platforms[&layer.platform];
            let host_arch = crate::sys::hostinfo::host_arch().unwrap_or(target.arch);
            let accel = choose_accel(
                options.accel.unwrap_or(target.accel),
                crate::sys::hostinfo::kvm_facts(),
                host_arch,
                target.arch,
            );
            let appliance = match platform.steps.builder() {
                Builder::Boot => None,
                Builder::Chroot => {
                    let entry = realise_appliance(cx, target.arch)?;
                    let boot = entry
                        .boot_dir()
                        .and_then(|dir| BootFiles::in_dir(&dir))
                        .ok_or_else(|| {
                            failed(name)(std::io::Error::other(format!(
                                "the appliance `{}` has no boot files",
                                entry.dir.display()
                            )))
                        })?;
                    Some(Appliance {
                        disk: entry.disk_path(),
                        boot,
                    })
                }
            };
            let build = LayerBuild {
                appliance,
                name,
                platform,
                recipe: &layer.recipe,
                parent,
                store,
                checkpoints: options.step_checkpoints,
                firmware: crate::model::config::validate::firmware_of(
                    config,
                    &platform.name.value,
                    target.arch,
                ),
                boot,
                staging,
                hw: MachineSpec {
                    arch: target.arch,
                    machine: target.machine.clone(),
                    cpu: target.cpu.clone(),
                    accel,
                    memory_mib: config
                        .platform_resources(&platform.name.value)
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
            let report = crate::build::layer::build_layer(&build, reporter).map_err(|source| {
                BuildError::Layer {
                    name: name.to_string(),
                    source: Box::new(source),
                }
            })?;
            let reused = match report.reused {
                0 => String::new(),
                n => format!(", {n}/{} build steps from checkpoints", report.steps),
            };
            reporter.line(format!(
                "{:>12} {name} ({}{reused}, {:.0} s, {accel})",
                "built",
                crate::model::text::counted(layer.step_kinds, "step"),
                started.elapsed().as_secs_f64()
            ));
            staging.hash_disk().map_err(failed(name))?
        }
        Make::Debootstrap { spec, arch } => {
            let arch = *arch;
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
        Make::BuildTiny { arch } => {
            let arch = *arch;
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
    };
    Ok(output)
}

/// Why fetching or copying again cannot help an image that matches its declared hash but
/// does not unpack: the hash was taken of the broken file.
const BROKEN_AT_URL: &str = "the file as published is damaged (and its checksum was taken of the damaged file): fix the declaration, with another mirror or release of the image and its own checksum";
const BROKEN_AT_PATH: &str = "the file is damaged (and its declared checksum was taken of the damaged file): fix the declaration, with a good copy of the image and its own checksum";

/// An image that matched its declared hash but does not unpack was broken when its hash
/// was taken: fetching it again cannot help, and the error must not say it might.
fn broken_published(
    name: &str,
    origin: &str,
    algo: &'static str,
    hint: &'static str,
    e: BoxError,
) -> BuildError {
    let failed = |source: BoxError| BuildError::Failed {
        name: name.to_string(),
        source,
    };
    let fetch_error = match e.downcast::<fetch::FetchError>() {
        Ok(fetch_error) => fetch_error,
        Err(other) => return failed(other),
    };
    match *fetch_error {
        fetch::FetchError::Decompress {
            compression,
            source,
            ..
        } => BuildError::BrokenPublished {
            name: name.to_string(),
            origin: origin.to_string(),
            algo,
            detail: format!("it is not a valid {compression} stream ({source})"),
            hint,
        },
        other => failed(Box::new(other)),
    }
}

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
    // At least the file's own size (an unpacked or converted image is no smaller).
    let size = fs_err::metadata(src)?.len();
    crate::sys::space::ensure(staging.dir(), size, &format!("`{}`", src.display()))?;
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
