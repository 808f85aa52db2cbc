//! Free space, and the filesystem a path is on, so running out of space is said with where
//! and how much: before work whose size is known ([`ensure`]), and after a write the kernel
//! refused ([`full_note`]).

use std::path::{Path, PathBuf};

use crate::model::text::human_bytes;

/// The filesystem holding a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filesystem {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// Its type (`ext4`, `tmpfs`, `overlay`).
    pub kind: String,
    /// Bytes an unprivileged writer may still put there.
    pub free: u64,
}

impl std::fmt::Display for Filesystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} filesystem mounted at `{}`",
            self.kind,
            self.mount.display()
        )
    }
}

/// Not enough space for some work whose size is known.
#[derive(Debug, thiserror::Error)]
#[error(
    "Not enough space for {what} in `{}` ({filesystem}): about {} needed, {} free\nhint: {}",
    path.display(),
    human_bytes(*needed),
    human_bytes(filesystem.free),
    remedy.hint()
)]
pub struct SpaceShort {
    pub what: String,
    pub path: PathBuf,
    pub filesystem: Filesystem,
    pub needed: u64,
    pub remedy: Remedy,
}

/// The way out of a short disk, for the work in question.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remedy {
    /// The store's disk: collect garbage, or move the store.
    Store,
    /// A file farm writes outside the store (an export): write it elsewhere.
    Elsewhere,
}

impl Remedy {
    pub fn hint(self) -> &'static str {
        match self {
            Remedy::Store => STORE_HINT,
            Remedy::Elsewhere => "free space there, or write it to a larger disk",
        }
    }
}

/// The way out when the store's disk is short.
const STORE_HINT: &str = "`farm gc` removes what nothing needs; or free space there, or point --store (FARM_STORE) at a larger disk";

/// The filesystem holding `path` (or its nearest existing ancestor), from
/// `/proc/self/mountinfo`; `None` where that cannot be read.
pub fn filesystem_of(path: &Path) -> Option<Filesystem> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let real = fs_err::canonicalize(existing).ok()?;
    let mountinfo = fs_err::read_to_string("/proc/self/mountinfo").ok()?;
    let (mount, kind) = mountinfo
        .lines()
        .filter_map(parse_mountinfo_line)
        .filter(|(mount, _)| real.starts_with(mount))
        .max_by_key(|(mount, _)| mount.as_os_str().len())?;
    Some(Filesystem {
        free: super::hostinfo::free_bytes(&real)?,
        mount,
        kind,
    })
}

/// A mountinfo line's mount point and filesystem type (`36 35 98:0 /mnt1 /mnt2 rw - ext3 …`:
/// the fifth field, and the first after ` - `). Octal escapes (`\040` for a space) are read.
fn parse_mountinfo_line(line: &str) -> Option<(PathBuf, String)> {
    let (left, right) = line.split_once(" - ")?;
    let mount = left.split(' ').nth(4)?;
    let kind = right.split(' ').next()?;
    Some((PathBuf::from(unescape_octal(mount)), kind.to_string()))
}

