//! The store's layout file (`farm-store.json`) and reading an entry back from its
//! directory: what `Store` checks before trusting anything it finds on disk.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::entry::{entry_dir_name, is_valid_name};
use super::{Entry, EntryMeta, LAYOUT_VERSION, LayoutFile, META_FILE, StoreError, fsutil};

pub(crate) fn check_name(name: &str) -> Result<(), StoreError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            name: name.to_string(),
        })
    }
}

pub(crate) fn check_layout(root: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let file: LayoutFile =
        serde_json::from_slice(bytes).map_err(|e| StoreError::BadLayoutFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if file.layout > LAYOUT_VERSION {
        return Err(StoreError::NewerLayout {
            root: root.to_path_buf(),
            found: file.layout,
            supported: LAYOUT_VERSION,
        });
    }
    if file.layout < 1 {
        return Err(StoreError::BadLayoutFile {
            path: path.to_path_buf(),
            reason: format!("layout {} does not exist", file.layout),
        });
    }
    Ok(())
}

/// Writes `farm-store.json` through a temporary file and a rename, so a concurrent `open`
/// never reads a half-written file; two first opens write the same bytes.
pub(crate) fn write_layout_file(root: &Path, path: &Path) -> Result<(), StoreError> {
    let mut json = serde_json::to_vec(&LayoutFile {
        layout: LAYOUT_VERSION,
    })
    .map_err(io::Error::other)?;
    json.push(b'\n');
    let mut tmp = tempfile::Builder::new()
        .prefix(".farm-store.json.")
        .tempfile_in(root)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("failed to create a file in `{}`: {e}", root.display()),
            )
        })?;
    tmp.write_all(&json)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| {
        io::Error::new(
            e.error.kind(),
            format!("failed to write `{}`: {}", path.display(), e.error),
        )
    })?;
    fsutil::fsync_dir(root)?;
    Ok(())
}

/// Reads the entry in `dir`: `None` if there is no such directory, an error if it is there but
/// not a well-formed entry.
pub(crate) fn load_entry(dir: PathBuf) -> Result<Option<Entry>, StoreError> {
    let corrupt = |dir: PathBuf, reason: String| StoreError::CorruptEntry { path: dir, reason };
    let bytes = match fs_err::read(dir.join(META_FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return if dir.exists() {
                Err(corrupt(dir, format!("it has no `{META_FILE}`")))
            } else {
                Ok(None)
            };
        }
        Err(e) => return Err(e.into()),
    };
    let meta: EntryMeta = match serde_json::from_slice(&bytes) {
        Ok(meta) => meta,
        Err(e) => {
            return Err(corrupt(
                dir,
                format!("its `{META_FILE}` is unreadable: {e}"),
            ));
        }
    };
    if meta.layout > LAYOUT_VERSION {
        return Err(corrupt(
            dir,
            format!(
                "it was written for store layout {}, newer than this farm's {LAYOUT_VERSION}",
                meta.layout
            ),
        ));
    }
    let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if dir_name != entry_dir_name(&meta.drv_hash, &meta.name) {
        return Err(corrupt(
            dir.clone(),
            format!(
                "its `{META_FILE}` describes {} `{}`, which belongs in another directory",
                meta.drv_hash, meta.name
            ),
        ));
    }
    Ok(Some(Entry { dir, meta }))
}
