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
//! the `farm/` directory of the instance's NoCloud seed (see [`crate::seed`]) before the
//! network and sshd start, so the first ssh connection already meets the host key farm pinned.
//!
//! Every tool's full output is appended to the build log; errors quote only its last lines.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use crate::model::config::DebianSpec;
pub use crate::model::debian_recipe::{
    AGENT_SCRIPT, AGENT_UNIT, CUSTOMIZE_SCRIPT, DEFAULT_VARIANT, ESSENTIAL_HOOK, kernel_cmdline,
    required_packages,
};
use crate::model::values::Arch;
use crate::tool_log::{LogError, ToolLog};

/// How many trailing output lines an error quotes: enough for the tool's complaint, short
/// enough to read in a terminal. The whole output is in the log.
const TAIL_LINES: usize = 20;

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
    #[error("The `{tool}` program was not found on PATH\nhint: apt-get install {package}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error(
        "Building a Debian image needs root: mmdebstrap must create files owned by root, and `mkfs.ext4 -d` records owners as it finds them\nhint: run the build as root (e.g. `sudo -E farm build`)"
    )]
    NeedsRoot,
    #[error(
        "Building an {arch} image on this {host} machine needs QEMU user-mode emulation registered with binfmt_misc (`{binfmt}` is missing)\nhint: apt-get install qemu-user-static binfmt-support"
    )]
    ForeignArch {
        arch: Arch,
        host: &'static str,
        binfmt: PathBuf,
    },
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
        "mmdebstrap installed no kernel: `{dir}` has no `vmlinuz-*` with a matching `initrd.img-*`\nhint: this is a bug in farm's package list for {arch}; the full output is in the build log"
    )]
    NoKernel { dir: PathBuf, arch: Arch },
    #[error(
        "Refusing to delete `{path}`: `{mount}` is still mounted inside it (left by an interrupted mmdebstrap)\nhint: umount -R {path}, then delete it"
    )]
    StillMounted { path: PathBuf, mount: PathBuf },
    #[error(transparent)]
    Log(#[from] LogError),
    /// File system errors; `fs_err` puts the path in the message.
    #[error(transparent)]
    Io(#[from] io::Error),
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
    required_packages(arch)
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
        shell_quote(&agent_dir.join("customize-rootfs.sh")),
        shell_quote(agent_dir)
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

/// Single-quotes a path for `sh`.
fn shell_quote(path: &Path) -> String {
    quote_word(&path.to_string_lossy())
}

/// A word as `sh` would need it: bare when it is plainly safe, single-quoted otherwise.
fn quote_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./,:=@%+".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The tools a build runs and the Debian package that provides each.
const TOOLS: [(&str, &str); 3] = [
    ("mmdebstrap", "mmdebstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("qemu-img", "qemu-utils"),
];

/// Finds a program on `PATH`, then in the sbin directories a non-root `PATH` often lacks
/// (`mkfs.ext4` lives in `/usr/sbin`). Shared with `tiny_image`.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs_err::metadata(candidate)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Everything that can be known to fail before minutes of downloading: missing tools, not
/// root, a foreign architecture without binfmt emulation.
pub fn check_prerequisites(arch: Arch) -> Result<(), DebianImageError> {
    for (tool, package) in TOOLS {
        if find_program(tool).is_none() {
            return Err(DebianImageError::ToolMissing { tool, package });
        }
    }
    // /proc/self belongs to the effective user: no libc call needed to learn it.
    if fs_err::metadata("/proc/self")?.uid() != 0 {
        return Err(DebianImageError::NeedsRoot);
    }
    let host = std::env::consts::ARCH;
    if host != arch.name() {
        let binfmt = PathBuf::from(format!("/proc/sys/fs/binfmt_misc/qemu-{}", arch.name()));
        if !binfmt.exists() {
            return Err(DebianImageError::ForeignArch { arch, host, binfmt });
        }
    }
    Ok(())
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
    fs_err::create_dir_all(req.out_dir)?;
    let log = ToolRunner(ToolLog::open(req.log)?);

    let rootfs = req.out_dir.join("rootfs");
    let raw = req.out_dir.join("rootfs.raw");
    let agent_dir = req.out_dir.join("agent");
    let scratch = Scratch {
        dirs: vec![rootfs.clone(), agent_dir.clone()],
        files: vec![raw.clone()],
    };
    // Leftovers of an interrupted build in the same staging directory: mmdebstrap wants an
    // empty target.
    scratch.remove()?;

    fs_err::create_dir_all(&agent_dir)?;
    for (name, text) in [
        ("farm-seed.sh", AGENT_SCRIPT),
        ("farm-seed.service", AGENT_UNIT),
        ("customize-rootfs.sh", CUSTOMIZE_SCRIPT),
    ] {
        fs_err::write(agent_dir.join(name), text)?;
    }

    // 1. The root tree.
    progress.set_message(format!(
        "mmdebstrap {} {}",
        req.spec.suite,
        req.arch.debian_name()
    ));
    let phase = Instant::now();
    log.run(
        "mmdebstrap",
        &mmdebstrap_args(req.spec, req.arch, &rootfs, &agent_dir),
        |line| {
            // mmdebstrap announces its phases as `I: …` lines.
            if let Some(step) = line.strip_prefix("I: ") {
                progress.set_message(format!("mmdebstrap: {}", step.trim_end_matches("...")));
            }
        },
        || {
            format!(
                "check that `{}` serves suite `{}` for {} and that every package in `packages` exists there",
                req.spec.mirror,
                req.spec.suite,
                req.arch.debian_name()
            )
        },
    )?;
    let mmdebstrap_time = phase.elapsed();

    // 2. Boot files, from the tree the disk is made of, so kernel and modules match.
    let boot_src = rootfs.join("boot");
    let kernel_version = find_kernel(&boot_src).ok_or(DebianImageError::NoKernel {
        dir: boot_src.clone(),
        arch: req.arch,
    })?;
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
        format!("{}\n", kernel_cmdline(req.arch)),
    )?;

    // 3. The filesystem.
    let rootfs_bytes = tree_bytes(&rootfs)?;
    let disk_virtual_bytes = disk_size_for(rootfs_bytes);
    progress.set_message(format!(
        "mkfs.ext4 ({} MiB used, {} MiB disk)",
        rootfs_bytes >> 20,
        disk_virtual_bytes >> 20
    ));
    let phase = Instant::now();
    // A sparse file: only the blocks mkfs writes take space.
    fs_err::File::create(&raw)?.set_len(disk_virtual_bytes)?;
    let mkfs_args: Vec<OsString> = vec![
        "-F".into(),
        "-q".into(),
        "-L".into(),
        "farm-root".into(),
        "-d".into(),
        rootfs.clone().into(),
        raw.clone().into(),
    ];
    log.run(
        "mkfs.ext4",
        &mkfs_args,
        |_| {},
        || format!("check free space for `{}`", raw.display()),
    )?;
    let mkfs_time = phase.elapsed();

    // 4. The qcow2.
    progress.set_message("qemu-img convert to qcow2");
    let phase = Instant::now();
    let disk = req.out_dir.join("disk.qcow2");
    let convert_args: Vec<OsString> = vec![
        "convert".into(),
        "-f".into(),
        "raw".into(),
        "-O".into(),
        "qcow2".into(),
        raw.clone().into(),
        disk.clone().into(),
    ];
    log.run(
        "qemu-img",
        &convert_args,
        |_| {},
        || format!("check free space in `{}`", req.out_dir.display()),
    )?;
    let convert_time = phase.elapsed();

    progress.set_message("removing the build tree");
    scratch.remove()?;
    let report = DebianImageReport {
        kernel_version,
        rootfs_bytes,
        disk_virtual_bytes,
        disk_file_bytes: fs_err::metadata(&disk)?.len(),
        mmdebstrap_time,
        mkfs_time,
        convert_time,
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

/// Bytes allocated under `root` (like `du`), hard links counted once, symlinks not followed.
pub(crate) fn tree_bytes(root: &Path) -> io::Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs_err::symlink_metadata(&path)?;
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir() {
            for entry in fs_err::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(total)
}

/// Scratch paths inside the staging directory, removed on success and on every error path.
struct Scratch {
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
}

impl Scratch {
    fn remove(&self) -> Result<(), DebianImageError> {
        for dir in &self.dirs {
            if fs_err::symlink_metadata(dir).is_err() {
                continue;
            }
            // mmdebstrap bind-mounts the host's /dev, /proc and /sys into the tree; if it was
            // killed they may still be there, and deleting through them would delete the
            // host's device nodes.
            if let Err(e) = crate::mounts::detach_mounts_under(dir) {
                let mount = crate::mounts::mounts_under(dir)?
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| dir.clone());
                let _ = e;
                return Err(DebianImageError::StillMounted {
                    path: dir.clone(),
                    mount,
                });
            }
            fs_err::remove_dir_all(dir)?;
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
    /// Runs `tool`, streaming its output into the log and each line to `on_line`; on failure
    /// the error quotes the tool's last lines and `hint()`.
    fn run(
        &self,
        tool: &'static str,
        args: &[OsString],
        on_line: impl Fn(&str) + Sync,
        hint: impl FnOnce() -> String,
    ) -> Result<(), DebianImageError> {
        let program = find_program(tool).ok_or(DebianImageError::ToolMissing {
            tool,
            package: TOOLS
                .iter()
                .find(|(t, _)| *t == tool)
                .map_or("it", |(_, p)| p),
        })?;
        let command_line = std::iter::once(program.as_os_str())
            .chain(args.iter().map(OsString::as_os_str))
            .map(|arg| quote_word(&arg.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ");
        self.note(&format!("$ {command_line}"))?;
        let started = Instant::now();
        let mut child = Command::new(&program)
            .args(args)
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| DebianImageError::Spawn { tool, source })?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let tail = Mutex::new(VecDeque::with_capacity(TAIL_LINES));
        let pump = |stream: &mut dyn Read| -> Result<(), DebianImageError> {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                let read = reader
                    .read_until(b'\n', &mut line)
                    .map_err(|source| DebianImageError::Spawn { tool, source })?;
                if read == 0 {
                    return Ok(());
                }
                self.write(&line)?;
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                on_line(&text);
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(text);
            }
        };
        let (out, err) = std::thread::scope(|scope| {
            let out = scope.spawn(|| pump(&mut { stdout }));
            let err = pump(&mut { stderr });
            (out.join().expect("log pump panicked"), err)
        });
        let status = child
            .wait()
            .map_err(|source| DebianImageError::Spawn { tool, source })?;
        self.note(&format!(
            "{tool}: {status} after {:.1} s",
            started.elapsed().as_secs_f64()
        ))?;
        out?;
        err?;
        if status.success() {
            return Ok(());
        }
        let tail = tail.into_inner().unwrap_or_else(|e| e.into_inner());
        Err(DebianImageError::ToolFailed {
            tool,
            status,
            log: self.path().to_path_buf(),
            tail: Vec::from(tail).join("\n"),
            hint: hint(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DebianSpec {
        DebianSpec {
            suite: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
            variant: String::new(),
            packages: vec!["qemu-utils".into(), "openssh-server".into()],
        }
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
            kernel_cmdline(Arch::Aarch64),
            "root=/dev/vda rw console=ttyAMA0"
        );
        assert_eq!(
            kernel_cmdline(Arch::X86_64),
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

    #[test]
    fn logged_command_lines_can_be_pasted_into_a_shell() {
        assert_eq!(quote_word("/usr/sbin/mkfs.ext4"), "/usr/sbin/mkfs.ext4");
        assert_eq!(
            quote_word("--aptopt=Acquire::Retries \"3\""),
            "'--aptopt=Acquire::Retries \"3\"'"
        );
        assert_eq!(quote_word("it's"), r"'it'\''s'");
        assert_eq!(quote_word(""), "''");
    }

    #[test]
    fn failing_tool_error_quotes_its_tail_and_hint() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("build.log");
        let log = ToolRunner(ToolLog::open(&log_path).unwrap());
        // qemu-img may be missing in a test environment; `mkfs.ext4` rejects a bad option
        // without touching anything. Skip when neither is there.
        if find_program("mkfs.ext4").is_none() {
            eprintln!("skipping: mkfs.ext4 not installed");
            return;
        }
        let err = log
            .run(
                "mkfs.ext4",
                &["--no-such-option".into()],
                |_| {},
                || "do something".into(),
            )
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("The `mkfs.ext4` command failed (exit status: 1)"),
            "{message}"
        );
        assert!(message.ends_with("\nhint: do something"), "{message}");
        let logged = fs_err::read_to_string(&log_path).unwrap();
        assert!(logged.contains("--no-such-option"), "{logged}");
        assert!(
            logged.contains("mkfs.ext4: exit status: 1 after"),
            "{logged}"
        );
    }
}
