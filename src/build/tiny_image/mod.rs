//! Builds farm's *tiny* image: a Debian cloud kernel, a busybox userland and dropbear, in a
//! disk of a few MiB that boots to ssh in seconds under TCG.
//!
//! Why it exists: nested TCG costs ~20x (see `ENVIRONMENT.md`), so a systemd Debian guest
//! started inside a guest never finishes booting in a CI run. Guests inside guests must have
//! no systemd, no udev, no cloud-init: busybox `init` runs one shell script
//! (`src/guest_agent/tiny-init.sh`, listed with everything else baked in by
//! [`crate::model::build::tiny_recipe`]) that applies the same `farm/` seed files as the Debian
//! images' agent, then starts dropbear.
//!
//! Why this shape: everything comes from Debian bookworm packages fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x` (never installed on the host), so the
//! build needs only the mirror the machines already reach. The layout of the result is
//! [`crate::build::debian_image`]'s (`disk.qcow2` plus `boot/{vmlinuz,initrd.img,cmdline}`), so the
//! rest of farm boots both the same way. The initramfs is written by a small cpio writer in
//! this module rather than the `cpio` tool: it needs device nodes (`/dev/console`) that an
//! unprivileged tool run could not create, and it keeps one dependency off the host.

mod initramfs;
mod modules;
mod packages;
mod tree;

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

pub use initramfs::Cpio;
pub use modules::{load_order, module_depends};
pub use packages::deb_file_name;

use crate::build::tool_log::LogError;
use crate::build::tools::{Scratch, ScratchError, ToolError, ToolRunner, tree_bytes};
use crate::model::build::tiny_recipe::{PACKAGES, kernel_cmdline};
use crate::model::values::Arch;

/// Free space in the root filesystem beyond what the files use: room for logs, keys and a
/// test's scratch files. qcow2 stores only written clusters, so unused space costs nothing.
const HEADROOM_BYTES: u64 = 48 * 1024 * 1024;

pub struct TinyImageRequest<'a> {
    pub arch: Arch,
    /// A staging directory; on success it holds `disk.qcow2` and `boot/` and nothing else.
    pub out_dir: &'a Path,
    /// Full output of every tool is appended here.
    pub log: &'a Path,
    /// Downloaded `.deb` files are kept here, so a rebuild of the same versions downloads
    /// nothing.
    pub cache_dir: &'a Path,
}

