//! The head of a bootable export (`model::build::bootable_disk` has the layout and why):
//! GRUB's boot sector and `core.img`, the kernel and the initrd, written into one raw file
//! that `qemu-img convert` puts in front of the root filesystem.
//!
//! GRUB comes from this machine: `grub-mkimage` (Debian's `grub-common`) and the i386-pc
//! modules and `boot.img` (`grub-pc-bin`). Both are plain files and a deterministic tool,
//! so the head is the same bytes for the same kernel, initrd and command line.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::build::layer::BootFiles;
use crate::model::build::bootable_disk::{BootDiskError, BootLayout, GRUB_MODULES, placed_core};

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

/// Writes the head of a bootable disk for `boot` over a root filesystem of `root_bytes`
/// to `head`; returns the layout. `scratch` is a directory for GRUB's config and
/// `core.img`, next to the export.
pub fn write_head(
    boot: &BootFiles,
    root_bytes: u64,
    head: &Path,
    scratch: &Path,
) -> Result<BootLayout, BootableError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BootableError::Io { path, source }
    };
    let grub_dir = Path::new(GRUB_PC_DIR);
    let mkimage = crate::sys::programs::find_program("grub-mkimage");
    let (Some(mkimage), true) = (mkimage, grub_dir.join("boot.img").is_file()) else {
        return Err(BootableError::NoGrub);
    };
    let size = |path: &Path| fs_err::metadata(path).map(|m| m.len()).map_err(io(path));
    let initrd_bytes = match &boot.initrd {
        Some(initrd) => Some(size(initrd)?),
        None => None,
    };
    let layout = BootLayout::new(size(&boot.kernel)?, initrd_bytes, root_bytes);

    fs_err::create_dir_all(scratch).map_err(io(scratch))?;
    let config = scratch.join("grub.cfg");
    fs_err::write(&config, layout.grub_config(&boot.cmdline)).map_err(io(&config))?;
    let core_path = scratch.join("core.img");
    let output = Command::new(mkimage)
        .args(["-O", "i386-pc", "-d"])
        .arg(grub_dir)
        .arg("-o")
        .arg(&core_path)
        .arg("-c")
        .arg(&config)
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
    let core = placed_core(&fs_err::read(&core_path).map_err(io(&core_path))?)?;
    let boot_img = grub_dir.join("boot.img");
    let sector = layout.boot_sector(&fs_err::read(&boot_img).map_err(io(&boot_img))?)?;

    let mut file = fs_err::File::create(head).map_err(io(head))?;
    let mut write = |at: u64, source: &mut dyn std::io::Read| -> std::io::Result<()> {
        file.seek(SeekFrom::Start(at))?;
        std::io::copy(source, &mut file)?;
        Ok(())
    };
    write(0, &mut &sector[..]).map_err(io(head))?;
    write(512, &mut &core[..]).map_err(io(head))?;
    let sector_at = |lba: u64| lba * crate::model::build::bootable_disk::SECTOR;
    let mut kernel = fs_err::File::open(&boot.kernel).map_err(io(&boot.kernel))?;
    write(sector_at(layout.kernel.lba), &mut kernel).map_err(io(head))?;
    if let (Some(extent), Some(path)) = (layout.initrd, &boot.initrd) {
        let mut initrd = fs_err::File::open(path).map_err(io(path))?;
        write(sector_at(extent.lba), &mut initrd).map_err(io(head))?;
    }
    file.set_len(layout.head_bytes()).map_err(io(head))?;
    file.flush().map_err(io(head))?;
    let _ = fs_err::remove_file(&config);
    let _ = fs_err::remove_file(&core_path);
    Ok(layout)
}
