//! `farm image export`: a built platform's layer chain flattened into one standalone disk
//! that another tool boots (issue 32), or wrapped as that tool wants it (a KubeVirt
//! containerDisk, `container_disk`), with a checksum line (`b3sum -c` or `sha256sum -c`)
//! and a sidecar naming the derivation it came from. qcow2 and raw disks are laid out and
//! written by farm (`flat_writer`), hashed as they are written; other formats go through
//! `qemu-img convert`. The artifact is written under a hidden name beside the target and
//! renamed into place last: a failed or killed export leaves nothing under the target's
//! name.

mod bootable;
mod container_disk;
mod flat_writer;
mod vagrant_box;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::build::layer::BootFiles;
use crate::model::build::derivation::{DrvNode, Recipe};
use crate::model::build::export::{Checksum, ExportFormat, checksum_line};
use crate::model::build::flat_image::{self, FlatImage, LayoutError, Piece};
use crate::model::config::DebianInit;
use crate::model::hash::HashAlgo;
use crate::model::values::Arch;
use crate::project::Project;
use crate::store::{Entry, Store};
use bootable::BootHead;
use container_disk::ContainerDisk;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("`{name}` is not built in the store `{}`\nhint: `farm build {name}` first, or add `--build`", store.display())]
    NotBuilt { name: String, store: PathBuf },
    #[error("`{name}` names {count} derivations ({names})\nhint: export one of them by its name")]
    NotOne {
        name: String,
        count: usize,
        names: String,
    },
    #[error("`{}` exists\nhint: `--force` replaces it", file.display())]
    Exists { file: PathBuf },
    #[error(
        "`--push` sends a containerDisk, not a `{format}` disk\nhint: add `--format containerdisk`"
    )]
    PushNeedsContainerDisk { format: ExportFormat },
    #[error(transparent)]
    Push(#[from] container_disk::PushError),
    #[error(transparent)]
    Bootable(#[from] bootable::BootableError),
    #[error(
        "`{name}` boots by direct kernel on {arch}, and a standalone {arch} disk needs a UEFI boot loader, which `farm image export` does not write yet\nhint: export an x86_64 platform, or an image with its own boot loader (`url`, `path`)"
    )]
    NoBootLoader { name: String, arch: &'static str },
    #[error(transparent)]
    Space(#[from] crate::sys::space::SpaceShort),
    #[error("Cannot export `{name}`: {source}")]
    Convert {
        name: String,
        source: crate::sys::qemu_img::QemuImgError,
    },
    #[error("Cannot write `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] flat_writer::FlatWriteError),
    #[error("Cannot lay out `{name}` as one qcow2: {source}")]
    Layout { name: String, source: LayoutError },
    #[error("Cannot hash `{}`: {source}", path.display())]
    Hash {
        path: PathBuf,
        source: Box<crate::fetch::FetchError>,
    },
    #[error(transparent)]
    Usage(#[from] crate::project::UsageError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What to export, and where.
pub struct ExportRequest<'a> {
    /// A platform built for one target, a `<platform>_<target>` or an image.
    pub name: &'a str,
    pub file: &'a Path,
    pub format: ExportFormat,
    /// qcow2 only: compressed clusters (smaller, slower to read).
    pub compress: bool,
    /// The checksum written beside the artifact.
    pub checksum: Checksum,
    /// Replace `file` when it exists.
    pub force: bool,
    /// containerdisk only: also send the image to this `REGISTRY/REPOSITORY[:TAG]`.
    pub push: Option<&'a str>,
    /// Shows the conversion, then the checksum, as bytes of the disk.
    pub progress: &'a indicatif::ProgressBar,
}

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    /// The store entry the disk came from.
    pub entry: String,
    /// The artifact's checksum, as hex.
    pub checksum_hex: String,
    pub bytes: u64,
    /// The checksum file beside the disk (`FILE.blake3`, `FILE.sha256`) and the sidecar
    /// (`FILE.farm.json`).
    pub checksum: PathBuf,
    pub sidecar: PathBuf,
    pub elapsed: Duration,
}

/// Exports `request.name`'s store entry as `request.file`.
pub fn export(
    project: &Project,
    store: &Store,
    request: &ExportRequest<'_>,
) -> Result<Exported, ExportError> {
    let started = Instant::now();
    if request.push.is_some() && request.format != ExportFormat::ContainerDisk {
        return Err(ExportError::PushNeedsContainerDisk {
            format: request.format,
        });
    }
    let ids = project.resolve(request.name)?;
    let [id] = ids.as_slice() else {
        return Err(ExportError::NotOne {
            name: request.name.to_string(),
            count: ids.len(),
            names: ids
                .iter()
                .map(|id| project.graph.nodes[id].name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let node = &project.graph.nodes[id];
    let entry = store
        .lookup(&node.hash, &node.name)?
        .ok_or_else(|| ExportError::NotBuilt {
            name: node.name.clone(),
            store: store.root().to_path_buf(),
        })?;
    let file = request.file;
    if file.exists() && !request.force {
        return Err(ExportError::Exists {
            file: file.to_path_buf(),
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let chain = chain(store, &entry);
    // farm's own images boot by direct kernel, from the nearest `boot/` in the chain; made
    // standalone they get a boot loader in front of them.
    let boot = chain
        .iter()
        .find_map(|e| e.boot_dir().and_then(|dir| BootFiles::in_dir(&dir)));
    let arch = node
        .derivation
        .recipe
        .arch()
        .or_else(|| project.loaded.config.images.get(&node.name)?.arch)
        .unwrap_or(Arch::X86_64);
    if boot.is_some() && arch != Arch::X86_64 {
        return Err(ExportError::NoBootLoader {
            name: node.name.clone(),
            arch: arch.name(),
        });
    }
    // The chain's bytes bound what any of the disk formats needs (raw is written sparse),
    // with the kernel and initrd in front when they go along.
    let boot_bytes: u64 = boot
        .iter()
        .flat_map(|b| std::iter::once(&b.kernel).chain(&b.initrd))
        .filter_map(|path| fs_err::metadata(path).ok())
        .map(|m| m.len())
        .sum();
    let needed = chain.iter().map(|e| e.meta.size).sum::<u64>() + boot_bytes;
    crate::sys::space::ensure_or(
        &dir,
        needed,
        &format!("the export of `{}`", node.name),
        crate::sys::space::Remedy::Elsewhere,
    )?;

    let partial = dir.join(format!(".{file_name}.farm-partial"));
    let disk_partial = dir.join(format!(".{file_name}.disk.farm-partial"));
    let head = dir.join(format!(".{file_name}.head.farm-partial"));
    let grub_scratch = dir.join(format!(".{file_name}.grub.farm-partial"));
    let compressed = request.compress && request.format.disk_format() == "qcow2";
    let written = (|| {
        let mut extra = serde_json::Map::new();
        let root_bytes = entry
            .virtual_size()
            .map_err(io(&entry.disk_path()))?
            .unwrap_or(entry.meta.size);
        let (boot_head, virtual_size) = match &boot {
            Some(boot) => {
                let prepared =
                    bootable::prepare(boot, root_bytes, &store.grub_cache_dir(), &grub_scratch)?;
                extra.insert("boot".into(), "grub (BIOS), root on /dev/vda1".into());
                let size = prepared.layout.disk_bytes();
                (Some(prepared), size)
            }
            None => {
                extra.insert("boot".into(), "the image's own boot loader".into());
                (None, root_bytes)
            }
        };
        extra.insert("virtual_size".into(), virtual_size.into());
        let progress = request.progress;
        let sources = ChainSources {
            head: boot_head.as_ref().map(|h| (h, head.as_path())),
            chain: chain.iter().map(Entry::disk_path).collect(),
            virtual_size,
        };
        // Writes the disk, hashed as it is written with `algo` when farm writes it itself.
        let convert_to = |out: &Path,
                          algo: Option<HashAlgo>|
         -> Result<Option<crate::fetch::FileHashes>, ExportError> {
            let _ = fs_err::remove_file(out);
            let flat = match request.format.disk_format() {
                "qcow2" if !compressed => sources.flat_image(&node.name, flat_image::qcow2)?,
                "raw" => sources.flat_image(&node.name, flat_image::raw)?,
                _ => None,
            };
            if let Some((flat, files)) = flat {
                return Ok(flat_writer::write(&flat, &files, out, algo, progress)?);
            }
            if let Some(boot_head) = &boot_head {
                boot_head.write_file(&head)?;
            }
            progress.set_length(virtual_size);
            progress.set_position(0);
            crate::sys::qemu_img::export(
                &entry.disk_path(),
                boot_head.as_ref().map(|_| head.as_path()),
                request.format.disk_format(),
                compressed,
                out,
                &mut |percent| {
                    progress.set_position((virtual_size as f64 * percent / 100.0) as u64)
                },
            )
            .map_err(|source| ExportError::Convert {
                name: node.name.clone(),
                source,
            })?;
            Ok(None)
        };
        let hashed = match request.format {
            ExportFormat::ContainerDisk => {
                convert_to(&disk_partial, None)?;
                let image =
                    ContainerDisk::prepare(&disk_partial, &node.name, arch, &node.hash.to_string())
                        .map_err(io(&disk_partial))?;
                image.write_archive(&partial).map_err(io(&partial))?;
                if let Some(target) = request.push {
                    image.push(target, &crate::binary_cache::backend::no_progress())?;
                    extra.insert("pushed".into(), target.into());
                }
                extra.insert("image_digest".into(), image.digest().into());
                let _ = fs_err::remove_file(&disk_partial);
                None
            }
            ExportFormat::VagrantLibvirt => {
                convert_to(&disk_partial, None)?;
                let lineage = project.graph.closure(std::slice::from_ref(id));
                let user = login_user(&lineage);
                // busybox images say nothing of themselves that Vagrant could detect.
                let busybox = lineage.first().is_some_and(|root| {
                    matches!(
                        root.derivation.recipe,
                        Recipe::TinyImage { .. }
                            | Recipe::DebianImage {
                                init: DebianInit::Busybox,
                                ..
                            }
                    )
                });
                let guest = busybox.then_some("linux");
                vagrant_box::write_box(&disk_partial, virtual_size, &user, guest, &partial)
                    .map_err(io(&partial))?;
                extra.insert("user".into(), user.into());
                let _ = fs_err::remove_file(&disk_partial);
                None
            }
            _ => convert_to(&partial, Some(request.checksum.algo()))?,
        };
        let hashes = match hashed {
            Some(hashes) => hashes,
            None => {
                progress.set_message(request.checksum.name());
                crate::fetch::hash_file(&partial, Some(request.checksum.algo()), progress).map_err(
                    |source| ExportError::Hash {
                        path: partial.clone(),
                        source: Box::new(source),
                    },
                )?
            }
        };
        let checksum_hex = hashes.digest.expect("a digest was asked for").to_hex();
        let bytes = hashes.size;
        let checksum = dir.join(format!("{file_name}.{}", request.checksum.name()));
        fs_err::write(&checksum, checksum_line(&checksum_hex, &file_name))
            .map_err(io(&checksum))?;
        let sidecar = dir.join(format!("{file_name}.farm.json"));
        let mut meta = serde_json::json!({
            "name": node.name,
            "derivation": node.hash.to_string(),
            "entry": entry.dir_name(),
            "layer_blake3": entry.meta.output_blake3.to_string(),
            "format": request.format.name(),
            "compressed": compressed,
            "bytes": bytes,
        });
        if let Some(fields) = meta.as_object_mut() {
            fields.insert(request.checksum.name().into(), checksum_hex.clone().into());
            fields.extend(extra);
        }
        let text = serde_json::to_string_pretty(&meta).unwrap_or_default() + "\n";
        fs_err::write(&sidecar, text).map_err(io(&sidecar))?;
        fs_err::rename(&partial, file).map_err(io(file))?;
        Ok(Exported {
            entry: entry.dir_name().to_string(),
            checksum_hex,
            bytes,
            checksum,
            sidecar,
            elapsed: started.elapsed(),
        })
    })();
    let _ = fs_err::remove_file(&head);
    let _ = fs_err::remove_dir_all(&grub_scratch);
    if written.is_err() {
        let _ = fs_err::remove_file(&partial);
        let _ = fs_err::remove_file(&disk_partial);
    }
    written
}

/// The account a platform's keys were given to, nearest layer first (`root` when none
/// names one): the user another tool logs in as. `lineage` is the derivation and its
/// ancestors, parents first.
fn login_user(lineage: &[&DrvNode]) -> String {
    lineage
        .iter()
        .rev()
        .find_map(|node| match &node.derivation.recipe {
            Recipe::Layer(layer) => layer.steps.authorized_keys.first(),
            _ => None,
        })
        .map_or_else(|| "root".to_string(), |key| key.user.clone())
}

/// `entry` and every entry below it, top first, as their metadata link them.
fn chain(store: &Store, entry: &Entry) -> Vec<Entry> {
    let mut chain = vec![entry.clone()];
    while let Some(below) = chain
        .last()
        .and_then(|e| e.meta.parent.as_deref())
        .and_then(|dir| store.entry_by_dir(dir))
    {
        chain.push(below);
    }
    chain
}

/// What an export is made of: the chain's disks (top first, as the store links them and
/// as `qemu-img map` numbers them), with a boot head in front when farm adds one (and
/// where its loader is written).
struct ChainSources<'a> {
    head: Option<(&'a BootHead, &'a Path)>,
    chain: Vec<PathBuf>,
    virtual_size: u64,
}

impl ChainSources<'_> {
    /// The disk as farm lays it out itself (`lay_out`: `flat_image::qcow2` or `raw`), and
    /// the files it reads; `None` when the chain has clusters farm does not copy as they
    /// are (compressed ones, say: qemu-img converts such a chain instead).
    fn flat_image(
        &self,
        name: &str,
        lay_out: fn(u64, &[Piece]) -> Result<FlatImage, LayoutError>,
    ) -> Result<Option<(FlatImage, Vec<PathBuf>)>, ExportError> {
        let Some(top) = self.chain.first() else {
            return Ok(None);
        };
        let map = match crate::store::qcow2_map::map_chain(&self.chain) {
            Ok(Some(map)) => map,
            Ok(None) => return Ok(None),
            Err(source) => {
                return Err(ExportError::Io {
                    path: top.clone(),
                    source,
                });
            }
        };
        let (mut pieces, mut files, shift) = match self.head {
            Some((head, loader_file)) => {
                fs_err::write(loader_file, &head.loader).map_err(|source| ExportError::Io {
                    path: loader_file.to_path_buf(),
                    source,
                })?;
                let (pieces, files) = head.pieces(loader_file, 0);
                (pieces, files, head.layout.head_bytes())
            }
            None => (Vec::new(), Vec::new(), 0),
        };
        let layout = |source| ExportError::Layout {
            name: name.to_string(),
            source,
        };
        match flat_image::pieces_from_map(&map, self.chain.len(), shift, files.len()) {
            Ok(chain) => pieces.extend(chain),
            Err(LayoutError::Compressed { .. }) => return Ok(None),
            Err(other) => return Err(layout(other)),
        }
        files.extend(self.chain.iter().cloned());
        let flat = lay_out(self.virtual_size, &pieces).map_err(layout)?;
        Ok(Some((flat, files)))
    }
}
