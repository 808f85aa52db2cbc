//! Removing what `farm gc` decided to remove: entries (each with one rename out of
//! `store/`, so readers see it whole or not at all), and the leftovers around them — stale
//! staging directories, old partial downloads, logs of entries that are gone.
//!
//! Callers hold the store-wide lock exclusively (`UseMode::Exclusive`): nothing else uses
//! the store while this runs.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::entry::parse_entry_dir_name;
use super::{DAMAGED_DIR, LOGS_DIR, PARTIAL_DIR, STORE_DIR, Store, StoreError, TMP_DIR, fsutil};

/// How much a sweep removed (or, in a dry run, would remove).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub items: usize,
    pub bytes: u64,
}

impl std::ops::AddAssign for Swept {
    fn add_assign(&mut self, other: Swept) {
        self.items += other.items;
        self.bytes += other.bytes;
    }
}

impl Store {
    /// Bytes a file or tree takes on disk (allocated blocks, so sparse images count what
    /// they really use).
    pub fn disk_usage(path: &Path) -> std::io::Result<u64> {
        let meta = fs_err::symlink_metadata(path)?;
        let mut bytes = meta.blocks() * 512;
        if meta.is_dir() {
            for child in fs_err::read_dir(path)? {
                bytes += Store::disk_usage(&child?.path())?;
            }
        }
        Ok(bytes)
    }

    /// Removes the entry `dir_name`: renamed into `tmp/` first (one atomic step out of
    /// `store/`), then deleted. Returns the bytes freed.
    pub fn remove_entry(&self, dir_name: &str) -> Result<u64, StoreError> {
        if parse_entry_dir_name(dir_name).is_none() {
            return Err(StoreError::CorruptEntry {
                path: self.root.join(STORE_DIR).join(dir_name),
                reason: "its name is not `<key>-<name>`, so farm will not remove it".into(),
            });
        }
        let dir = self.root.join(STORE_DIR).join(dir_name);
        let bytes = Store::disk_usage(&dir)?;
        // Moving a directory to another parent updates its `..`: it must be writable.
        fs_err::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let doomed = self
            .root
            .join(TMP_DIR)
            .join(format!("gc.{dir_name}.{}", std::process::id()));
        fs_err::rename(&dir, &doomed)?;
        fsutil::fsync_dir(&self.root.join(STORE_DIR))?;
        fsutil::remove_tree(&doomed)?;
        Ok(bytes)
    }

    /// Moves the entry `dir_name` out of `store/` into `damaged/<dir_name>.<unix time>`,
    /// whole, where a person can look at it; nothing finds it there. Returns where it went.
    pub fn set_aside(&self, dir_name: &str) -> Result<std::path::PathBuf, StoreError> {
        let dir = self.root.join(STORE_DIR).join(dir_name);
        if parse_entry_dir_name(dir_name).is_none() {
            return Err(StoreError::CorruptEntry {
                path: dir,
                reason: "its name is not `<key>-<name>`, so farm will not move it".into(),
            });
        }
        let aside_dir = self.root.join(DAMAGED_DIR);
        fs_err::create_dir_all(&aside_dir)?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = aside_dir.join(format!("{dir_name}.{now}"));
        fs_err::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        fs_err::rename(&dir, &aside)?;
        fsutil::fsync_dir(&self.root.join(STORE_DIR))?;
        fsutil::fsync_dir(&aside_dir)?;
        Ok(aside)
    }

    /// Leftovers in `tmp/`: staging directories of builds that died (their key is not
    /// locked) and entries a crashed gc had begun to remove.
    pub fn sweep_tmp(&self, dry_run: bool) -> Result<Swept, StoreError> {
        let mut swept = Swept::default();
        for child in fs_err::read_dir(self.root.join(TMP_DIR))? {
            let child = child?;
            let name = child.file_name().to_string_lossy().into_owned();
            // Under the exclusive lock no import runs: its scratch directory is abandoned.
            let abandoned = if name.starts_with("gc.") || name.starts_with("import.") {
                true
            } else {
                // Staging dirs are `<key>-<name>.<pid>.<random>`; a held key lock means a
                // build is writing it.
                match parse_entry_dir_name(&name) {
                    Some((store_key, _)) => self.try_lock_store_key(store_key)?.is_some(),
                    None => false,
                }
            };
            if !abandoned {
                continue;
            }
            swept += Swept {
                items: 1,
                bytes: Store::disk_usage(&child.path())?,
            };
            if !dry_run {
                fsutil::remove_tree(&child.path())?;
            }
        }
        Ok(swept)
    }

    /// Partial downloads not touched for `stale_after`, except those of `wanted_keys`
    /// (store keys the current farm.toml still needs: a later build resumes them).
    pub fn sweep_partials(
        &self,
        stale_after: Duration,
        wanted_keys: &BTreeSet<String>,
        dry_run: bool,
    ) -> Result<Swept, StoreError> {
        self.sweep_files(PARTIAL_DIR, dry_run, |name, age| {
            let key = name.split('.').next().unwrap_or_default();
            !wanted_keys.contains(key) && age >= stale_after
        })
    }

    /// Build logs of the entries in `removed`, and logs older than `stale_after` whose
    /// entry does not exist (failed builds long ago).
    pub fn sweep_logs(
        &self,
        removed: &BTreeSet<String>,
        stale_after: Duration,
        dry_run: bool,
    ) -> Result<Swept, StoreError> {
        let store_dir = self.root.join(STORE_DIR);
        self.sweep_files(LOGS_DIR, dry_run, |name, age| {
            let Some(entry) = name.strip_suffix(".log") else {
                return false;
            };
            removed.contains(entry) || (age >= stale_after && !store_dir.join(entry).exists())
        })
    }

    fn sweep_files(
        &self,
        dir: &str,
        dry_run: bool,
        doomed: impl Fn(&str, Duration) -> bool,
    ) -> Result<Swept, StoreError> {
        let mut swept = Swept::default();
        let listing = match fs_err::read_dir(self.root.join(dir)) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(swept),
            Err(e) => return Err(e.into()),
        };
        let now = SystemTime::now();
        for child in listing {
            let child = child?;
            let meta = child.metadata()?;
            if !meta.is_file() {
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if !doomed(&child.file_name().to_string_lossy(), age) {
                continue;
            }
            swept += Swept {
                items: 1,
                bytes: meta.blocks() * 512,
            };
            if !dry_run {
                fs_err::remove_file(child.path())?;
            }
        }
        Ok(swept)
    }
}