fn unescape_octal(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match escape {
            Some(digits) => {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |n, d| n.wrapping_mul(8) + (d - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Refuses, before it starts, work that will write about `needed` bytes under `path` when
/// its filesystem has less free. Where the filesystem cannot be read, the work goes ahead
/// (a full disk is then said by [`full_note`]).
pub fn ensure(path: &Path, needed: u64, what: &str) -> Result<(), SpaceShort> {
    ensure_or(path, needed, what, Remedy::Store)
}

/// [`ensure`] for work outside the store, with its own `remedy`.
pub fn ensure_or(path: &Path, needed: u64, what: &str, remedy: Remedy) -> Result<(), SpaceShort> {
    match filesystem_of(path) {
        Some(filesystem) if filesystem.free < needed => Err(SpaceShort {
            what: what.to_string(),
            path: path.to_path_buf(),
            filesystem,
            needed,
            remedy,
        }),
        _ => Ok(()),
    }
}

/// Whether `e` is the kernel saying a filesystem is full (or a quota is).
pub fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || e.raw_os_error() == Some(libc::ENOSPC)
}

/// For an error whose causes include a full filesystem: a line naming, of the `places`
/// farm writes to (the store, the project with its state directory), the one whose
/// filesystem has least free, and what to do. `None` for any other error.
pub fn full_note(error: &(dyn std::error::Error + 'static), places: &[&Path]) -> Option<String> {
    let mut cause = Some(error);
    let mut full = false;
    while let Some(e) = cause {
        // An errno from this process's own writes, or the words of `qemu-img`, which farm
        // runs here. Not any text that says so: a build step's or a site's output quotes a
        // guest's or another machine's disk, and this machine's may have room.
        let local_tool = e
            .downcast_ref::<crate::sys::qemu_img::QemuImgError>()
            .is_some_and(|e| e.to_string().contains("No space left on device"));
        full |= e.downcast_ref::<std::io::Error>().is_some_and(is_full) || local_tool;
        cause = e.source();
    }
    if !full {
        return None;
    }
    let fullest = places
        .iter()
        .filter_map(|path| Some((*path, filesystem_of(path)?)))
        .min_by_key(|(_, fs)| fs.free);
    Some(full_message(fullest))
}

/// The line that says a disk is full: which filesystem, holding which path, with how much
/// free; and what to do.
fn full_message(fullest: Option<(&Path, Filesystem)>) -> String {
    let place = match fullest {
        Some((path, fs)) => format!(
            "{fs}, which holds `{}`, has {} free",
            path.display(),
            human_bytes(fs.free)
        ),
        None => "farm could not tell which filesystem".to_string(),
    };
    format!("The disk is full: {place}; nothing half-written was kept\nhint: {STORE_HINT}")
}

/// Below this much free, a filesystem counts as full for [`full_at`].
const NEARLY_FULL: u64 = 4 << 20;

/// For work that failed without an errno farm can see (a program qemu ran to write a
/// machine state, whose pipe broke): the full-disk line when `path`'s filesystem has (next
/// to) nothing free, which is then the likely cause.
pub fn full_at(path: &Path) -> Option<String> {
    let fs = filesystem_of(path).filter(|fs| fs.free < NEARLY_FULL)?;
    Some(full_message(Some((path, fs))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_mount_point_and_type() {
        assert_eq!(
            parse_mountinfo_line(
                "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
            ),
            Some((PathBuf::from("/mnt/a b"), "ext3".to_string()))
        );
        assert_eq!(parse_mountinfo_line("garbage"), None);
    }

    #[test]
    fn the_root_filesystem_is_found_and_a_shortage_named() {
        let fs = filesystem_of(Path::new("/")).expect("/proc/self/mountinfo lists /");
        assert_eq!(fs.mount, PathBuf::from("/"));
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure(dir.path(), 1, "a byte").is_ok());
        let short = ensure(&dir.path().join("not/yet"), u64::MAX, "everything").unwrap_err();
        let said = short.to_string();
        assert!(
            said.starts_with("Not enough space for everything in `"),
            "{said}"
        );
        assert!(said.contains("filesystem mounted at `"), "{said}");
    }

    #[test]
    fn a_full_disk_in_the_causes_is_named() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let note = full_note(&full, &[Path::new("/")]).unwrap();
        assert!(note.starts_with("The disk is full: the "), "{note}");
        assert!(full_note(&std::io::Error::other("x"), &[Path::new("/")]).is_none());
        // A guest's words are not this machine's disk; qemu-img's, run here, are.
        let guest = std::io::Error::other("dd: error writing '/bulk': No space left on device");
        assert!(full_note(&guest, &[Path::new("/")]).is_none());
        let qemu_img = crate::sys::qemu_img::QemuImgError::Failed {
            argv: "qemu-img convert".into(),
            status: std::os::unix::process::ExitStatusExt::from_raw(256),
            stderr: "qemu-img: error while writing at byte 0: No space left on device".into(),
        };
        assert!(full_note(&qemu_img, &[Path::new("/")]).is_some());
    }
}
