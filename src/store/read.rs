//! Reading the store without a lock: an entry by directory, every entry (and what in
//! `store/` is not one), an entry checked to be intact before it is used, the files of an
//! entry as recorded at commit.

use std::collections::BTreeMap;

use super::commit::record_files;
use super::entry::parse_entry_dir_name;
use super::fsutil::mtime_ns;
use super::layout::load_entry;
use super::{DISK_FILE, Entry, FileRecord, Store, StoreError, fsutil};
use crate::model::hash::DrvHash;

impl Store {
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
