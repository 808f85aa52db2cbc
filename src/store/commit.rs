//! Committing a staged entry: the checks that keep the store honest and movable (metadata
//! that matches the staging, a regular qcow2 disk, a relative backing path to an entry of
//! this store), then the rename into `store/` that is the commit point.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use super::entry::{parse_entry_dir_name, relative_backing_for};
use super::fsutil::mtime_ns;
use super::layout::load_entry;
use super::{
    DISK_FILE, Entry, EntryMeta, FileRecord, LAYOUT_VERSION, META_FILE, Staging, Store, StoreError,
    fsutil, qcow2,
};

impl Store {
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
                            "run `qemu-img rebase -u -f qcow2 -F qcow2 -b {expected} {}` \
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
