//! Builds a bootable Debian disk from a package mirror, with no image host and no VM.
//!
//! Why this shape: the machines farm runs on reach a Debian mirror but no cloud image host,
//! and under TCG booting an installer would take far too long. `mmdebstrap` assembles a root
//! tree directly from packages, `mkfs.ext4 -d` turns the tree into a filesystem without
//! mounting anything, and `qemu-img convert` makes it the qcow2 the store keeps. The disk has
//! no partition table and no boot loader: farm boots it with `-kernel/-initrd` taken from the
//! tree (`boot/` beside `disk.qcow2`), which is also the fastest way to boot under TCG.
//!
//! The image carries farm's seed agent (`src/guest_agent/`) instead of cloud-init: it applies
//! the `farm/` directory of the instance's NoCloud seed (see [`crate::model::build::seed`]) before the
//! network and sshd start, so the first ssh connection already meets the host key farm pinned.
//!
//! Every tool's full output is appended to the build log; errors quote only its last lines.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use crate::build::tool_log::LogError;
use crate::build::tools::{Scratch, ScratchError, ToolError, ToolRunner, tree_bytes};
pub use crate::model::build::debian_recipe::{
    AGENT_SCRIPT, AGENT_UNIT, CUSTOMIZE_SCRIPT, DEFAULT_VARIANT, ESSENTIAL_HOOK, SEED_LIBRARY,
    customize_script, kernel_cmdline, required_packages,
};
use crate::model::build::tiny_recipe;
use crate::model::config::{DebianInit, DebianSpec};
use crate::model::shell::quote_word;
use crate::model::values::Arch;

/// Free space added to the root filesystem beyond what the packages use: at least this much,
/// or half the used size if that is more. Platform layers install packages into this space
/// (a hypervisor's qemu alone is ~400 MB); qcow2 stores only written clusters, so space never
/// used costs nothing in the store.
const MIN_HEADROOM_BYTES: u64 = 1024 * 1024 * 1024;

pub struct DebianImageRequest<'a> {
    pub spec: &'a DebianSpec,
    pub arch: Arch,
    /// A staging directory; on success it holds `disk.qcow2` and `boot/` and nothing else.
    pub out_dir: &'a Path,
    /// Full output of every tool is appended here.
    pub log: &'a Path,
}

