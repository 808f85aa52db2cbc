//! Builds farm's *tiny* image: a Debian cloud kernel, a busybox userland and dropbear, in a
//! disk of a few MiB that boots to ssh in seconds under TCG.
//!
//! Why it exists: nested TCG costs ~20x (see `ENVIRONMENT.md`), so a systemd Debian guest
//! started inside a guest never finishes booting in a CI run. Guests inside guests must have
//! no systemd, no udev, no cloud-init: busybox `init` runs one shell script
//! (`src/guest_agent/tiny-init.sh`, listed with everything else baked in by
//! [`crate::model::tiny_recipe`]) that applies the same `farm/` seed files as the Debian
//! images' agent, then starts dropbear.
//!
//! Why this shape: everything comes from Debian bookworm packages fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x` (never installed on the host), so the
//! build needs only the mirror the machines already reach. The layout of the result is
//! [`crate::debian_image`]'s (`disk.qcow2` plus `boot/{vmlinuz,initrd.img,cmdline}`), so the
//! rest of farm boots both the same way. The initramfs is written by a small cpio writer in
//! this module rather than the `cpio` tool: it needs device nodes (`/dev/console`) that an
//! unprivileged tool run could not create, and it keeps one dependency off the host.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use crate::debian_image::{find_program, tree_bytes};
use crate::model::tiny_recipe::{
    BOOT_SCRIPT, DROPBEAR_LIBS, INITRAMFS_INIT, INITTAB, KERNEL_CMDLINE, KERNEL_META_PACKAGE,
    PACKAGES, SSHD_SCRIPT, UDHCPC_SCRIPT, WANTED_MODULES,
};
use crate::model::values::Arch;
use crate::tool_log::{LogError, ToolLog};

/// Free space in the root filesystem beyond what the files use: room for logs, keys and a
/// test's scratch files. qcow2 stores only written clusters, so unused space costs nothing.
const HEADROOM_BYTES: u64 = 48 * 1024 * 1024;

