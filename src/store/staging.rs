//! A directory an entry is built in before it is committed into `store/`.

use std::path::{Path, PathBuf};

use super::entry::{BOOT_DIR, DISK_FILE};
use super::{StoreError, fsutil};
use crate::model::hash::{ContentHash, DrvHash};

/// An entry under construction in `tmp/`, named `<key>-<name>.<pid>.<random>`.
///
/// Dropping it without committing removes the directory, so every error path (`?`, panics)
/// leaves nothing behind. A killed process cannot run `Drop`; what it leaves is swept by the
/// next `Store::stage` for the same key (or `Store::sweep_tmp`, run by `farm gc`), and is never taken for an
/// entry because entries live only in `store/`.
#[derive(Debug)]
pub struct Staging {
    pub(crate) dir: PathBuf,
    pub(crate) key: DrvHash,
    pub(crate) name: String,
    pub(crate) committed: bool,
}

impl Staging {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry's disk must be written (`disk.qcow2`; required by `commit`).
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join(DISK_FILE)
    }

    /// Where kernel, initrd and cmdline go for direct kernel boot; not created until the
    /// caller creates it, since most entries have none.
    pub fn boot_dir(&self) -> PathBuf {
        self.dir.join(BOOT_DIR)
    }

    pub fn key(&self) -> &DrvHash {
        &self.key
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// blake3 and byte size of the staged disk: the `output_blake3` and `size` of its
    /// `EntryMeta`.
    pub fn hash_disk(&self) -> Result<(ContentHash, u64), StoreError> {
        Ok(fsutil::hash_file(&self.disk_path())?)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a leftover is swept by the next `stage` of this key.
            let _ = fsutil::remove_tree(&self.dir);
        }
    }
}
