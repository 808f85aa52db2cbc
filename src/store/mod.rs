//! The content-addressed store: where built images live, keyed by derivation hash.
//!
//! ```text
//! <root>/farm-store.json      {"layout": 1}: refuses to touch a store written by a newer farm
//! <root>/store/<key>-<name>/  finished, immutable entries: disk.qcow2, boot/, meta.json
//! <root>/tmp/                 staging dirs, renamed into store/ on commit
//! <root>/locks/<key>.lock     per-key lock files; locks/store.lock, the store-wide lock
//! <root>/roots/<id>.json      projects that use this store and what they want (gc roots)
//! <root>/partial/             resumable downloads
//! <root>/logs/                build logs
//! <root>/debs/                .deb files the tiny image is assembled from (a download cache)
//! <root>/steps/<parent>/<key> build-step checkpoints of layers on <parent> (see `checkpoints`)
//! <root>/grub/                GRUB boot code `farm image export` made, by its inputs (a cache)
//! ```
//!
//! The rename of a staging directory into `store/` is the commit point. Everything an entry
//! holds (`meta.json` last) is written and synced before it, so a farm killed at any moment
//! leaves at most a directory in `tmp/`, and readers never see a half-written entry: they need
//! no lock, and `lookup` is a `read` of `meta.json`.
//!
//! Writers take the key's lock, look up again (someone may have finished meanwhile), and only
//! then stage and commit:
//!
//! ```no_run
//! # use farm::store::*; use farm::model::hash::*;
//! # fn f(store: &Store, key: &DrvHash, meta: EntryMeta) -> Result<Entry, StoreError> {
//! if let Some(entry) = store.lookup(key, "base")? { return Ok(entry); }
//! let lock = store.lock(key)?;
//! if let Some(entry) = store.lookup(key, "base")? { return Ok(entry); }
//! let staging = store.stage(&lock, "base")?;
//! // … write staging.disk_path() …
//! store.commit(staging, meta)
//! # }
//! ```

mod archive;
mod checkpoints;
mod commit;
mod entry;
pub(crate) mod fsutil;
mod layout;
mod lock;
pub(crate) mod qcow2;
pub(crate) mod qcow2_map;
mod read;
mod roots;
mod staging;
mod sweep;
mod usage;
mod verify;

use std::io;
use std::path::{Path, PathBuf};

pub use archive::{ArchiveError, ArchiveReport, MANIFEST, Manifest};
pub use checkpoints::{Checkpoint, CheckpointMeta};
pub use entry::{
    BOOT_DIR, DISK_FILE, Entry, EntryMeta, FileRecord, MAX_NAME_LEN, META_FILE, entry_dir_name,
    relative_backing,
};
pub use lock::EntryLock;
pub use roots::ProjectRoot;
pub use staging::Staging;
pub use sweep::Swept;
pub use usage::{StoreUse, UseMode};
pub use verify::{Finding, VerifyDepth};

use crate::model::hash::{ContentHash, DrvHash};
use entry::parse_entry_dir_name;
use layout::{check_layout, check_name, load_entry, write_layout_file};

/// The on-disk layout this farm reads and writes. Bump it when the layout changes in a way an
/// older farm would misread; an older farm then refuses the store instead of damaging it.
pub const LAYOUT_VERSION: u32 = 1;