/// How many trailing output lines an error quotes; the whole output is in the log.
const TAIL_LINES: usize = 20;

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
    #[error("The `{tool}` program was not found on PATH\nhint: apt-get install {package}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error(
        "The tiny image is only built for x86_64 so far (asked for {arch})\nhint: use a Debian image for other architectures"
    )]
    UnsupportedArch { arch: Arch },
    #[error(
        "Building the tiny image needs root: `mkfs.ext4 -d` records file owners as it finds them, and dropbear refuses keys in a home not owned by root\nhint: run the build as root (e.g. `sudo -E farm build`)"
    )]
    NeedsRoot,
    #[error(
        "apt knows no candidate for `{package}`\nhint: run `apt-get update`, and check that a Debian bookworm mirror is in /etc/apt/sources.list"
    )]
    NoCandidate { package: String },
    #[error("Could not run `{tool}`: {source}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "The `{tool}` command failed ({status}); its last lines follow, the full output is in `{log}`:\n{tail}\nhint: {hint}"
    )]
    ToolFailed {
        tool: &'static str,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
        hint: String,
    },
    #[error(
        "The kernel package has no module `{module}` under `{dir}` and does not list it as built in\nhint: this is a bug in farm's module list for this kernel"
    )]
    NoModule { module: String, dir: PathBuf },
    #[error(
        "The unpacked packages lack `{path}`\nhint: this is a bug in farm's package list; the full output is in the build log"
    )]
    Missing { path: PathBuf },
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
    if req.arch != Arch::X86_64 || std::env::consts::ARCH != "x86_64" {
        // The rootfs lists busybox's applets by running the unpacked busybox, and apt
        // downloads the host's architecture.
        return Err(TinyImageError::UnsupportedArch { arch: req.arch });
    }
    for (tool, package) in TOOLS {
        if find_program(tool).is_none() {
            return Err(TinyImageError::ToolMissing { tool, package });
        }
    }
    if fs_err::metadata("/proc/self")?.uid() != 0 {
        return Err(TinyImageError::NeedsRoot);
    }
    fs_err::create_dir_all(req.out_dir)?;
    fs_err::create_dir_all(req.cache_dir)?;
    let log = ToolRunner(ToolLog::open(req.log)?);

    let unpacked = req.out_dir.join("unpacked");
    let rootfs = req.out_dir.join("rootfs");
    let raw = req.out_dir.join("rootfs.raw");
    let scratch = Scratch {
        dirs: vec![unpacked.clone(), rootfs.clone()],
        files: vec![raw.clone()],
    };
    scratch.remove()?;

    // 1. Packages.
    progress.set_message("resolving the tiny image's packages");
    let phase = Instant::now();
    let kernel_version = current_kernel(&log)?;
    let mut packages = vec![format!("linux-image-{kernel_version}")];
    packages.extend(PACKAGES.iter().map(|p| p.to_string()));
    let debs = fetch_debs(&log, req.cache_dir, &packages, progress)?;
    let fetch_time = phase.elapsed();

    progress.set_message("unpacking packages");
    fs_err::create_dir_all(&unpacked)?;
    for deb in &debs {
        log.run(
            "dpkg-deb",
            &["-x".into(), deb.clone().into(), unpacked.clone().into()],
            None,
            || format!("delete `{}` so it is downloaded again", deb.display()),
        )?;
    }

    // 2. Modules, in load order.
    let module_dir = unpacked.join("lib/modules").join(&kernel_version);
    let modules = resolve_modules(&module_dir)?;
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
    let initrd = initramfs(&busybox, &module_dir, &modules)?;
    fs_err::write(boot.join("initrd.img"), &initrd)?;
    fs_err::write(boot.join("cmdline"), format!("{KERNEL_CMDLINE}\n"))?;
    for name in ["vmlinuz", "initrd.img", "cmdline"] {
        // Readable by the (unprivileged) qemu that boots it; the store makes it read-only.
        fs_err::set_permissions(boot.join(name), std::fs::Permissions::from_mode(0o644))?;
    }

    // 4. The root tree.
    progress.set_message("assembling the root tree");
    let applets = busybox_applets(&log, &unpacked.join("bin/busybox"))?;
    root_tree(&rootfs, &unpacked, &module_dir, &modules, &applets)?;

    // 5. The filesystem and the qcow2.
    let rootfs_bytes = tree_bytes(&rootfs)?;
    let disk_virtual_bytes = (rootfs_bytes * 2 + HEADROOM_BYTES).div_ceil(1 << 20) << 20;
    progress.set_message(format!("mkfs.ext4 ({} MiB)", disk_virtual_bytes >> 20));
    fs_err::File::create(&raw)?.set_len(disk_virtual_bytes)?;
    log.run(
        "mkfs.ext4",
        &[
            "-F".into(),
            "-q".into(),
            "-L".into(),
            "farm-root".into(),
            "-d".into(),
            rootfs.clone().into(),
            raw.clone().into(),
        ],
        None,
        || format!("check free space for `{}`", raw.display()),
    )?;
    progress.set_message("qemu-img convert to qcow2");
    let disk = req.out_dir.join("disk.qcow2");
    log.run(
        "qemu-img",
        &[
            "convert".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "qcow2".into(),
            raw.clone().into(),
            disk.clone().into(),
        ],
        None,
        || format!("check free space in `{}`", req.out_dir.display()),
    )?;

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

/// The tools a build runs and the Debian package that provides each.
const TOOLS: [(&str, &str); 5] = [
    ("apt-get", "apt"),
    ("apt-cache", "apt"),
    ("dpkg-deb", "dpkg"),
    ("mkfs.ext4", "e2fsprogs"),
    ("qemu-img", "qemu-utils"),
];

/// The versioned kernel `linux-image-cloud-amd64` points at (`6.1.0-28-cloud-amd64`), so the
/// image follows Debian's security updates. Runs `apt-get update` once if apt knows nothing.
fn current_kernel(log: &ToolRunner) -> Result<String, TinyImageError> {
    let parse = |out: &str| {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .map(str::trim)
            .find(|v| v.ends_with("-cloud-amd64"))
            .map(str::to_string)
    };
    let args: Vec<OsString> = vec!["depends".into(), KERNEL_META_PACKAGE.into()];
    if let Ok(out) = log.output("apt-cache", &args)
        && let Some(version) = parse(&out)
    {
        return Ok(version);
    }
    apt_update(log)?;
    let out = log.output("apt-cache", &args)?;
    parse(&out).ok_or(TinyImageError::NoCandidate {
        package: KERNEL_META_PACKAGE.into(),
    })
}