/// What a build produced and how long its phases took, for meta.json and status lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebianImageReport {
    /// The kernel in `boot/vmlinuz` (`6.1.0-28-cloud-amd64`): its modules are in the disk.
    pub kernel_version: String,
    /// Bytes the root tree occupies (allocated blocks, hard links counted once).
    pub rootfs_bytes: u64,
    /// The size of the disk as the guest sees it.
    pub disk_virtual_bytes: u64,
    /// The size of `disk.qcow2` on the host.
    pub disk_file_bytes: u64,
    pub mmdebstrap_time: Duration,
    pub mkfs_time: Duration,
    pub convert_time: Duration,
    pub total_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DebianImageError {
    #[error(
        "Building a Debian image needs root: mmdebstrap must create files owned by root, and `mkfs.ext4 -d` records owners as it finds them\nhint: run the build as root (e.g. `sudo -E farm build`)"
    )]
    NeedsRoot,
    #[error(
        "Building an {arch} Debian image on this {host} machine runs {arch} maintainer scripts, which needs QEMU user-mode emulation registered with binfmt_misc: {problem}\nhint: as root, `apt-get install qemu-user-static`, `mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc` if it is not mounted, then `cat /usr/lib/binfmt.d/qemu-{arch}.conf > /proc/sys/fs/binfmt_misc/register` (systemd-binfmt does this at boot; `./scripts/setup.sh` does it here)"
    )]
    ForeignArch {
        arch: Arch,
        host: &'static str,
        problem: String,
    },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(
        "mmdebstrap installed no kernel: `{dir}` has no `vmlinuz-*` with a matching `initrd.img-*`\nhint: this is a bug in farm's package list for {arch}; the full output is in the build log"
    )]
    NoKernel { dir: PathBuf, arch: Arch },
    #[error(transparent)]
    Scratch(#[from] ScratchError),
    #[error(transparent)]
    Log(#[from] LogError),
    /// farm's initramfs for `init = "busybox"`, made from the tree's busybox and modules.
    #[error(transparent)]
    Initramfs(#[from] Box<crate::build::tiny_image::TinyImageError>),
    /// File system errors; `fs_err` puts the path in the message.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The files the customize hook for `init` reads from the agent directory.
fn agent_files(init: DebianInit, arch: Arch) -> Vec<(&'static str, String)> {
    let files: Vec<(&str, &str)> = match init {
        DebianInit::Systemd => vec![
            ("farm-seed.sh", AGENT_SCRIPT),
            ("seed-lib.sh", SEED_LIBRARY),
            ("farm-seed.service", AGENT_UNIT),
        ],
        DebianInit::Busybox => vec![
            ("boot.sh", tiny_recipe::BOOT_SCRIPT),
            ("seed-lib.sh", SEED_LIBRARY),
            ("sshd.sh", tiny_recipe::SSHD_SCRIPT),
            ("udhcpc.script", tiny_recipe::UDHCPC_SCRIPT),
        ],
    };
    let mut files: Vec<(&'static str, String)> =
        files.into_iter().map(|(n, t)| (n, t.to_string())).collect();
    if init == DebianInit::Busybox {
        files.push(("inittab", tiny_recipe::inittab(arch)));
    }
    files.push((customize_file(init), customize_script(init).to_string()));
    files
}

/// The customize hook's file name in the agent directory.
fn customize_file(init: DebianInit) -> &'static str {
    match init {
        DebianInit::Systemd => "customize-rootfs.sh",
        DebianInit::Busybox => "customize-rootfs-busybox.sh",
    }
}

/// The disk size for a root tree of `rootfs_bytes`: used space plus headroom (see
/// [`MIN_HEADROOM_BYTES`]), rounded up to whole MiB.
pub fn disk_size_for(rootfs_bytes: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    let size = rootfs_bytes + (rootfs_bytes / 2).max(MIN_HEADROOM_BYTES);
    size.div_ceil(MIB) * MIB
}

/// The packages given to `--include`: farm's, then the spec's, without repeats.
pub fn include_list(spec: &DebianSpec, arch: Arch) -> Vec<String> {
    let mut seen = HashSet::new();
    required_packages(arch, spec.init)
        .into_iter()
        .chain(spec.packages.iter().cloned())
        .filter(|p| seen.insert(p.clone()))
        .collect()
}

/// The full mmdebstrap command line (without the program name). Pure, so it can be checked
/// without a mirror.
pub fn mmdebstrap_args(
    spec: &DebianSpec,
    arch: Arch,
    rootfs: &Path,
    agent_dir: &Path,
) -> Vec<OsString> {
    let variant = if spec.variant.is_empty() {
        DEFAULT_VARIANT
    } else {
        spec.variant.as_str()
    };
    let customize = format!(
        "sh {} \"$1\" {}",
        quote_word(&agent_dir.join(customize_file(spec.init)).to_string_lossy()),
        quote_word(&agent_dir.to_string_lossy())
    );
    let mut args: Vec<OsString> = vec![
        // Root mode: real owners in the tree (see `NeedsRoot`), and shell hooks can read the
        // agent files from the host.
        "--mode=root".into(),
        format!("--variant={variant}").into(),
        format!("--architectures={}", arch.debian_name()).into(),
        format!("--include={}", include_list(spec, arch).join(",")).into(),
        // A mirror hiccup should not cost a whole rebuild.
        "--aptopt=Acquire::Retries \"3\"".into(),
        // Runs before the kernel package builds the initramfs (see ESSENTIAL_HOOK).
        format!("--essential-hook={ESSENTIAL_HOOK}").into(),
        format!("--customize-hook={customize}").into(),
        spec.suite.clone().into(),
    ];
    args.push(rootfs.as_os_str().to_owned());
    args.push(spec.mirror.clone().into());
    args
}

/// Everything that can be known to fail before minutes of downloading: missing tools, not
/// root, a foreign architecture without binfmt emulation.
pub fn check_prerequisites(arch: Arch) -> Result<(), DebianImageError> {
    crate::build::tools::require(&["mmdebstrap", "mkfs.ext4", "qemu-img"])?;
    // /proc/self belongs to the effective user: no libc call needed to learn it.
    if fs_err::metadata("/proc/self")?.uid() != 0 {
        return Err(DebianImageError::NeedsRoot);
    }
    let host = std::env::consts::ARCH;
    if host != arch.name() {
        // mmdebstrap asks arch-test whether the foreign architecture's programs run.
        crate::build::tools::require(&["arch-test"])?;
    }
    if host != arch.name()
        && let Some(problem) = binfmt_problem(Path::new("/proc/sys/fs/binfmt_misc"), arch)
    {
        return Err(DebianImageError::ForeignArch {
            arch,
            host,
            problem,
        });
    }
    Ok(())
}

/// Why `arch`'s programs would not run here through binfmt_misc under `dir`, or `None` when
/// they would: the file system is mounted, qemu's entry is registered and enabled, and the
/// interpreter it names exists.
pub fn binfmt_problem(dir: &Path, arch: Arch) -> Option<String> {
    if !dir.join("register").exists() {
        return Some(format!("`{}` is not mounted", dir.display()));
    }
    let entry = dir.join(format!("qemu-{}", arch.name()));
    let Ok(text) = fs_err::read_to_string(&entry) else {
        return Some(format!("`{}` is not registered", entry.display()));
    };
    if text.lines().next() != Some("enabled") {
        return Some(format!("`{}` is disabled", entry.display()));
    }
    let interpreter = text
        .lines()
        .find_map(|l| l.strip_prefix("interpreter "))
        .map(PathBuf::from);
    match interpreter {
        Some(path) if !path.exists() => Some(format!(
            "`{}` names the interpreter `{}`, which is not installed",
            entry.display(),
            path.display()
        )),
        _ => None,
    }
}

/// Builds `out_dir/disk.qcow2` and `out_dir/boot/{vmlinuz,initrd.img,cmdline}`.
///
/// Phases show as the bar's message. Scratch space (the root tree, a raw image the size of
/// the disk, the agent files) lives in `out_dir` and is removed whether the build succeeds
/// or not.
pub fn build_debian_image(
    req: &DebianImageRequest,
    progress: &ProgressBar,
) -> Result<DebianImageReport, DebianImageError> {
    let started = Instant::now();
    check_prerequisites(req.arch)?;
    // mmdebstrap wants an empty target: leftovers of an interrupted build go first.
    let scratch = Scratch::fresh(req.out_dir, &["rootfs", "agent"], &["rootfs.raw"])?;
    let log = ToolRunner::open(req.log)?;
    let rootfs = req.out_dir.join("rootfs");
    let raw = req.out_dir.join("rootfs.raw");
    let agent_dir = req.out_dir.join("agent");

    fs_err::create_dir_all(&agent_dir)?;
    for (name, text) in agent_files(req.spec.init, req.arch) {
        fs_err::write(agent_dir.join(name), text)?;
    }

    // 1. The root tree.
    progress.set_message(format!(
        "mmdebstrap {} {}",
        req.spec.suite,
        req.arch.debian_name()
    ));
    let phase = Instant::now();
    log.tool("mmdebstrap")
        .args(mmdebstrap_args(req.spec, req.arch, &rootfs, &agent_dir))
        .on_line(|line| {
            // mmdebstrap announces its phases as `I: …` lines.
            if let Some(step) = line.strip_prefix("I: ") {
                progress.set_message(format!("mmdebstrap: {}", step.trim_end_matches("...")));
            }
        })
        .hint(|| {
            format!(
                "check that `{}` serves suite `{}` for {} and that every package in `packages` exists there",
                req.spec.mirror,
                req.spec.suite,
                req.arch.debian_name()
            )
        })
        .run()?;
    let mmdebstrap_time = phase.elapsed();

    // 2. Boot files, from the tree the disk is made of, so kernel and modules match.
    let boot_src = rootfs.join("boot");
    let kernel_version = find_kernel(&boot_src).ok_or(DebianImageError::NoKernel {
        dir: boot_src.clone(),
        arch: req.arch,
    })?;
    if req.spec.init == DebianInit::Busybox {
        // farm's initramfs replaces Debian's in the tree too, so a platform built on this
        // image finds the boot files it booted with and keeps them.
        progress.set_message("writing farm's initramfs");
        let module_dir = rootfs.join("lib/modules").join(&kernel_version);
        let (initrd, modules) =
            crate::build::tiny_image::farm_initramfs(&rootfs.join("bin/busybox"), &module_dir)
                .map_err(Box::new)?;
        fs_err::write(
            boot_src.join(format!("initrd.img-{kernel_version}")),
            &initrd,
        )?;
        log.note(&format!(
            "busybox init: farm's initramfs ({} KiB) with modules {}",
            initrd.len() >> 10,
            modules.join(" ")
        ))?;
    }
    let boot = req.out_dir.join("boot");
    fs_err::create_dir_all(&boot)?;
    for (from, to) in [("vmlinuz", "vmlinuz"), ("initrd.img", "initrd.img")] {
        let dest = boot.join(to);
        fs_err::copy(boot_src.join(format!("{from}-{kernel_version}")), &dest)?;
        // Readable by the (unprivileged) qemu that boots it; the store makes it read-only.
        fs_err::set_permissions(&dest, std::fs::Permissions::from_mode(0o644))?;
    }
    fs_err::write(
        boot.join("cmdline"),
        format!("{}\n", kernel_cmdline(req.arch, req.spec.init)),
    )?;

    // 3. The filesystem.
    let rootfs_bytes = tree_bytes(&rootfs)?;
    let disk_virtual_bytes = disk_size_for(rootfs_bytes);
    progress.set_message(format!(
        "mkfs.ext4 ({} MiB used, {} MiB disk)",
        rootfs_bytes >> 20,
        disk_virtual_bytes >> 20
    ));
    let disk = req.out_dir.join("disk.qcow2");
    let times = log.ext4_qcow2(&rootfs, &raw, &disk, disk_virtual_bytes, progress)?;

    progress.set_message("removing the build tree");
    scratch.remove()?;
    let report = DebianImageReport {
        kernel_version,
        rootfs_bytes,
        disk_virtual_bytes,
        disk_file_bytes: fs_err::metadata(&disk)?.len(),
        mmdebstrap_time,
        mkfs_time: times.mkfs,
        convert_time: times.convert,
        total_time: started.elapsed(),
    };
    log.note(&format!(
        "built Debian {} {}: kernel {}, rootfs {} MiB, disk {} MiB virtual / {} MiB qcow2; \
         mmdebstrap {:.1} s, mkfs.ext4 {:.1} s, convert {:.1} s, total {:.1} s",
        req.spec.suite,
        req.arch.debian_name(),
        report.kernel_version,
        report.rootfs_bytes >> 20,
        report.disk_virtual_bytes >> 20,
        report.disk_file_bytes >> 20,
        report.mmdebstrap_time.as_secs_f64(),
        report.mkfs_time.as_secs_f64(),
        report.convert_time.as_secs_f64(),
        report.total_time.as_secs_f64(),
    ))?;
    Ok(report)
}

/// The kernel version in `boot` with both a `vmlinuz-V` and an `initrd.img-V`; the newest
/// when a package list pulled in several kernels.
fn find_kernel(boot: &Path) -> Option<String> {
    let names: Vec<String> = fs_err::read_dir(boot)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names
        .iter()
        .filter_map(|n| n.strip_prefix("vmlinuz-"))
        .filter(|v| names.iter().any(|n| n == &format!("initrd.img-{v}")))
        .max_by(|a, b| version_key(a).cmp(&version_key(b)))
        .map(str::to_string)
}

/// Orders `6.1.0-9` before `6.1.0-28`: digit runs compare as numbers.
fn version_key(version: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut rest = version;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (number, tail) = rest.split_at(digits);
        let text_len = tail.len() - tail.trim_start_matches(|c: char| !c.is_ascii_digit()).len();
        let (text, tail) = tail.split_at(text_len);
        key.push((number.parse().unwrap_or(0), text.to_string()));
        rest = tail;
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binfmt_misc directory as the kernel shows it, faked in a temporary directory.
    #[test]
    fn binfmt_problems_name_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let arm = Arch::Aarch64;
        let problem = |d: &Path| binfmt_problem(d, arm).unwrap_or_default();
        assert!(problem(dir.path()).contains("is not mounted"));
        fs_err::write(dir.path().join("register"), "").unwrap();
        assert!(problem(dir.path()).contains("qemu-aarch64` is not registered"));
        let entry = dir.path().join("qemu-aarch64");
        let interpreter = dir.path().join("aarch64-binfmt-P");
        let text = |state: &str| {
            format!(
                "{state}\ninterpreter {}\nflags: POF\noffset 0\n",
                interpreter.display()
            )
        };
        fs_err::write(&entry, text("disabled")).unwrap();
        assert!(problem(dir.path()).contains("is disabled"));
        fs_err::write(&entry, text("enabled")).unwrap();
        assert!(problem(dir.path()).contains("which is not installed"));
        fs_err::write(&interpreter, "").unwrap();
        assert_eq!(binfmt_problem(dir.path(), arm), None);
    }

    fn spec() -> DebianSpec {
        DebianSpec {
            suite: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
            variant: String::new(),
            packages: vec!["qemu-utils".into(), "openssh-server".into()],
            init: DebianInit::Systemd,
        }
    }

    #[test]
    fn busybox_init_takes_the_tiny_userland_and_its_hook() {
        let mut spec = spec();
        spec.init = DebianInit::Busybox;
        spec.packages = vec!["python3".into(), "dropbear-bin".into()];
        let args = mmdebstrap_args(&spec, Arch::X86_64, Path::new("r"), Path::new("a"));
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args[3],
            "--include=linux-image-cloud-amd64,busybox-static,dropbear-bin,openssh-sftp-server,python3"
        );
        assert_eq!(
            args[6],
            "--customize-hook=sh a/customize-rootfs-busybox.sh \"$1\" a"
        );
        let names: Vec<&str> = agent_files(spec.init, Arch::Aarch64)
            .iter()
            .map(|(n, _)| *n)
            .collect();
        for name in [
            "boot.sh",
            "sshd.sh",
            "udhcpc.script",
            "inittab",
            "seed-lib.sh",
        ] {
            assert!(names.contains(&name), "{names:?}");
        }
        let inittab = &agent_files(spec.init, Arch::Aarch64)[4].1;
        assert!(inittab.contains("ttyAMA0::respawn"), "{inittab}");
        assert_eq!(
            kernel_cmdline(Arch::X86_64, DebianInit::Busybox),
            "console=ttyS0 quiet"
        );
    }

    #[test]
    fn mmdebstrap_command_line() {
        let args = mmdebstrap_args(
            &spec(),
            Arch::X86_64,
            Path::new("/s/rootfs"),
            Path::new("/s/it's"),
        );
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--mode=root",
                "--variant=minbase",
                "--architectures=amd64",
                "--include=linux-image-cloud-amd64,systemd-sysv,systemd-resolved,openssh-server,iproute2,udev,qemu-utils",
                "--aptopt=Acquire::Retries \"3\"",
                concat!(
                    r#"--essential-hook=printf '/dev/vda\t/\text4\tdefaults\t0\t1\n' > "$1/etc/fstab""#,
                    r#" && mkdir -p "$1/etc/initramfs-tools/conf.d""#,
                    r#" && echo FSTYPE=ext4 > "$1/etc/initramfs-tools/conf.d/farm-fsck""#,
                ),
                r#"--customize-hook=sh '/s/it'\''s/customize-rootfs.sh' "$1" '/s/it'\''s'"#,
                "bookworm",
                "/s/rootfs",
                "http://deb.debian.org/debian",
            ]
        );
    }

    #[test]
    fn arm64_gets_its_kernel_and_console() {
        let mut spec = spec();
        spec.variant = "standard".into();
        let args = mmdebstrap_args(&spec, Arch::Aarch64, Path::new("r"), Path::new("a"));
        assert!(args.contains(&"--variant=standard".into()));
        assert!(args.contains(&"--architectures=arm64".into()));
        assert!(
            args[3]
                .to_string_lossy()
                .starts_with("--include=linux-image-cloud-arm64,")
        );
        assert_eq!(
            kernel_cmdline(Arch::Aarch64, DebianInit::Systemd),
            "root=/dev/vda rw console=ttyAMA0"
        );
        assert_eq!(
            kernel_cmdline(Arch::X86_64, DebianInit::Systemd),
            "root=/dev/vda rw console=ttyS0"
        );
    }

    #[test]
    fn disk_size_has_headroom() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(disk_size_for(370 * MIB), 1394 * MIB);
        assert_eq!(disk_size_for(4096 * MIB), 6144 * MIB);
        assert_eq!(disk_size_for(MIB + 1), 1026 * MIB);
    }

    #[test]
    fn newest_kernel_with_an_initrd_wins() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "vmlinuz-6.1.0-9-cloud-amd64",
            "initrd.img-6.1.0-9-cloud-amd64",
            "vmlinuz-6.1.0-28-cloud-amd64",
            "initrd.img-6.1.0-28-cloud-amd64",
            "vmlinuz-6.1.0-30-cloud-amd64",
            "config-6.1.0-30-cloud-amd64",
        ] {
            fs_err::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(
            find_kernel(dir.path()).as_deref(),
            Some("6.1.0-28-cloud-amd64")
        );
        assert_eq!(find_kernel(&dir.path().join("missing")), None);
    }
}
