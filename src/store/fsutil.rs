//! Filesystem steps the store's crash safety rests on: fsync, sealing a tree read-only, and
//! removing trees that were sealed.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::model::hash::ContentHash;

const READ_ONLY_FILE: u32 = 0o444;
const READ_ONLY_DIR: u32 = 0o555;
const WRITABLE_DIR: u32 = 0o755;

/// Flushes a directory's entries (names created, renamed or removed in it) to disk. Without
/// it a rename can be lost in a power cut even though the renamed files were synced.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs_err::File::open(dir)?.sync_all()
}

/// Makes every file under `root` durable and read-only, every subdirectory read-only, and
/// syncs `root` itself. `root` stays writable: a directory being moved to another parent
/// needs write permission on itself (to update `..`), so the caller seals it after the rename.
///
/// Only regular files and directories are accepted: a symlink could point outside the store
/// and make an "immutable" entry change under its readers.
pub(crate) fn seal_tree(root: &Path) -> io::Result<()> {
    seal_children(root)?;
    fsync_dir(root)
}

fn seal_children(dir: &Path) -> io::Result<()> {
    for child in fs_err::read_dir(dir)? {
        let path = child?.path();
        let meta = fs_err::symlink_metadata(&path)?;
        if meta.is_file() {
            fs_err::File::open(&path)?.sync_all()?;
            fs_err::set_permissions(&path, std::fs::Permissions::from_mode(READ_ONLY_FILE))?;
        } else if meta.is_dir() {
            seal_children(&path)?;
            fs_err::set_permissions(&path, std::fs::Permissions::from_mode(READ_ONLY_DIR))?;
            fsync_dir(&path)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "`{}` is neither a regular file nor a directory; store entries hold only those",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Makes `dir` read-only (the last step of a commit).
pub(crate) fn seal_dir(dir: &Path) -> io::Result<()> {
    fs_err::set_permissions(dir, std::fs::Permissions::from_mode(READ_ONLY_DIR))?;
    fsync_dir(dir)
}

/// Removes a tree even where it was sealed read-only. A tree that is already gone is fine:
/// removal is how abandoned staging dirs and garbage are cleared, and the goal is absence.
/// Returns whether there was something to remove.
pub(crate) fn remove_tree(path: &Path) -> io::Result<bool> {
    let meta = match fs_err::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        crate::sys::mounts::detach_mounts_under(path)?;
        make_dirs_writable(path)?;
        fs_err::remove_dir_all(path)?;
    } else {
        fs_err::remove_file(path)?;
    }
    Ok(true)
}

fn make_dirs_writable(dir: &Path) -> io::Result<()> {
    let mode = fs_err::symlink_metadata(dir)?.permissions().mode();
    if mode & 0o700 != 0o700 {
        fs_err::set_permissions(dir, std::fs::Permissions::from_mode(WRITABLE_DIR))?;
    }
    for child in fs_err::read_dir(dir)? {
        let child = child?;
        if child.file_type()?.is_dir() {
            make_dirs_writable(&child.path())?;
        }
    }
    Ok(())
}

/// blake3 and length of a file. Disks are gigabytes: the file is memory-mapped and hashed
/// on every core, as `b3sum` does (small files are read instead).
pub(crate) fn hash_file(path: &Path) -> io::Result<(ContentHash, u64)> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("failed to read `{}`: {e}", path.display()),
        )
    })?;
    Ok((ContentHash::from_blake3(hasher.finalize()), hasher.count()))
}

/// Asks the kernel to start writing `len` bytes of `file` from `offset` to disk, without
/// waiting. A writer that calls this as it goes finds little left to flush at its final
/// fsync, so the disk works while the writer still computes (unpacking, hashing) instead
/// of after it.
pub(crate) fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open
    // for as long as `file` is borrowed. Failure only means the final fsync does the work.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// A file's modification time in nanoseconds since the epoch: what tells a file changed
/// without reading it.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
}