fn apt_update(log: &ToolRunner) -> Result<(), TinyImageError> {
    log.run("apt-get", &["update".into()], None, || {
        "check that the Debian mirror in /etc/apt/sources.list is reachable".into()
    })
}

/// `name_version_arch.deb` as `apt-get download` names it (the epoch's `:` as `%3a`).
pub fn deb_file_name(package: &str, version: &str, arch: &str) -> String {
    format!("{package}_{}_{arch}.deb", version.replace(':', "%3a"))
}

/// The candidate `(version, architecture)` of each package, from one `apt-cache show`.
fn candidates(
    log: &ToolRunner,
    packages: &[String],
) -> Result<BTreeMap<String, (String, String)>, TinyImageError> {
    let mut args: Vec<OsString> = vec!["show".into(), "--no-all-versions".into()];
    args.extend(packages.iter().map(OsString::from));
    let out = log.output("apt-cache", &args)?;
    let mut found = BTreeMap::new();
    for stanza in out.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        if let (Some(p), Some(v), Some(a)) =
            (field("Package:"), field("Version:"), field("Architecture:"))
        {
            found.entry(p).or_insert((v, a));
        }
    }
    Ok(found)
}

/// The `.deb` of every package's candidate version, downloaded into `cache_dir` unless it is
/// there already.
fn fetch_debs(
    log: &ToolRunner,
    cache_dir: &Path,
    packages: &[String],
    progress: &ProgressBar,
) -> Result<Vec<PathBuf>, TinyImageError> {
    let mut found = candidates(log, packages);
    if found
        .as_ref()
        .map_or(true, |f| packages.iter().any(|p| !f.contains_key(p)))
    {
        apt_update(log)?;
        found = candidates(log, packages);
    }
    let found = found?;
    let mut debs = Vec::new();
    let mut missing = Vec::new();
    for package in packages {
        let (version, arch) = found
            .get(package)
            .ok_or_else(|| TinyImageError::NoCandidate {
                package: package.clone(),
            })?;
        let deb = cache_dir.join(deb_file_name(package, version, arch));
        if !deb.exists() {
            missing.push(format!("{package}={version}"));
        }
        debs.push(deb);
    }
    if !missing.is_empty() {
        progress.set_message(format!("apt-get download ({} packages)", missing.len()));
        let mut args: Vec<OsString> = vec![
            // The cache directory is usually not readable by `_apt`; downloading as root
            // avoids a warning and a failed chown.
            "-o".into(),
            "APT::Sandbox::User=root".into(),
            "-o".into(),
            "Acquire::Retries=3".into(),
            "download".into(),
        ];
        args.extend(missing.iter().map(OsString::from));
        log.run("apt-get", &args, Some(cache_dir), || {
            "check that the Debian mirror is reachable (`apt-get update`)".into()
        })?;
    }
    for deb in &debs {
        if !deb.exists() {
            return Err(TinyImageError::Missing { path: deb.clone() });
        }
    }
    Ok(debs)
}

/// The `depends=` field of a kernel module's `.modinfo` section: the modules it needs
/// loaded first. Read from the bytes, so the host needs no `modinfo` (kmod).
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"depends=";
    let mut at = 0;
    while let Some(pos) = ko[at..].windows(KEY.len()).position(|w| w == KEY) {
        let start = at + pos;
        at = start + KEY.len();
        // A field starts a NUL-separated string; `depends=` inside other text is not one.
        if start > 0 && ko[start - 1] != 0 {
            continue;
        }
        let end = ko[at..]
            .iter()
            .position(|&b| b == 0)
            .map_or(ko.len(), |e| at + e);
        return String::from_utf8_lossy(&ko[at..end])
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
    }
    Vec::new()
}

/// Every module file under `dir`, by module name (`-` and `_` are one in module names).
fn index_modules(dir: &Path) -> io::Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![dir.join("kernel")];
    while let Some(path) = stack.pop() {
        for entry in fs_err::read_dir(&path)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
                && let Some(stem) = name.strip_suffix(".ko")
            {
                index.insert(stem.replace('-', "_"), path.clone());
            }
        }
    }
    Ok(index)
}