/// What a build produced and how long it took, for meta.json and status lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TinyImageReport {
    /// The kernel in `boot/vmlinuz` (`6.1.0-28-cloud-amd64`).
    pub kernel_version: String,
    /// Modules in the initramfs (and the disk), in load order.
    pub modules: Vec<String>,
    /// Bytes the root tree occupies.
    pub rootfs_bytes: u64,
    pub initrd_bytes: u64,
    /// The size of the disk as the guest sees it.
    pub disk_virtual_bytes: u64,
    /// The size of `disk.qcow2` on the host.
    pub disk_file_bytes: u64,
    /// Resolving versions and downloading (zero work when the cache has every package).
    pub fetch_time: Duration,
    pub total_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TinyImageError {
    #[error(
        "Building the {arch} tiny image on this {host} host needs `{program}` to list the applets of {arch}'s busybox\nhint: install Debian's `qemu-user-static` (`./scripts/setup.sh` does)"
    )]
    NoEmulator {
        arch: Arch,
        host: &'static str,
        program: String,
    },
    #[error(
        "Building the tiny image needs root: `mkfs.ext4 -d` records file owners as it finds them, and dropbear refuses keys in a home not owned by root\nhint: run the build as root (e.g. `sudo -E farm build`)"
    )]
    NeedsRoot,
    #[error(
        "apt knows no candidate for `{package}`\nhint: run `apt-get update`, and check that a Debian bookworm mirror is in /etc/apt/sources.list"
    )]
    NoCandidate { package: String },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(
        "The kernel package has no module `{module}` under `{dir}` and does not list it as built in\nhint: this is a bug in farm's module list for this kernel"
    )]
    NoModule { module: String, dir: PathBuf },
    #[error(
        "The unpacked packages lack `{path}`\nhint: this is a bug in farm's package list; the full output is in the build log"
    )]
    Missing { path: PathBuf },
    #[error(transparent)]
    Scratch(#[from] ScratchError),
    #[error(transparent)]
    Log(#[from] LogError),
    /// File system errors; `fs_err` puts the path in the message.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Builds `out_dir/disk.qcow2` and `out_dir/boot/{vmlinuz,initrd.img,cmdline}`.
///
/// Scratch space (unpacked packages, the root tree, a raw image) lives in `out_dir` and is
/// removed whether the build succeeds or not.
pub fn build_tiny_image(
    req: &TinyImageRequest,
    progress: &ProgressBar,
) -> Result<TinyImageReport, TinyImageError> {
    let started = Instant::now();
    crate::build::tools::require(&["apt-get", "apt-cache", "dpkg-deb", "mkfs.ext4", "qemu-img"])?;
    if fs_err::metadata("/proc/self")?.uid() != 0 {
        return Err(TinyImageError::NeedsRoot);
    }
    // The root tree lists busybox's applets by running the unpacked busybox: another
    // architecture's through qemu's user-mode emulator (checked before anything is fetched).
    let emulator = foreign_emulator(req.arch)?;
    let scratch = Scratch::fresh(req.out_dir, &["unpacked", "rootfs"], &["rootfs.raw"])?;
    fs_err::create_dir_all(req.cache_dir)?;
    let log = ToolRunner::open(req.log)?;
    let unpacked = req.out_dir.join("unpacked");
    let rootfs = req.out_dir.join("rootfs");
    let raw = req.out_dir.join("rootfs.raw");

    // 1. Packages.
    progress.set_message("resolving the tiny image's packages");
    let phase = Instant::now();
    let apt = packages::Apt::for_arch(req.arch, req.cache_dir)?;
    let kernel_version = packages::current_kernel(&log, &apt)?;
    let mut packages = vec![format!("linux-image-{kernel_version}")];
    packages.extend(PACKAGES.iter().map(|p| p.to_string()));
    let debs = packages::fetch_debs(&log, &apt, req.cache_dir, &packages, progress)?;
    let fetch_time = phase.elapsed();

    progress.set_message("unpacking packages");
    fs_err::create_dir_all(&unpacked)?;
    for deb in &debs {
        log.tool("dpkg-deb")
            .args([
                std::ffi::OsStr::new("-x"),
                deb.as_os_str(),
                unpacked.as_os_str(),
            ])
            .hint(|| format!("delete `{}` so it is downloaded again", deb.display()))
            .run()?;
    }

    // 2. Modules, in load order.
    let module_dir = unpacked.join("lib/modules").join(&kernel_version);
    let modules = modules::resolve_modules(&module_dir)?;
    log.note(&format!("modules in load order: {}", modules.join(" ")))?;

    // 3. The initramfs and boot files.
    progress.set_message("writing the initramfs");
    let boot = req.out_dir.join("boot");
    fs_err::create_dir_all(&boot)?;
    let vmlinuz = unpacked.join(format!("boot/vmlinuz-{kernel_version}"));
    if !vmlinuz.exists() {
        return Err(TinyImageError::Missing { path: vmlinuz });
    }
    fs_err::copy(&vmlinuz, boot.join("vmlinuz"))?;
    let busybox = fs_err::read(unpacked.join("bin/busybox"))?;
    let initrd = initramfs::initramfs(&busybox, &module_dir, &modules)?;
    fs_err::write(boot.join("initrd.img"), &initrd)?;
    fs_err::write(
        boot.join("cmdline"),
        format!("{}\n", kernel_cmdline(req.arch)),
    )?;
    for name in ["vmlinuz", "initrd.img", "cmdline"] {
        // Readable by the (unprivileged) qemu that boots it; the store makes it read-only.
        fs_err::set_permissions(boot.join(name), std::fs::Permissions::from_mode(0o644))?;
    }

    // 4. The root tree.
    progress.set_message("assembling the root tree");
    let applets = tree::busybox_applets(&log, &unpacked.join("bin/busybox"), emulator.as_deref())?;
    tree::root_tree(
        req.arch,
        &rootfs,
        &unpacked,
        &module_dir,
        &modules,
        &applets,
    )?;

    // 5. The filesystem and the qcow2.
    let rootfs_bytes = tree_bytes(&rootfs)?;
    let disk_virtual_bytes = (rootfs_bytes * 2 + HEADROOM_BYTES).div_ceil(1 << 20) << 20;
    progress.set_message(format!("mkfs.ext4 ({} MiB)", disk_virtual_bytes >> 20));
    let disk = req.out_dir.join("disk.qcow2");
    log.ext4_qcow2(&rootfs, &raw, &disk, disk_virtual_bytes, progress)?;

    progress.set_message("removing the build tree");
    scratch.remove()?;
    let report = TinyImageReport {
        kernel_version,
        modules,
        rootfs_bytes,
        initrd_bytes: initrd.len() as u64,
        disk_virtual_bytes,
        disk_file_bytes: fs_err::metadata(&disk)?.len(),
        fetch_time,
        total_time: started.elapsed(),
    };
    log.note(&format!(
        "built the tiny image: kernel {}, rootfs {} KiB, initrd {} KiB, disk {} MiB virtual / {} KiB qcow2; fetch {:.1} s, total {:.1} s",
        report.kernel_version,
        report.rootfs_bytes >> 10,
        report.initrd_bytes >> 10,
        report.disk_virtual_bytes >> 20,
        report.disk_file_bytes >> 10,
        report.fetch_time.as_secs_f64(),
        report.total_time.as_secs_f64(),
    ))?;
    Ok(report)
}

/// farm's initramfs (busybox, the virtio and ext4 modules in load order, an `/init` that
/// mounts `/dev/vda`) from a Debian tree's `busybox` and module directory, with the modules
/// it loads: what boots a Debian image with `init = "busybox"`.
pub fn farm_initramfs(
    busybox: &Path,
    module_dir: &Path,
) -> Result<(Vec<u8>, Vec<String>), TinyImageError> {
    if !busybox.exists() {
        return Err(TinyImageError::Missing {
            path: busybox.to_path_buf(),
        });
    }
    let modules = modules::resolve_modules(module_dir)?;
    let initrd = initramfs::initramfs(&fs_err::read(busybox)?, module_dir, &modules)?;
    Ok((initrd, modules))
}

/// qemu's user-mode emulator for `arch` when it is not the host's (`qemu-aarch64-static`),
/// or `None` when `arch`'s programs run natively.
fn foreign_emulator(arch: Arch) -> Result<Option<PathBuf>, TinyImageError> {
    if Some(arch) == crate::sys::hostinfo::host_arch() {
        return Ok(None);
    }
    let program = format!("qemu-{}-static", arch.name());
    crate::sys::programs::find_program(&program)
        .map(Some)
        .ok_or(TinyImageError::NoEmulator {
            arch,
            host: std::env::consts::ARCH,
            program,
        })
}

/// One item a line, for the files that list modules.
fn lines(items: &[String]) -> String {
    items.iter().map(|l| format!("{l}\n")).collect()
}
