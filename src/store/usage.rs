//! The store-wide lock, so `farm gc` never removes an entry another farm is about to use.
//!
//! Lock modes, taken in this order and never the reverse (so two farms cannot deadlock):
//!
//! 1. `locks/store.lock`, **shared** by every command that uses entries or adds them
//!    (`build`, `up`, `store import`, `store verify --repair`), **exclusive** by `farm gc`.
//!    A command that found an entry keeps using it until it exits; gc waits for it.
//! 2. `locks/<key>.lock`, exclusive per derivation while it is built (see `lock.rs`).
//!
//! Commands that only look (`store ls`, `store verify`, `show`, `plan`, `status`) take no
//! lock: entries appear and disappear with one rename each, so a reader sees an entry whole
//! or not at all. Running VMs hold no lock either: gc keeps what they use through the roots
//! projects register and the files their qemu has open.

use std::fs::TryLockError;
use std::io;

use super::{LOCKS_DIR, Store, StoreError};
use crate::progress::Reporter;

const STORE_LOCK_FILE: &str = "store.lock";

/// How a command uses the store while it holds a [`StoreUse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UseMode {
    /// Uses or adds entries; many at once.
    Shared,
    /// Removes entries (`farm gc`); alone.
    Exclusive,
}

/// The store-wide lock, held until dropped (the kernel drops it if farm dies).
#[derive(Debug)]
pub struct StoreUse {
    /// `None` on a store nobody can write to: nobody can remove entries from it either, so
    /// there is nothing to hold off.
    _file: Option<fs_err::File>,
    pub mode: UseMode,
}

impl Store {
    /// Takes the store-wide lock in `mode`. If another farm holds it in a conflicting mode,
    /// `waiting` is called once (to say so) before blocking until it is released.
    ///
    /// On a store this process cannot write to (a read-only mount, a shared cache owned by
    /// someone else), a shared use takes the lock through a read-only handle when the lock
    /// file exists (flock needs no write access) and goes without when it does not; an
    /// exclusive use, which is for removing entries, is refused saying why.
    pub fn use_as(&self, mode: UseMode, waiting: impl FnOnce()) -> Result<StoreUse, StoreError> {
        let path = self.root.join(LOCKS_DIR).join(STORE_LOCK_FILE);
        let opened = fs_err::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path);
        let file = match opened {
            Ok(file) => file,
            Err(e) if mode == UseMode::Shared && cannot_write(&e) => {
                match fs_err::File::open(&path) {
                    Ok(file) => file,
                    Err(_) => return Ok(StoreUse { _file: None, mode }),
                }
            }
            Err(e) if cannot_write(&e) => {
                return Err(StoreError::ReadOnly {
                    path: self.root.clone(),
                    what: "removing entries".to_string(),
                    reason: e.kind().to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let attempt = match mode {
            UseMode::Shared => file.file().try_lock_shared(),
            UseMode::Exclusive => file.file().try_lock(),
        };
        match attempt {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                waiting();
                let blocked = match mode {
                    UseMode::Shared => file.file().lock_shared(),
                    UseMode::Exclusive => file.file().lock(),
                };
                blocked.map_err(|e| lock_error(&path, e))?;
            }
            Err(TryLockError::Error(e)) => return Err(lock_error(&path, e).into()),
        }
        Ok(StoreUse {
            _file: Some(file),
            mode,
        })
    }

    /// Takes the store-wide lock shared, as every command that uses or adds entries does,
    /// saying on `reporter` when it has to wait for a `farm gc` to finish.
    pub fn use_shared(&self, reporter: &Reporter) -> Result<StoreUse, StoreError> {
        self.use_as(UseMode::Shared, || {
            reporter.line(format!("{:>12} for `farm gc` to finish", "waiting"))
        })
    }

    /// Takes the store-wide lock alone, as removing entries does, saying on `reporter` when
    /// it has to wait for other farm processes to finish with the store.
    pub fn use_exclusive(&self, reporter: &Reporter) -> Result<StoreUse, StoreError> {
        self.use_as(UseMode::Exclusive, || {
            reporter.line(format!(
                "{:>12} for other farm processes to finish with the store",
                "waiting"
            ))
        })
    }
}

/// Whether `e` says this process may not write there (rather than that something broke).
pub(crate) fn cannot_write(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ReadOnlyFilesystem | io::ErrorKind::PermissionDenied
    )
}

fn lock_error(path: &std::path::Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("failed to lock `{}`: {e}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_uses_coexist_and_exclusive_waits_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = store
            .use_as(UseMode::Shared, || panic!("shared never waits for shared"))
            .unwrap();
        let _second = store
            .use_as(UseMode::Shared, || panic!("shared never waits for shared"))
            .unwrap();
        let waited = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let gc = scope.spawn(|| {
                store
                    .use_as(UseMode::Exclusive, || {
                        waited.store(true, std::sync::atomic::Ordering::SeqCst)
                    })
                    .unwrap()
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(first);
            drop(_second);
            let exclusive = gc.join().unwrap();
            assert_eq!(exclusive.mode, UseMode::Exclusive);
        });
        assert!(waited.load(std::sync::atomic::Ordering::SeqCst));
    }
}
