//! The head of a bootable export (`model::build::bootable_disk` has the layout and why):
//! GRUB's boot sector and `core.img`, the kernel and the initrd. farm's own writer copies
//! the kernel and initrd from their files into place; for `qemu-img convert` the head is
//! written as one raw file that it puts in front of the root filesystem.
//!
//! GRUB comes from this machine: `grub-mkimage` (Debian's `grub-common`) and the i386-pc
//! modules and `boot.img` (`grub-pc-bin`). Both are plain files and a deterministic tool,
//! so the head is the same bytes for the same kernel, initrd and command line.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::build::layer::BootFiles;
use crate::model::build::bootable_disk::{
    BootDiskError, BootLayout, Extent, GRUB_MODULES, SECTOR, placed_core,
};
use crate::model::build::flat_image::{Piece, Source};

/// Where Debian's `grub-pc-bin` puts GRUB's BIOS modules and images.
const GRUB_PC_DIR: &str = "/usr/lib/grub/i386-pc";

#[derive(Debug, thiserror::Error)]
pub enum BootableError {
    #[error(
        "Making the disk bootable needs GRUB's BIOS files in `{GRUB_PC_DIR}` and `grub-mkimage`\nhint: apt-get install grub-pc-bin grub-common"
    )]
    NoGrub,
    #[error("`grub-mkimage` failed: {said}")]
    Mkimage { said: String },
    #[error(transparent)]
    Layout(#[from] BootDiskError),
    #[error("Cannot write the boot area `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What goes in front of the root filesystem: the layout, the boot sector and `core.img`
/// (the disk's first bytes), and the kernel and initrd files placed after them.
pub struct BootHead {
    pub layout: BootLayout,
    /// Sector 0 and `core.img` from sector 1 on.
    pub loader: Vec<u8>,
    /// The kernel and the initrd: their files and lengths.
    pub kernel: (PathBuf, u64),
    pub initrd: Option<(PathBuf, u64)>,
}

/// The head of a bootable disk for `boot` over a root filesystem of `root_bytes`.
/// `core.img` is taken from `grub_cache` when GRUB made it for the same config before
/// (`grub-mkimage` costs a tenth of a second, a third of an export); `scratch` is a
/// directory for making it, next to the export.
pub fn prepare(
    boot: &BootFiles,
    root_bytes: u64,
    grub_cache: &Path,
    scratch: &Path,
) -> Result<BootHead, BootableError> {
    let grub_dir = Path::new(GRUB_PC_DIR);
    let mkimage = crate::sys::programs::find_program("grub-mkimage");
    let (Some(mkimage), true) = (mkimage, grub_dir.join("boot.img").is_file()) else {
        return Err(BootableError::NoGrub);
    };
    let sized = |path: &PathBuf| {
        let len = fs_err::metadata(path).map(|m| m.len()).map_err(io(path))?;
        Ok::<_, BootableError>((path.clone(), len))
    };
    let kernel = sized(&boot.kernel)?;
    let initrd = boot.initrd.as_ref().map(sized).transpose()?;
    let layout = BootLayout::new(kernel.1, initrd.as_ref().map(|i| i.1), root_bytes);
    let config = layout.grub_config(&boot.cmdline);
    let core = placed_core(&core_image(&mkimage, &config, grub_cache, scratch)?)?;
    let boot_img = grub_dir.join("boot.img");
    let sector = layout.boot_sector(&fs_err::read(&boot_img).map_err(io(&boot_img))?)?;
    let mut loader = sector.to_vec();
    loader.extend_from_slice(&core);
    Ok(BootHead {
        layout,
        loader,
        kernel,
        initrd,
    })
}

impl BootHead {
    /// The whole head as one raw file, for `qemu-img convert` to put in front of the chain.
    pub fn write_file(&self, head: &Path) -> Result<(), BootableError> {
        let mut file = fs_err::File::create(head).map_err(io(head))?;
        let mut write = |at: u64, source: &mut dyn std::io::Read| -> std::io::Result<()> {
            file.seek(SeekFrom::Start(at))?;
            std::io::copy(source, &mut file)?;
            Ok(())
        };
        write(0, &mut &self.loader[..]).map_err(io(head))?;
        for ((path, _), extent) in self.payload() {
            let mut from = fs_err::File::open(path).map_err(io(path))?;
            write(extent.lba * SECTOR, &mut from).map_err(io(head))?;
        }
        file.set_len(self.layout.head_bytes()).map_err(io(head))?;
        file.flush().map_err(io(head))
    }

    /// The head as pieces of a flat disk: the loader from `loader_file` (this head's
    /// `loader`, written there), the kernel and the initrd from their own files, numbered
    /// from `first_file`. Returns the pieces and the files, in that numbering.
    pub fn pieces(&self, loader_file: &Path, first_file: usize) -> (Vec<Piece>, Vec<PathBuf>) {
        let mut files = vec![loader_file.to_path_buf()];
        let mut pieces = vec![Piece {
            start: 0,
            length: self.loader.len() as u64,
            from: Source {
                file: first_file,
                offset: 0,
            },
        }];
        for ((path, length), extent) in self.payload() {
            pieces.push(Piece {
                start: extent.lba * SECTOR,
                length: *length,
                from: Source {
                    file: first_file + files.len(),
                    offset: 0,
                },
            });
            files.push(path.clone());
        }
        (pieces, files)
    }

    /// The kernel and the initrd, where the layout puts them.
    fn payload(&self) -> impl Iterator<Item = (&(PathBuf, u64), Extent)> {
        std::iter::once((&self.kernel, self.layout.kernel))
            .chain(self.initrd.iter().zip(self.layout.initrd))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BootableError + use<> {
    let path = path.to_path_buf();
    move |source| BootableError::Io { path, source }
}

/// `core.img` for `config`: from the cache when GRUB's files are the ones that made it
/// there, else made by `grub-mkimage` (deterministic: the same files and config give the
/// same bytes) and kept.
fn core_image(
    mkimage: &Path,
    config: &str,
    grub_cache: &Path,
    scratch: &Path,
) -> Result<Vec<u8>, BootableError> {
    let key = core_key(mkimage, config);
    let cached = grub_cache.join(format!("core-{key}.img"));
    if let Ok(core) = fs_err::read(&cached) {
        return Ok(core);
    }
    fs_err::create_dir_all(scratch).map_err(io(scratch))?;
    let config_path = scratch.join("grub.cfg");
    fs_err::write(&config_path, config).map_err(io(&config_path))?;
    let core_path = scratch.join("core.img");
    let output = Command::new(mkimage)
        .args(["-O", "i386-pc", "-d", GRUB_PC_DIR])
        .arg("-o")
        .arg(&core_path)
        .arg("-c")
        .arg(&config_path)
        .args(["-p", "(hd0)"])
        .args(GRUB_MODULES)
        .stdin(Stdio::null())
        .output()
        .map_err(io(&core_path))?;
    if !output.status.success() {
        return Err(BootableError::Mkimage {
            said: crate::model::text::printable(&String::from_utf8_lossy(&output.stderr)),
        });
    }
    let core = fs_err::read(&core_path).map_err(io(&core_path))?;
    // Kept by a rename, so a reader never sees half of one; a cache that cannot be written
    // costs the next export a `grub-mkimage`, nothing more.
    let kept = (|| {
        fs_err::create_dir_all(grub_cache)?;
        let partial = grub_cache.join(format!(".core-{key}.{}", std::process::id()));
        fs_err::write(&partial, &core)?;
        fs_err::rename(&partial, &cached)
    })();
    drop(kept);
    Ok(core)
}

/// What `core.img` depends on: the config, and GRUB's program and module files (by name,
/// size and time: a GRUB upgrade replaces them).
fn core_key(mkimage: &Path, config: &str) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(config.as_bytes());
    let mut stamp = |path: &Path| {
        if let Ok(meta) = fs_err::metadata(path) {
            hasher.update(path.as_os_str().as_encoded_bytes());
            hasher.update(&meta.len().to_le_bytes());
            hasher.update(&crate::store::fsutil::mtime_ns(&meta).to_le_bytes());
        }
    };
    stamp(mkimage);
    let mut files: Vec<PathBuf> = fs_err::read_dir(GRUB_PC_DIR)
        .map(|listing| listing.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for file in &files {
        stamp(file);
    }
    hasher.finalize().to_hex()[..32].to_string()
}