/// [`WANTED_MODULES`] and their dependencies, dependencies first: the order `insmod` needs.
fn resolve_modules(dir: &Path) -> Result<Vec<String>, TinyImageError> {
    let index = index_modules(dir)?;
    let builtin: HashSet<String> = fs_err::read_to_string(dir.join("modules.builtin"))?
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko"))
        .map(|n| n.replace('-', "_"))
        .collect();
    let mut depends = BTreeMap::new();
    let mut queue: VecDeque<String> = WANTED_MODULES.iter().map(|m| m.replace('-', "_")).collect();
    while let Some(module) = queue.pop_front() {
        if depends.contains_key(&module) || builtin.contains(&module) {
            continue;
        }
        let path = index.get(&module).ok_or_else(|| TinyImageError::NoModule {
            module: module.clone(),
            dir: dir.to_path_buf(),
        })?;
        let deps: Vec<String> = module_depends(&fs_err::read(path)?)
            .into_iter()
            .map(|d| d.replace('-', "_"))
            .filter(|d| !builtin.contains(d))
            .collect();
        queue.extend(deps.iter().cloned());
        depends.insert(module, deps);
    }
    Ok(load_order(&depends))
}

/// A topological order of `depends` (name → names it needs): every module after its
/// dependencies; ties in the order the wanted list gives them, so the order is stable.
pub fn load_order(depends: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    fn visit(
        module: &str,
        depends: &BTreeMap<String, Vec<String>>,
        done: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !done.insert(module.to_string()) {
            return;
        }
        for dep in depends.get(module).into_iter().flatten() {
            visit(dep, depends, done, order);
        }
        if depends.contains_key(module) {
            order.push(module.to_string());
        }
    }
    let mut done = HashSet::new();
    let mut order = Vec::new();
    let roots = WANTED_MODULES
        .iter()
        .map(|m| m.replace('-', "_"))
        .chain(depends.keys().cloned())
        .collect::<Vec<_>>();
    for module in roots {
        visit(&module, depends, &mut done, &mut order);
    }
    order
}

/// The gzip'd newc initramfs: busybox, the modules (flat, by module name) and `/init`.
fn initramfs(
    busybox: &[u8],
    module_dir: &Path,
    modules: &[String],
) -> Result<Vec<u8>, TinyImageError> {
    let index = index_modules(module_dir)?;
    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "newroot",
        "proc",
        "sys",
        "run",
        "tmp",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before anything can mount devtmpfs.
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.char_device("dev/null", 0o666, 1, 3);
    cpio.file("bin/busybox", 0o755, busybox);
    cpio.file("init", 0o755, INITRAMFS_INIT.as_bytes());
    cpio.file("etc/farm-modules", 0o644, lines(modules).as_bytes());
    for module in modules {
        let path = &index[module];
        cpio.file(
            &format!("lib/modules/{module}.ko"),
            0o644,
            &fs_err::read(path)?,
        );
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&cpio.finish())?;
    Ok(gz.finish()?)
}

fn lines(items: &[String]) -> String {
    items.iter().map(|l| format!("{l}\n")).collect()
}

/// A newc ("070701") cpio archive in memory: just what an initramfs needs. Every entry is
/// owned by root with mtime 0, so the same inputs give the same bytes.
#[derive(Default)]
pub struct Cpio {
    data: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            body.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, perm: u32, body: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), body);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, (0, 0), target.as_bytes());
    }

    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | perm, (major, minor), &[]);
    }

    /// The archive with its `TRAILER!!!` entry.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

/// busybox's applets with their install paths (`/bin/sh`, `/sbin/init`, …), from the
/// unpacked binary itself, so the links match the busybox that is shipped.
fn busybox_applets(log: &ToolRunner, busybox: &Path) -> Result<Vec<String>, TinyImageError> {
    let out = log.output_of(busybox, "busybox", &["--list-full".into()])?;
    Ok(out
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty() && l != "bin/busybox")
        .collect())
}

