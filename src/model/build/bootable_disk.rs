//! A disk that boots on its own, made from one that farm boots by direct kernel (its own
//! images: ext4 on the whole disk, kernel and initrd in the entry's `boot/`), as data: where
//! everything lies, the GRUB configuration, and the bytes GRUB's installer would patch.
//!
//! The layout, in 512-byte sectors:
//!
//! | sectors | what |
//! |---|---|
//! | 0 | GRUB's `boot.img`, told where `core.img` is, with an MBR partition table |
//! | 1 … 2047 | GRUB's `core.img`, its config built in: load the kernel and initrd below, boot |
//! | 2048 … | the kernel, then the initrd, each from a sector boundary |
//! | from the next MiB | partition 1: the root filesystem, byte for byte as farm built it |
//!
//! Why this shape: the root filesystem stays exactly the store's bytes (nothing mounted,
//! nothing written into it), and GRUB reads the kernel and initrd as sector ranges
//! (`(hd0)START+COUNT`), so it needs no filesystem driver and no file in the root. The root
//! is the last partition, so a cloud's `growpart` can grow it. Everything here is a pure
//! function of the inputs, so the disk is reproducible like the rest of an export.

/// A disk sector.
pub const SECTOR: u64 = 512;
/// Where `core.img` starts (right after the boot sector), and how far it may reach.
const CORE_LBA: u64 = 1;
/// The kernel starts at 1 MiB.
const PAYLOAD_LBA: u64 = 2048;
/// The root partition starts on a MiB boundary, as partitioning tools align it.
const ALIGN: u64 = 2048;
/// The GRUB modules `core.img` holds: BIOS disks, the partition table, the Linux loader,
/// `boot`. Nothing is loaded from a disk later, so nothing else is needed.
pub const GRUB_MODULES: &[&str] = &["biosdisk", "part_msdos", "linux", "boot"];
/// The root device the booted kernel mounts: the first partition of the first virtio disk,
/// where every farm image has `/dev/vda`.
pub const ROOT_DEVICE: &str = "/dev/vda1";

/// Offsets GRUB 2's `grub-bios-setup` patches (`include/grub/i386/pc/boot.h`).
mod grub {
    /// In `boot.img`: the sector `core.img` starts at (u64, little-endian).
    pub const KERNEL_SECTOR: usize = 0x5c;
    /// In `boot.img`: the BIOS drive to boot from; 0xff means "the one the BIOS says".
    pub const BOOT_DRIVE: usize = 0x64;
    /// In `boot.img`: a jump that trusts the BIOS's drive number only for floppies; made
    /// two `nop`s for a hard disk, as `grub-bios-setup` does.
    pub const DRIVE_CHECK: usize = 0x66;
    /// In `core.img`'s first sector: the blocklist of the rest (start u64, sectors u16,
    /// load segment u16), 12 bytes before the sector's end.
    pub const BLOCKLIST: usize = 500;
    /// Where the rest of `core.img` is loaded (`GRUB_BOOT_I386_PC_KERNEL_SEG + 0x20`).
    pub const LOAD_SEGMENT: u16 = 0x820;
    pub const NOP: u8 = 0x90;
}

/// The MBR's partition table and signature.
const PARTITION_TABLE: usize = 0x1be;
const SIGNATURE: usize = 0x1fe;

/// A run of sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub lba: u64,
    pub sectors: u64,
}

fn sectors_for(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR)
}

/// Where everything lies on the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootLayout {
    pub kernel: Extent,
    pub initrd: Option<Extent>,
    /// Partition 1: the root filesystem.
    pub root: Extent,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BootDiskError {
    #[error("GRUB's `boot.img` is {0} bytes, not one 512-byte sector ending in 55 aa")]
    BootImage(usize),
    #[error("GRUB's `core.img` is {0} bytes: more than the 1 MiB before the kernel")]
    CoreTooBig(usize),
    #[error(
        "A root filesystem of {0} bytes is beyond what an MBR partition table can hold (2 TiB)"
    )]
    RootTooBig(u64),
}

