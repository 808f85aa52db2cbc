//! Per-key exclusive locks, so two farm processes (or threads) never build the same entry at
//! once and the second one finds the first one's result.

use crate::model::hash::DrvHash;

/// An exclusive lock on one store key, held until dropped.
///
/// It is an OS file lock (`flock` on Linux) on `locks/<key>.lock`: the kernel releases it when
/// the holder dies, however it dies, so a killed farm never leaves a key locked. Lock files are
/// never deleted: removing one while another process waits on it would let two holders exist.
#[derive(Debug)]
pub struct EntryLock {
    // Holding the open file is what holds the lock.
    pub(crate) file: fs_err::File,
    pub(crate) key: DrvHash,
}

impl EntryLock {
    pub fn key(&self) -> &DrvHash {
        &self.key
    }

    /// Where the lock file lives; for messages such as "waiting for a lock on …".
    pub fn path(&self) -> &std::path::Path {
        self.file.path()
    }
}