/// Writes the root tree the disk is made of.
fn root_tree(
    root: &Path,
    unpacked: &Path,
    module_dir: &Path,
    modules: &[String],
    applets: &[String],
) -> Result<(), TinyImageError> {
    let mode = |path: &Path, mode: u32| {
        fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode))
    };
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "lib/x86_64-linux-gnu",
        "lib64",
        "lib/modules/farm",
        "etc/farm",
        "etc/dropbear",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "var/log",
        "home",
        "mnt",
    ] {
        fs_err::create_dir_all(root.join(dir))?;
    }
    fs_err::create_dir_all(root.join("root/.ssh"))?;
    mode(&root.join("root"), 0o700)?;
    mode(&root.join("root/.ssh"), 0o700)?;
    mode(&root.join("tmp"), 0o1777)?;
    // /var/run, /var/tmp as in Debian.
    std::os::unix::fs::symlink("../run", root.join("var/run"))?;
    std::os::unix::fs::symlink("../tmp", root.join("var/tmp"))?;

    let copy_exe = |from: &Path, to: &str| -> Result<(), TinyImageError> {
        if !from.exists() {
            return Err(TinyImageError::Missing {
                path: from.to_path_buf(),
            });
        }
        let dest = root.join(to);
        fs_err::copy(from, &dest)?;
        mode(&dest, 0o755)?;
        Ok(())
    };
    copy_exe(&unpacked.join("bin/busybox"), "bin/busybox")?;
    for applet in applets {
        let link = root.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        let depth = applet.matches('/').count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        std::os::unix::fs::symlink(target, &link)?;
    }
    copy_exe(&unpacked.join("usr/sbin/dropbear"), "usr/sbin/dropbear")?;
    for tool in ["dropbearconvert", "dropbearkey", "dbclient"] {
        copy_exe(
            &unpacked.join("usr/bin").join(tool),
            &format!("usr/bin/{tool}"),
        )?;
    }
    // Where dropbear looks for the SFTP subsystem (Debian's path, as in the package).
    fs_err::create_dir_all(root.join("usr/lib/openssh"))?;
    copy_exe(
        &unpacked.join("usr/lib/openssh/sftp-server"),
        "usr/lib/openssh/sftp-server",
    )?;
    std::os::unix::fs::symlink("openssh/sftp-server", root.join("usr/lib/sftp-server"))?;
    for lib in DROPBEAR_LIBS {
        let from = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"]
            .iter()
            .map(|d| unpacked.join(d).join(lib))
            .find(|p| p.exists())
            .ok_or_else(|| TinyImageError::Missing {
                path: unpacked.join("lib/x86_64-linux-gnu").join(lib),
            })?;
        // fs_err::copy follows the package's `libz.so.1 -> libz.so.1.2.13` link.
        copy_exe(&from, &format!("lib/x86_64-linux-gnu/{lib}"))?;
    }
    // The interpreter path written in every x86_64 executable.
    std::os::unix::fs::symlink(
        "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        root.join("lib64/ld-linux-x86-64.so.2"),
    )?;

    let index = index_modules(module_dir)?;
    for module in modules {
        fs_err::copy(
            &index[module],
            root.join(format!("lib/modules/farm/{module}.ko")),
        )?;
    }

    let files: [(&str, &str, u32); 14] = [
        ("etc/farm/modules", &lines(modules), 0o644),
        ("etc/farm/boot.sh", BOOT_SCRIPT, 0o755),
        ("etc/farm/sshd.sh", SSHD_SCRIPT, 0o755),
        ("etc/farm/udhcpc.script", UDHCPC_SCRIPT, 0o755),
        ("etc/inittab", INITTAB, 0o644),
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        ),
        (
            "etc/group",
            "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
            0o644,
        ),
        // `*`: no password can match, yet the account is not "locked" (`!`), which some
        // sshds treat as refusing key logins too.
        ("etc/shadow", "root:*:19000:0:99999:7:::\n", 0o600),
        ("etc/shells", "/bin/sh\n/bin/ash\n", 0o644),
        (
            "etc/hosts",
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            0o644,
        ),
        ("etc/hostname", "tiny\n", 0o644),
        (
            "etc/profile",
            "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport HOME=${HOME:-/root}\n",
            0o644,
        ),
        ("etc/resolv.conf", "", 0o644),
        ("etc/fstab", "/dev/vda / ext4 rw 0 1\n", 0o644),
    ];
    for (path, text, perm) in files {
        let dest = root.join(path);
        fs_err::write(&dest, text)?;
        mode(&dest, perm)?;
    }
    Ok(())
}

/// Scratch paths inside the staging directory, removed on success and on every error path.
struct Scratch {
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
}