impl BootLayout {
    pub fn new(kernel_bytes: u64, initrd_bytes: Option<u64>, root_bytes: u64) -> BootLayout {
        let kernel = Extent {
            lba: PAYLOAD_LBA,
            sectors: sectors_for(kernel_bytes),
        };
        let initrd = initrd_bytes.map(|bytes| Extent {
            lba: kernel.lba + kernel.sectors,
            sectors: sectors_for(bytes),
        });
        let payload_end = initrd.unwrap_or(kernel);
        let root_lba = (payload_end.lba + payload_end.sectors).next_multiple_of(ALIGN);
        BootLayout {
            kernel,
            initrd,
            root: Extent {
                lba: root_lba,
                sectors: sectors_for(root_bytes),
            },
        }
    }

    /// Everything before the root partition: what farm writes itself.
    pub fn head_bytes(&self) -> u64 {
        self.root.lba * SECTOR
    }

    /// The whole disk's size.
    pub fn disk_bytes(&self) -> u64 {
        (self.root.lba + self.root.sectors) * SECTOR
    }

    /// `core.img`'s built-in configuration: GRUB's rescue parser runs it line by line, with
    /// the kernel and initrd read as sector ranges of the boot disk.
    pub fn grub_config(&self, cmdline: &str) -> String {
        let range = |e: Extent| format!("(hd0){}+{}", e.lba, e.sectors);
        let mut config = format!(
            "linux {} {}\n",
            range(self.kernel),
            root_cmdline(cmdline, ROOT_DEVICE)
        );
        if let Some(initrd) = self.initrd {
            config.push_str(&format!("initrd {}\n", range(initrd)));
        }
        config.push_str("boot\n");
        config
    }

    /// GRUB's `boot.img` made this disk's boot sector: pointed at `core.img`, told to boot
    /// from the BIOS's drive, with one active Linux partition over the root.
    pub fn boot_sector(&self, boot_img: &[u8]) -> Result<[u8; 512], BootDiskError> {
        let mut sector: [u8; 512] = boot_img
            .try_into()
            .map_err(|_| BootDiskError::BootImage(boot_img.len()))?;
        if sector[SIGNATURE..] != [0x55, 0xaa] {
            return Err(BootDiskError::BootImage(boot_img.len()));
        }
        let root_sectors = u32::try_from(self.root.sectors)
            .map_err(|_| BootDiskError::RootTooBig(self.root.sectors * SECTOR))?;
        let root_lba = u32::try_from(self.root.lba)
            .map_err(|_| BootDiskError::RootTooBig(self.root.sectors * SECTOR))?;
        sector[grub::KERNEL_SECTOR..grub::KERNEL_SECTOR + 8]
            .copy_from_slice(&CORE_LBA.to_le_bytes());
        sector[grub::BOOT_DRIVE] = 0xff;
        sector[grub::DRIVE_CHECK] = grub::NOP;
        sector[grub::DRIVE_CHECK + 1] = grub::NOP;
        // One entry: active, type 0x83 (Linux), CHS fields saying "use the LBA".
        let mut entry = [0u8; 16];
        entry[0] = 0x80;
        entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        entry[4] = 0x83;
        entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        entry[8..12].copy_from_slice(&root_lba.to_le_bytes());
        entry[12..16].copy_from_slice(&root_sectors.to_le_bytes());
        sector[PARTITION_TABLE..SIGNATURE].fill(0);
        sector[PARTITION_TABLE..PARTITION_TABLE + 16].copy_from_slice(&entry);
        Ok(sector)
    }
}

/// `core.img` as `grub-mkimage` wrote it, made ready for sector 1: padded to whole sectors,
/// and its first sector's blocklist pointing at the rest, which follows it directly.
pub fn placed_core(core_img: &[u8]) -> Result<Vec<u8>, BootDiskError> {
    let sectors = sectors_for(core_img.len() as u64);
    if sectors < 2 || CORE_LBA + sectors > PAYLOAD_LBA {
        return Err(BootDiskError::CoreTooBig(core_img.len()));
    }
    let mut core = core_img.to_vec();
    core.resize((sectors * SECTOR) as usize, 0);
    let list = grub::BLOCKLIST;
    core[list..list + 8].copy_from_slice(&(CORE_LBA + 1).to_le_bytes());
    core[list + 8..list + 10].copy_from_slice(&((sectors - 1) as u16).to_le_bytes());
    core[list + 10..list + 12].copy_from_slice(&grub::LOAD_SEGMENT.to_le_bytes());
    Ok(core)
}