const LAYOUT_FILE: &str = "farm-store.json";
const STORE_DIR: &str = "store";
const TMP_DIR: &str = "tmp";
const LOCKS_DIR: &str = "locks";
const PARTIAL_DIR: &str = "partial";
const LOGS_DIR: &str = "logs";
const DEBS_DIR: &str = "debs";
/// Where `farm store verify --repair` moves damaged entries, for a human to look at.
const DAMAGED_DIR: &str = "damaged";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(
        "The store at `{root}` has layout {found}, but this farm only knows layouts up to \
         {supported}\nhint: upgrade farm, or point --store (FARM_STORE) at another directory"
    )]
    NewerLayout {
        root: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "`{path}` is not a valid store layout file: {reason}\nhint: if this directory is not a \
         farm store, point --store (FARM_STORE) at another directory"
    )]
    BadLayoutFile { path: PathBuf, reason: String },
    #[error(
        "`{path}` is a file, not a store directory\nhint: point --store (FARM_STORE) at a \
         directory (farm makes it on the first build)"
    )]
    NotADirectory { path: PathBuf },
    #[error(
        "There is no store at `{path}`\nhint: check --store (FARM_STORE); farm makes a store on \
         the first `farm build` or `farm up`"
    )]
    NoStore { path: PathBuf },
    #[error(
        "Entry name `{name}` is not allowed: use letters, digits, `.`, `_` and `-` only, at most \
         {MAX_NAME_LEN} characters, not starting with `.`\nhint: rename the image or platform"
    )]
    InvalidName { name: String },
    #[error(
        "Store entry `{path}` is damaged: {reason}\nhint: `farm store verify --repair` moves it \
         aside and rebuilds it"
    )]
    CorruptEntry { path: PathBuf, reason: String },
    #[error("Cannot commit `{path}`: {reason}\nhint: {hint}")]
    InvalidCommit {
        path: PathBuf,
        reason: String,
        hint: String,
    },
    #[error(
        "The store at `{path}` cannot be written to ({reason}), and {what} writes to it\nhint: \
         what it holds can be used as it is; to build, add or remove entries, point --store \
         (FARM_STORE) at a writable store (`farm store export` and `import` carry entries over)"
    )]
    ReadOnly {
        path: PathBuf,
        what: String,
        reason: String,
    },
    #[error(
        "Store entry `{path}` has changed since it was built: expected {expected} ({expected_size} \
         bytes), found {actual} ({actual_size} bytes)\nhint: `farm store verify` lists every damaged \
         entry; `farm store verify --repair` moves them aside and builds them again"
    )]
    Modified {
        path: PathBuf,
        expected: ContentHash,
        expected_size: u64,
        actual: ContentHash,
        actual_size: u64,
    },
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct LayoutFile {
    layout: u32,
}

