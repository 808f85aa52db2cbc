//! The `qemu-img` commands farm runs, as data: one argument list per operation, run here by
//! `sys::qemu_img` or written into a script for a host or hypervisor VM. One spelling of
//! each, so an overlay made on L0 and one made inside L1 are made the same way.
//!
//! Formats are always given (`-f`, `-F`): since QEMU 6.1 omitting a backing format is an
//! error, and probing a format is a security hole.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use crate::model::shell::command_line;

/// One `qemu-img` invocation.
#[derive(Clone, Copy, Debug)]
pub enum QemuImg<'a> {
    /// A qcow2 overlay at `disk` whose reads fall through to `backing` (relative to `disk`'s
    /// directory when relative), `size` bytes when it grows beyond the backing's size.
    CreateOverlay {
        disk: &'a Path,
        backing: &'a Path,
        size: Option<u64>,
    },
    /// An empty qcow2 image of `size` bytes with no backing file.
    Create { disk: &'a Path, size: u64 },
    /// The backing path recorded in `disk` rewritten to `backing`, data untouched (`-u`):
    /// right only when both name the same bytes.
    RebaseUnsafe { disk: &'a Path, backing: &'a Path },
    /// `disk` moved onto `backing`, copying in what its old chain reads differently.
    RebaseSafe { disk: &'a Path, backing: &'a Path },
    /// `disk` grown to `size` bytes.
    Resize { disk: &'a Path, size: u64 },
    /// `src` (in `format`) to a standalone qcow2 `dest`, its chain flattened.
    ConvertToQcow2 {
        src: &'a Path,
        format: &'a str,
        dest: &'a Path,
    },
    /// `src`'s chain (qcow2) flattened into one standalone `dest` in `format` (`qcow2`,
    /// `raw`, `vmdk`, `vhdx`), qcow2 compressed with `compress`. Never `-W`: out-of-order
    /// writes lay out a different file each run, and exports must be reproducible.
    ///
    /// With `head`, the disk is `head` (raw bytes: a boot sector, a boot loader, a kernel)
    /// followed by the chain: qemu-img concatenates its sources, so the bootable disk is
    /// still one pass over the chain.
    Export {
        src: &'a Path,
        head: Option<&'a Path>,
        format: &'a str,
        compress: bool,
        /// `-p`: progress on stdout (see [`parse_progress`]) instead of `-q`.
        progress: bool,
        dest: &'a Path,
    },
    /// One image described as JSON; `-U` reads an image a running VM holds open.
    Info { disk: &'a Path },
    /// `disk` and every image below it as a JSON list, top first.
    BackingChain { disk: &'a Path },
    /// The qcow2 metadata of `disk` checked for corruption.
    Check { disk: &'a Path },
}

/// How far a `qemu-img convert -p` is, from one of its progress lines (`    (12.34/100%)`).
pub fn parse_progress(line: &str) -> Option<f64> {
    let inner = line.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    inner
        .parse::<f64>()
        .ok()
        .filter(|p| (0.0..=100.0).contains(p))
}

/// A source named in qemu's option syntax (`--image-opts`), where a comma in a value is
/// written twice.
fn image_opts(driver: &str, path: &Path) -> OsString {
    let mut opts = OsString::from(format!("driver={driver},file.filename="));
    opts.push(path.to_string_lossy().replace(',', ",,"));
    opts
}

/// The program's name, found on `PATH`.
pub const PROGRAM: &str = "qemu-img";

impl QemuImg<'_> {
    /// The arguments after `qemu-img`.
    pub fn args(&self) -> Vec<OsString> {
        let words = |w: &[&str]| w.iter().map(OsString::from).collect::<Vec<_>>();
        match *self {
            QemuImg::CreateOverlay {
                disk,
                backing,
                size,
            } => {
                let mut a = words(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]);
                a.extend([backing.into(), disk.into()]);
                a.extend(size.map(|s| s.to_string().into()));
                a
            }
            QemuImg::Create { disk, size } => {
                let mut a = words(&["create", "-q", "-f", "qcow2"]);
                a.extend([disk.into(), size.to_string().into()]);
                a
            }
            QemuImg::RebaseUnsafe { disk, backing } => {
                let mut a = words(&["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"]);
                a.extend([backing.into(), disk.into()]);
                a
            }
            QemuImg::RebaseSafe { disk, backing } => {
                let mut a = words(&["rebase", "-f", "qcow2", "-F", "qcow2", "-b"]);
                a.extend([backing.into(), disk.into()]);
                a
            }
            QemuImg::Resize { disk, size } => {
                let mut a = words(&["resize", "-q", "-f", "qcow2"]);
                a.extend([disk.into(), size.to_string().into()]);
                a
            }
            QemuImg::ConvertToQcow2 { src, format, dest } => {
                let mut a = words(&["convert", "-q", "-f", format, "-O", "qcow2"]);
                a.extend([src.into(), dest.into()]);
                a
            }
            QemuImg::Export {
                src,
                head,
                format,
                compress,
                progress,
                dest,
            } => {
                let mut a = words(&["convert", if progress { "-p" } else { "-q" }]);
                match head {
                    None => a.extend([OsString::from("-f"), "qcow2".into(), src.into()]),
                    Some(head) => {
                        a.push("--image-opts".into());
                        a.push(image_opts("raw", head));
                        a.push(image_opts("qcow2", src));
                    }
                }
                a.extend(words(&["-O", format]));
                if compress {
                    a.push("-c".into());
                }
                a.push(dest.into());
                a
            }
            QemuImg::Info { disk } => {
                let mut a = words(&["info", "-U", "--output=json"]);
                a.push(disk.into());
                a
            }
            QemuImg::BackingChain { disk } => {
                let mut a = words(&["info", "-U", "--backing-chain", "--output=json"]);
                a.push(disk.into());
                a
            }
            QemuImg::Check { disk } => {
                let mut a = words(&["check", "-U", "-q", "-f", "qcow2"]);
                a.push(disk.into());
                a
            }
        }
    }

    /// The command as one line of shell, every argument quoted where it needs it: for the
    /// scripts farm runs on a host or hypervisor VM.
    pub fn script(&self) -> String {
        command_line(OsStr::new(PROGRAM), &self.args())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlay_names_both_formats_and_quotes_its_paths_in_a_script() {
        let op = QemuImg::CreateOverlay {
            disk: Path::new("/var/lib/farm/state/a b/disk.qcow2"),
            backing: Path::new("../x/disk.qcow2"),
            size: Some(1 << 30),
        };
        assert_eq!(
            op.script(),
            "qemu-img create -q -f qcow2 -F qcow2 -b ../x/disk.qcow2 \
             '/var/lib/farm/state/a b/disk.qcow2' 1073741824"
        );
        let no_size = QemuImg::CreateOverlay {
            disk: Path::new("d"),
            backing: Path::new("b"),
            size: None,
        };
        assert_eq!(no_size.args().len(), 9);
    }

    #[test]
    fn an_export_flattens_a_qcow2_chain_and_compresses_only_when_asked() {
        let op = |compress, head| QemuImg::Export {
            src: Path::new("s/disk.qcow2"),
            head,
            format: "qcow2",
            compress,
            progress: false,
            dest: Path::new("out.qcow2"),
        };
        assert_eq!(
            op(false, None).script(),
            "qemu-img convert -q -f qcow2 s/disk.qcow2 -O qcow2 out.qcow2"
        );
        assert_eq!(
            op(true, None).script(),
            "qemu-img convert -q -f qcow2 s/disk.qcow2 -O qcow2 -c out.qcow2"
        );
        assert!(!op(true, None).script().contains(" -W"));
        // With progress, `-p` instead of `-q`, and its lines read back.
        let shown = QemuImg::Export {
            src: Path::new("s/disk.qcow2"),
            head: None,
            format: "qcow2",
            compress: false,
            progress: true,
            dest: Path::new("out.qcow2"),
        };
        assert!(shown.script().starts_with("qemu-img convert -p -f qcow2"));
        assert_eq!(parse_progress("    (12.34/100%)"), Some(12.34));
        assert_eq!(parse_progress("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress("(1.0/50%)"), None);
        assert_eq!(parse_progress("garbage"), None);
        // A bootable disk: the head, then the chain, concatenated; commas doubled.
        assert_eq!(
            op(false, Some(Path::new("a,b/head.raw"))).script(),
            "qemu-img convert -q --image-opts driver=raw,file.filename=a,,b/head.raw \
             driver=qcow2,file.filename=s/disk.qcow2 -O qcow2 out.qcow2"
        );
    }

    #[test]
    fn an_unsafe_rebase_touches_no_data_and_names_its_formats() {
        let op = QemuImg::RebaseUnsafe {
            disk: Path::new("d.qcow2"),
            backing: Path::new("../l/disk.qcow2"),
        };
        assert_eq!(
            op.script(),
            "qemu-img rebase -u -f qcow2 -F qcow2 -b ../l/disk.qcow2 d.qcow2"
        );
    }
}