/// `cmdline` with the root on `device`: an existing `root=` replaced, else one added (the
/// tiny image's initramfs mounts `/dev/vda` unless told).
pub fn root_cmdline(cmdline: &str, device: &str) -> String {
    let mut words: Vec<String> = Vec::new();
    let mut replaced = false;
    for word in cmdline.split_whitespace() {
        if word.starts_with("root=") {
            words.push(format!("root={device}"));
            replaced = true;
        } else {
            words.push(word.to_string());
        }
    }
    if !replaced {
        words.push(format!("root={device}"));
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_sits_at_one_mebibyte_and_the_root_on_the_next_boundary() {
        let layout = BootLayout::new(14_190_528, Some(1_240_743), 66_060_288);
        assert_eq!(
            layout.kernel,
            Extent {
                lba: 2048,
                sectors: 27_716
            }
        );
        assert_eq!(
            layout.initrd,
            Some(Extent {
                lba: 29_764,
                sectors: 2_424
            })
        );
        assert_eq!(layout.root.lba, 32_768);
        assert_eq!(layout.head_bytes(), 16 << 20);
        assert_eq!(layout.disk_bytes(), (16 << 20) + 66_060_288);
        let config = layout.grub_config("console=ttyS0 quiet");
        assert_eq!(
            config,
            "linux (hd0)2048+27716 console=ttyS0 quiet root=/dev/vda1\n\
             initrd (hd0)29764+2424\nboot\n"
        );
        // A payload that ends on a boundary still leaves the root its own MiB.
        let exact = BootLayout::new(2047 * 512, None, 1 << 20);
        assert_eq!(exact.root.lba, 4096);
        assert!(!exact.grub_config("").contains("initrd"));
    }

    #[test]
    fn the_boot_sector_points_at_core_and_holds_one_active_linux_partition() {
        let mut boot_img = vec![0xccu8; 512];
        boot_img[510] = 0x55;
        boot_img[511] = 0xaa;
        let layout = BootLayout::new(1 << 20, None, 64 << 20);
        let sector = layout.boot_sector(&boot_img).unwrap();
        assert_eq!(&sector[0x5c..0x64], &1u64.to_le_bytes());
        assert_eq!(sector[0x64], 0xff);
        assert_eq!(&sector[0x66..0x68], &[0x90, 0x90]);
        assert_eq!(sector[0x1be], 0x80);
        assert_eq!(sector[0x1c2], 0x83);
        assert_eq!(&sector[0x1c6..0x1ca], &4096u32.to_le_bytes());
        assert_eq!(&sector[0x1ca..0x1ce], &(131_072u32).to_le_bytes());
        assert!(sector[0x1ce..0x1fe].iter().all(|b| *b == 0));
        assert_eq!(&sector[510..], &[0x55, 0xaa]);
        // The code around the patched bytes is GRUB's, untouched.
        assert_eq!(sector[0], 0xcc);
        assert_eq!(sector[0x1bd], 0xcc);

        assert_eq!(
            layout.boot_sector(&[0u8; 512]),
            Err(BootDiskError::BootImage(512))
        );
        assert_eq!(
            layout.boot_sector(&boot_img[..100]),
            Err(BootDiskError::BootImage(100))
        );
        let huge = BootLayout::new(1 << 20, None, 3 << 40);
        assert!(matches!(
            huge.boot_sector(&boot_img),
            Err(BootDiskError::RootTooBig(_))
        ));
    }

    #[test]
    fn core_is_padded_and_its_blocklist_names_the_sectors_after_the_first() {
        let core = placed_core(&vec![7u8; 130_990]).unwrap();
        assert_eq!(core.len(), 256 * 512);
        assert_eq!(&core[500..508], &2u64.to_le_bytes());
        assert_eq!(&core[508..510], &255u16.to_le_bytes());
        assert_eq!(&core[510..512], &0x820u16.to_le_bytes());
        assert_eq!(core[499], 7);
        assert_eq!(core[130_989], 7);
        assert_eq!(core[130_990], 0);
        assert_eq!(
            placed_core(&vec![0u8; 2047 * 512 + 1]),
            Err(BootDiskError::CoreTooBig(2047 * 512 + 1))
        );
    }

    #[test]
    fn the_root_is_replaced_or_added_on_the_command_line() {
        assert_eq!(
            root_cmdline("root=/dev/vda rw console=ttyS0", "/dev/vda1"),
            "root=/dev/vda1 rw console=ttyS0"
        );
        assert_eq!(
            root_cmdline("console=ttyS0 quiet", "/dev/vda1"),
            "console=ttyS0 quiet root=/dev/vda1"
        );
    }
}