impl Scratch {
    fn remove(&self) -> Result<(), TinyImageError> {
        for dir in &self.dirs {
            if fs_err::symlink_metadata(dir).is_ok() {
                fs_err::remove_dir_all(dir)?;
            }
        }
        for file in &self.files {
            match fs_err::remove_file(file) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// The shared build log, with this builder's way of running tools.
struct ToolRunner(ToolLog);

impl std::ops::Deref for ToolRunner {
    type Target = ToolLog;
    fn deref(&self) -> &ToolLog {
        &self.0
    }
}

impl ToolRunner {
    fn run(
        &self,
        tool: &'static str,
        args: &[OsString],
        cwd: Option<&Path>,
        hint: impl FnOnce() -> String,
    ) -> Result<(), TinyImageError> {
        let program = find_program(tool).ok_or(TinyImageError::ToolMissing {
            tool,
            package: TOOLS
                .iter()
                .find(|(t, _)| *t == tool)
                .map_or("it", |(_, p)| p),
        })?;
        self.exec(&program, tool, args, cwd, hint).map(|_| ())
    }

    /// Runs a tool on PATH and returns its stdout (also logged).
    fn output(&self, tool: &'static str, args: &[OsString]) -> Result<String, TinyImageError> {
        let program = find_program(tool).ok_or(TinyImageError::ToolMissing {
            tool,
            package: "apt",
        })?;
        self.exec(&program, tool, args, None, || {
            "run `apt-get update` and check the mirror in /etc/apt/sources.list".into()
        })
    }

    fn output_of(
        &self,
        program: &Path,
        tool: &'static str,
        args: &[OsString],
    ) -> Result<String, TinyImageError> {
        self.exec(program, tool, args, None, || {
            "the unpacked program does not run on this host".into()
        })
    }

    /// Runs `program`, appending the command line and all output to the log; on failure the
    /// error quotes the last lines of stderr and stdout.
    fn exec(
        &self,
        program: &Path,
        tool: &'static str,
        args: &[OsString],
        cwd: Option<&Path>,
        hint: impl FnOnce() -> String,
    ) -> Result<String, TinyImageError> {
        let line = std::iter::once(program.as_os_str())
            .chain(args.iter().map(OsString::as_os_str))
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        self.note(&format!("$ {line}"))?;
        let started = Instant::now();
        let mut command = Command::new(program);
        command
            .args(args)
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null());
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let out = command
            .output()
            .map_err(|source| TinyImageError::Spawn { tool, source })?;
        self.write(&out.stdout)?;
        self.write(&out.stderr)?;
        self.note(&format!(
            "{tool}: {} after {:.1} s",
            out.status,
            started.elapsed().as_secs_f64()
        ))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(TAIL_LINES)..].join("\n");
        Err(TinyImageError::ToolFailed {
            tool,
            status: out.status,
            log: self.path().to_path_buf(),
            tail,
            hint: hint(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_depends_from_modinfo() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=virtio_ring,virtio\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["virtio_ring", "virtio"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"no such field").is_empty());
    }

    #[test]
    fn dependencies_load_first() {
        let mut depends = BTreeMap::new();
        let mut add = |m: &str, d: &[&str]| {
            depends.insert(m.to_string(), d.iter().map(|s| s.to_string()).collect())
        };
        add("virtio_net", &["virtio_ring", "virtio", "net_failover"]);
        add("net_failover", &["failover"]);
        add("failover", &[]);
        add("virtio", &["virtio_ring"]);
        add("virtio_ring", &[]);
        add(
            "virtio_pci",
            &["virtio_ring", "virtio_pci_modern_dev", "virtio"],
        );
        add("virtio_pci_modern_dev", &[]);
        let order = load_order(&depends);
        let at = |m: &str| order.iter().position(|x| x == m).unwrap();
        assert_eq!(order.len(), depends.len());
        for (module, deps) in &depends {
            for dep in deps {
                assert!(at(dep) < at(module), "{dep} before {module}: {order:?}");
            }
        }
    }

    #[test]
    fn cpio_is_newc_with_trailer() {
        let mut cpio = Cpio::default();
        cpio.dir("bin");
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        cpio.symlink("bin/sh", "busybox");
        let data = cpio.finish();
        assert!(data.starts_with(b"070701"));
        assert_eq!(data.len() % 4, 0);
        let text = String::from_utf8_lossy(&data);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn deb_names_match_apt_get_download() {
        assert_eq!(
            deb_file_name("busybox-static", "1:1.35.0-4+deb12u1+b1", "amd64"),
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
        );
    }
}