/// A store rooted at one directory. Cheap to clone; holds no open files.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the store at `root`, creating it if missing.
    ///
    /// The root is made absolute: entry paths are handed to qemu as backing files, and qemu
    /// resolves a relative backing path against the overlay's directory, not the current one.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        if root.exists() && !root.is_dir() {
            return Err(StoreError::NotADirectory {
                path: root.to_path_buf(),
            });
        }
        fs_err::create_dir_all(root)?;
        let root = fs_err::canonicalize(root)?;
        let layout_path = root.join(LAYOUT_FILE);
        let has_layout_file = match fs_err::read(&layout_path) {
            Ok(bytes) => {
                check_layout(&root, &layout_path, &bytes)?;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e.into()),
        };
        for dir in [STORE_DIR, TMP_DIR, LOCKS_DIR, PARTIAL_DIR, LOGS_DIR] {
            fs_err::create_dir_all(root.join(dir))?;
        }
        if !has_layout_file {
            write_layout_file(&root, &layout_path)?;
        }
        Ok(Store { root })
    }

    /// The store at `root` if there is one, for commands that only read: nothing is
    /// created, and a missing store is `None` (every entry is simply absent).
    pub fn open_existing(root: &Path) -> Result<Option<Store>, StoreError> {
        if root.exists() && !root.is_dir() {
            return Err(StoreError::NotADirectory {
                path: root.to_path_buf(),
            });
        }
        if !root.is_dir() {
            return Ok(None);
        }
        let root = fs_err::canonicalize(root)?;
        let layout_path = root.join(LAYOUT_FILE);
        match fs_err::read(&layout_path) {
            Ok(bytes) => check_layout(&root, &layout_path, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Some(Store { root }))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn store_dir(&self) -> PathBuf {
        self.root.join(STORE_DIR)
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join(TMP_DIR)
    }

    fn locks_dir(&self) -> PathBuf {
        self.root.join(LOCKS_DIR)
    }

    /// Where the finished entry for `key` and `name` lives (or would live).
    pub fn entry_dir(&self, key: &DrvHash, name: &str) -> PathBuf {
        self.store_dir().join(entry_dir_name(key, name))
    }

    /// The finished entry of derivation `key`, if there is one, whatever it was called.
    ///
    /// Names are labels, not inputs: an image renamed in farm.toml has the same derivation
    /// and finds the entry built under its old name. `name` is tried first (one read of
    /// `meta.json`); otherwise `store/` is listed for the key. Lock-free: entries appear
    /// atomically and never change, so it is safe to call while another process builds.
    pub fn lookup(&self, key: &DrvHash, name: &str) -> Result<Option<Entry>, StoreError> {
        check_name(name)?;
        let entry = match load_entry(self.entry_dir(key, name))? {
            Some(entry) => entry,
            None => match self.find_by_key(key)? {
                Some(entry) => entry,
                None => return Ok(None),
            },
        };
        if entry.meta.drv_hash != *key {
            return Err(StoreError::CorruptEntry {
                reason: format!(
                    "it holds derivation {}, not {key} (a store key collision)",
                    entry.meta.drv_hash
                ),
                path: entry.dir,
            });
        }
        Ok(Some(entry))
    }

    /// The entry of `key` under any name (the first by directory name, if several).
    fn find_by_key(&self, key: &DrvHash) -> Result<Option<Entry>, StoreError> {
        let prefix = format!("{}-", key.store_key());
        let listing = match fs_err::read_dir(self.store_dir()) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut names: Vec<String> = listing
            .filter_map(|child| child.ok())
            .map(|child| child.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(&prefix) && parse_entry_dir_name(name).is_some())
            .collect();
        names.sort();
        for name in names {
            if let Some(entry) = load_entry(self.store_dir().join(name))? {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    /// Takes the exclusive lock on `key`, waiting as long as another holder keeps it.
    ///
    /// It prints nothing: call `try_lock` first to tell the user why farm is waiting.
    pub fn lock(&self, key: &DrvHash) -> Result<EntryLock, StoreError> {
        let file = self.open_lock_file(&key.store_key())?;
        file.lock()?;
        Ok(EntryLock { file, key: *key })
    }

    /// Takes the lock on `key` if nobody holds it; `None` if somebody does.
    pub fn try_lock(&self, key: &DrvHash) -> Result<Option<EntryLock>, StoreError> {
        Ok(self
            .try_lock_store_key(&key.store_key())?
            .map(|file| EntryLock { file, key: *key }))
    }

    fn try_lock_store_key(&self, store_key: &str) -> Result<Option<fs_err::File>, StoreError> {
        let file = self.open_lock_file(store_key)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(io::Error::new(
                e.kind(),
                format!("failed to lock `{}`: {e}", file.path().display()),
            )
            .into()),
        }
    }

    fn open_lock_file(&self, store_key: &str) -> Result<fs_err::File, StoreError> {
        let path = self.locks_dir().join(format!("{store_key}.lock"));
        // Only a builder takes a key's lock, and a build writes: a store that cannot be
        // written to is said to be so here, before any work.
        fs_err::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| match usage::cannot_write(&e) {
                true => StoreError::ReadOnly {
                    path: self.root.clone(),
                    what: "building".to_string(),
                    reason: e.kind().to_string(),
                },
                false => e.into(),
            })
    }

    /// Creates a fresh staging directory for the locked key, `tmp/<key>-<name>.<pid>.<random>`.
    ///
    /// It first removes every other staging directory of this key: holding the lock proves
    /// their builders are dead (killed farms), since only a lock holder stages. So keep at most
    /// one `Staging` per key alive at a time.
    pub fn stage(&self, lock: &EntryLock, name: &str) -> Result<Staging, StoreError> {
        check_name(name)?;
        debug_assert_eq!(
            lock.path().parent(),
            Some(self.locks_dir().as_path()),
            "the lock belongs to another store"
        );
        let key = lock.key;
        let tmp = self.tmp_dir();
        let key_prefix = format!("{}-", key.store_key());
        for child in fs_err::read_dir(&tmp)? {
            let child = child?;
            if child.file_name().to_string_lossy().starts_with(&key_prefix) {
                fsutil::remove_tree(&child.path())?;
            }
        }
        let prefix = format!("{}.{}.", entry_dir_name(&key, name), std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .rand_bytes(8)
            .tempdir_in(&tmp)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "failed to create a staging directory in `{}`: {e}",
                        tmp.display()
                    ),
                )
            })?
            .keep();
        Ok(Staging {
            dir,
            key,
            name: name.to_string(),
            committed: false,
        })
    }

    /// Where a resumable download for `key` is kept between attempts.
    pub fn partial_path(&self, key: &DrvHash) -> PathBuf {
        self.root
            .join(PARTIAL_DIR)
            .join(format!("{}.part", key.store_key()))
    }

    /// Where the tiny image's `.deb` files are kept, so rebuilding it (after a farm upgrade
    /// changed its recipe) downloads nothing when Debian published no new versions.
    pub fn deb_cache_dir(&self) -> PathBuf {
        self.root.join(DEBS_DIR)
    }

    /// Where `farm image export` keeps the GRUB `core.img` files it made, named by what
    /// they were made from: making one is a third of a small export's time.
    pub fn grub_cache_dir(&self) -> PathBuf {
        self.root.join("grub")
    }

    /// Where the build log of `key` goes; kept outside the entry so failed builds have one too.
    pub fn log_path(&self, key: &DrvHash, name: &str) -> PathBuf {
        self.root
            .join(LOGS_DIR)
            .join(format!("{}.log", entry_dir_name(key, name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_file_versions() {
        let root = Path::new("/r");
        let path = Path::new("/r/farm-store.json");
        assert!(check_layout(root, path, br#"{"layout": 1}"#).is_ok());
        let newer = check_layout(root, path, br#"{"layout": 2}"#).unwrap_err();
        assert!(matches!(newer, StoreError::NewerLayout { found: 2, .. }));
        assert!(newer.to_string().contains("hint: upgrade farm"));
        assert!(matches!(
            check_layout(root, path, br#"{"layout": 0}"#),
            Err(StoreError::BadLayoutFile { .. })
        ));
        assert!(matches!(
            check_layout(root, path, b"not json"),
            Err(StoreError::BadLayoutFile { .. })
        ));
    }

    #[test]
    fn open_creates_the_layout_and_reopens() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let store = Store::open(&root).unwrap();
        for dir in [STORE_DIR, TMP_DIR, LOCKS_DIR, PARTIAL_DIR, LOGS_DIR] {
            assert!(store.root().join(dir).is_dir(), "{dir}");
        }
        let text = fs_err::read_to_string(root.join(LAYOUT_FILE)).unwrap();
        assert_eq!(text.trim(), r#"{"layout":1}"#);
        Store::open(&root).unwrap();
    }

    #[test]
    fn paths_are_keyed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let key = DrvHash([0x11; 32]);
        let k = "11".repeat(16);
        assert_eq!(
            store.partial_path(&key),
            store.root().join(format!("partial/{k}.part"))
        );
        assert_eq!(
            store.log_path(&key, "base"),
            store.root().join(format!("logs/{k}-base.log"))
        );
    }

    #[test]
    fn invalid_names_are_refused_before_touching_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let err = store.lookup(&DrvHash([0; 32]), "../etc").unwrap_err();
        assert!(matches!(err, StoreError::InvalidName { .. }));
        assert!(
            err.to_string()
                .starts_with("Entry name `../etc` is not allowed")
        );
    }

    #[test]
    fn try_lock_is_exclusive_and_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let key = DrvHash([7; 32]);
        let held = store.try_lock(&key).unwrap().expect("free");
        assert!(store.try_lock(&key).unwrap().is_none());
        assert!(store.try_lock(&DrvHash([8; 32])).unwrap().is_some());
        drop(held);
        assert!(store.try_lock(&key).unwrap().is_some());
    }
}
