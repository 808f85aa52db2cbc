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
mod entry;
pub(crate) mod fsutil;
mod layout;
mod lock;
pub(crate) mod qcow2;
mod roots;
mod staging;
mod sweep;
mod usage;
mod verify;

use std::collections::BTreeMap;
use std::io::{self, Write};
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
use entry::{parse_entry_dir_name, relative_backing_for};
use fsutil::mtime_ns;
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
        Ok(fs_err::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?)
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

    /// Makes a staged entry a finished, read-only entry in `store/` and returns it.
    ///
    /// `meta.name` and `meta.drv_hash` must be the staging's; `meta.size` must be the size of
    /// `disk.qcow2` (see `Staging::hash_disk`); `meta.layout` is set here. The disk's backing
    /// file must be `relative_backing(parent)` when `meta.parent` is set and absent otherwise,
    /// so the store can move. If the entry already exists, it is returned and the staging is
    /// discarded: the same derivation gives the same result.
    pub fn commit(&self, mut staging: Staging, mut meta: EntryMeta) -> Result<Entry, StoreError> {
        let target = self.entry_dir(&staging.key, &staging.name);
        if let Some(existing) = self.lookup(&staging.key, &staging.name)? {
            return Ok(existing);
        }
        meta.layout = LAYOUT_VERSION;
        self.check_commit(&staging, &meta)?;
        meta.disk_mtime_ns = Some(mtime_ns(&fs_err::metadata(staging.dir.join(DISK_FILE))?));
        meta.files = record_files(&staging.dir)?;
        meta.meta_blake3 = None;
        meta.meta_blake3 = Some(meta.self_hash());

        let meta_path = staging.dir.join(META_FILE);
        let json = meta.to_json();
        let mut file = fs_err::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&meta_path)?;
        file.write_all(&json)?;
        drop(file);
        fsutil::seal_tree(&staging.dir)?;

        if let Err(e) = fs_err::rename(&staging.dir, &target) {
            // Lost a race with a commit that did not hold the lock: theirs is as good as ours.
            if let Some(existing) = load_entry(target)? {
                return Ok(existing);
            }
            return Err(e.into());
        }
        staging.committed = true;
        fsutil::fsync_dir(&self.store_dir())?;
        fsutil::fsync_dir(&self.tmp_dir())?;
        fsutil::seal_dir(&target)?;
        Ok(Entry { dir: target, meta })
    }

    fn check_commit(&self, staging: &Staging, meta: &EntryMeta) -> Result<(), StoreError> {
        let invalid = |reason: String, hint: &str| StoreError::InvalidCommit {
            path: staging.dir.clone(),
            reason,
            hint: hint.to_string(),
        };
        if meta.drv_hash != staging.key || meta.name != staging.name {
            return Err(invalid(
                format!(
                    "its metadata is for {} `{}`, but it was staged for {} `{}`",
                    meta.drv_hash, meta.name, staging.key, staging.name
                ),
                "commit the EntryMeta of the derivation that was staged",
            ));
        }
        let disk = staging.disk_path();
        let size = match fs_err::symlink_metadata(&disk) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => {
                return Err(invalid(
                    format!("`{}` is not a regular file", disk.display()),
                    "write the disk image itself there, not a link",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(invalid(
                    format!("it has no `{DISK_FILE}`"),
                    "write the disk image to Staging::disk_path() before committing",
                ));
            }
            Err(e) => return Err(e.into()),
        };
        if meta.size != size {
            return Err(invalid(
                format!(
                    "its metadata gives a size of {} bytes, but `{DISK_FILE}` has {size}",
                    meta.size
                ),
                "fill EntryMeta::size and output_blake3 from Staging::hash_disk()",
            ));
        }
        let Some(info) = qcow2::read_info(&disk)? else {
            return Err(invalid(
                format!("`{}` is not a qcow2 image", disk.display()),
                "convert it with qemu_img::convert_to_qcow2",
            ));
        };
        match (&meta.parent, info.backing) {
            (None, None) => Ok(()),
            (None, Some(file)) => Err(invalid(
                format!("its disk has backing file `{file}` but its metadata names no parent"),
                "set EntryMeta::parent to the parent entry's dir_name()",
            )),
            (Some(parent), backing) => {
                let parent_ok = parse_entry_dir_name(parent).is_some()
                    && self.store_dir().join(parent).join(META_FILE).is_file();
                if !parent_ok {
                    return Err(invalid(
                        format!("its parent `{parent}` is not an entry of this store"),
                        "commit the parent first and use its Entry::dir_name()",
                    ));
                }
                let expected = relative_backing_for(parent);
                let expected = expected.to_string_lossy();
                match backing {
                    Some(file) if file == expected => Ok(()),
                    Some(file) => Err(invalid(
                        format!(
                            "its disk has backing file `{file}`; an entry must record `{expected}` \
                             so the store can move"
                        ),
                        &format!(
                            "run `qemu-img rebase -u -F qcow2 -b {expected} {}` \
                             (qemu_img::rebase_unsafe with store::relative_backing) before commit",
                            disk.display()
                        ),
                    )),
                    None => Err(invalid(
                        format!(
                            "its metadata names parent `{parent}` but its disk has no backing file"
                        ),
                        "create the disk with qemu_img::create_overlay on the parent's disk",
                    )),
                }
            }
        }
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

    /// Where the build log of `key` goes; kept outside the entry so failed builds have one too.
    pub fn log_path(&self, key: &DrvHash, name: &str) -> PathBuf {
        self.root
            .join(LOGS_DIR)
            .join(format!("{}.log", entry_dir_name(key, name)))
    }

    /// The entry in directory `dir_name` of `store/`, if it is one.
    pub fn entry_by_dir(&self, dir_name: &str) -> Option<Entry> {
        parse_entry_dir_name(dir_name)?;
        load_entry(self.store_dir().join(dir_name)).ok().flatten()
    }

    /// Every file of `entry` but `meta.json`, disk included, with its blake3 and size:
    /// as recorded at commit, or (for entries of older farms, which recorded only the
    /// disk) hashed now.
    pub fn files_of(&self, entry: &Entry) -> Result<BTreeMap<String, FileRecord>, StoreError> {
        let mut files = match entry.meta.meta_blake3 {
            Some(_) => entry.meta.files.clone(),
            None => record_files(&entry.dir)?,
        };
        files.insert(
            DISK_FILE.to_string(),
            FileRecord {
                blake3: entry.meta.output_blake3,
                size: entry.meta.size,
            },
        );
        Ok(files)
    }

    /// Every finished entry, sorted by directory name.
    pub fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        let (entries, problems) = self.scan()?;
        match problems.into_iter().next() {
            Some(problem) => Err(problem),
            None => Ok(entries),
        }
    }

    /// Every well-formed entry, and a problem for each thing in `store/` that is not one
    /// (a stray file, a damaged `meta.json`): one bad item does not hide the others.
    pub fn scan(&self) -> Result<(Vec<Entry>, Vec<StoreError>), StoreError> {
        let mut entries = Vec::new();
        let mut problems = Vec::new();
        for child in fs_err::read_dir(self.store_dir())? {
            let path = child?.path();
            let is_entry_name = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_entry_dir_name)
                .is_some();
            if !is_entry_name {
                problems.push(StoreError::CorruptEntry {
                    path,
                    reason: "its name is not `<key>-<name>`, so farm did not put it there".into(),
                });
                continue;
            }
            // Gone since read_dir listed it (removed by gc): not an entry any more.
            match load_entry(path) {
                Ok(entry) => entries.extend(entry),
                Err(problem) => problems.push(problem),
            }
        }
        entries.sort_by(|a, b| a.dir.cmp(&b.dir));
        Ok((entries, problems))
    }

    /// The entry for `key` and `name` if there is one and its disk is still what was
    /// committed: a disk whose size or modification time changed is re-hashed, and one
    /// whose bytes changed is an error (`farm store verify` finds every such entry), never
    /// "cached".
    pub fn lookup_intact(&self, key: &DrvHash, name: &str) -> Result<Option<Entry>, StoreError> {
        let Some(entry) = self.lookup(key, name)? else {
            return Ok(None);
        };
        let stat = fs_err::metadata(entry.disk_path())?;
        let unchanged = stat.len() == entry.meta.size
            && entry
                .meta
                .disk_mtime_ns
                .is_none_or(|recorded| recorded == mtime_ns(&stat));
        if !unchanged {
            self.verify(&entry)?;
        }
        Ok(Some(entry))
    }

    /// Re-hashes the entry's disk and compares it with what was recorded at commit.
    pub fn verify(&self, entry: &Entry) -> Result<(), StoreError> {
        let disk = entry.disk_path();
        let (actual, actual_size) = fsutil::hash_file(&disk)?;
        if actual != entry.meta.output_blake3 || actual_size != entry.meta.size {
            return Err(StoreError::Modified {
                path: disk,
                expected: entry.meta.output_blake3,
                expected_size: entry.meta.size,
                actual,
                actual_size,
            });
        }
        Ok(())
    }
}

/// The path (relative, `/`-separated), blake3 and size of every regular file under `dir`
/// except the disk (its hash is `output_blake3`) and `meta.json` (which holds these).
pub(crate) fn record_files(dir: &Path) -> io::Result<BTreeMap<String, FileRecord>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, FileRecord>) -> io::Result<()> {
        for child in fs_err::read_dir(dir)? {
            let path = child?.path();
            let meta = fs_err::symlink_metadata(&path)?;
            if meta.is_dir() {
                walk(root, &path, out)?;
                continue;
            }
            let relative = path
                .strip_prefix(root)
                .expect("walked from root")
                .to_string_lossy()
                .into_owned();
            if relative == DISK_FILE || relative == META_FILE {
                continue;
            }
            let (blake3, size) = fsutil::hash_file(&path)?;
            out.insert(relative, FileRecord { blake3, size });
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
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
