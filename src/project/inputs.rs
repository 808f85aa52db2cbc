//! Reads the files a configuration refers to (keys, files, local images) and hashes their
//! content, so derivations depend on what the files say, not where they are.
//!
//! A missing file is an error naming the file and the farm.toml line that refers to it —
//! never a silent skip (one of the seed's pain points). Hashes are remembered in the store
//! (`input-hashes.json`) keyed by path, size, inode and mtime, so a cached `farm build` of a
//! multi-GiB local image does not read the image again.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::build::derivation::{InputHashes, referenced_files};
use crate::model::config::Config;
use crate::model::config::diagnostic::Diagnostic;
use crate::model::hash::ContentHash;

/// The file in the store root remembering input hashes between runs.
pub const HASH_CACHE_FILE: &str = "input-hashes.json";

/// What identifies an unchanged file without reading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    len: u64,
    ino: u64,
    dev: u64,
    mtime_ns: i128,
    blake3: ContentHash,
}

fn stamp_matches(stamp: &FileStamp, meta: &std::fs::Metadata) -> bool {
    stamp.len == meta.len()
        && stamp.ino == meta.ino()
        && stamp.dev == meta.dev()
        && stamp.mtime_ns == mtime_ns(meta)
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
}

/// Hashes every file `config` refers to; all missing or unreadable files are reported.
/// With `store_root`, remembered hashes are reused and new ones remembered (only when the
/// store already exists: checking a configuration creates nothing).
pub fn hash_inputs(
    config: &Config,
    store_root: Option<&Path>,
) -> Result<InputHashes, Vec<Diagnostic>> {
    let cache_path = store_root
        .filter(|root| root.is_dir())
        .map(|root| root.join(HASH_CACHE_FILE));
    let mut cache: BTreeMap<PathBuf, FileStamp> = cache_path
        .as_ref()
        .and_then(|p| fs_err::read(p).ok())
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let mut changed = false;
    let mut hashes = InputHashes::new();
    let mut problems = Vec::new();
    for (path, at, _) in referenced_files(config) {
        if hashes.contains_key(&path) {
            continue;
        }
        let result = fs_err::metadata(&path).and_then(|meta| {
            if let Some(stamp) = cache.get(&path).filter(|s| stamp_matches(s, &meta)) {
                return Ok(stamp.blake3);
            }
            let blake3 = hash_file(&path)?;
            cache.insert(
                path.clone(),
                FileStamp {
                    len: meta.len(),
                    ino: meta.ino(),
                    dev: meta.dev(),
                    mtime_ns: mtime_ns(&meta),
                    blake3,
                },
            );
            changed = true;
            Ok(blake3)
        });
        match result {
            Ok(hash) => {
                hashes.insert(path, hash);
            }
            Err(e) => problems.push(
                Diagnostic::new(format!("Cannot read `{}`: {e}", path.display()), at).hint(
                    "paths are relative to the file that names them; `~/` is your home directory",
                ),
            ),
        }
    }
    if let (true, Some(cache_path)) = (changed, cache_path) {
        // Best effort: a cache that cannot be written only costs a re-hash next time.
        let _ = crate::sys::files::replace_file(
            &cache_path,
            &serde_json::to_vec(&cache).unwrap_or_default(),
            0o644,
        );
    }
    // A playbook's `roles/` is an input as a whole tree (not remembered by stamp: a tree
    // has no single mtime to trust).
    for platform in config.platforms.values() {
        if let Some(playbook) = &platform.steps.playbook {
            let roles = crate::model::build::derivation::roles_dir(&playbook.value);
            if roles.is_dir() && !hashes.contains_key(&roles) {
                match hash_tree(&roles) {
                    Ok(hash) => {
                        hashes.insert(roles, hash);
                    }
                    Err(e) => problems.push(Diagnostic::new(
                        format!("Cannot read `{}`: {e}", roles.display()),
                        playbook.at.clone(),
                    )),
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(hashes)
    } else {
        Err(problems)
    }
}

/// blake3 over a directory tree: every file's path relative to `root`, whether it is
/// executable, and its content, in path order. Symlinks are hashed as their target text.
pub fn hash_tree(root: &Path) -> std::io::Result<ContentHash> {
    use std::os::unix::fs::PermissionsExt;
    let mut entries = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs_err::read_dir(&dir)? {
            let path = entry?.path();
            let meta = fs_err::symlink_metadata(&path)?;
            if meta.is_dir() {
                stack.push(path);
            } else {
                entries.push((path, meta));
            }
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = blake3::Hasher::new();
    for (path, meta) in entries {
        let relative = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        let body = if meta.file_type().is_symlink() {
            fs_err::read_link(&path)?
                .to_string_lossy()
                .as_bytes()
                .to_vec()
        } else {
            hash_file(&path)?.0.to_vec()
        };
        for field in [
            relative.as_bytes(),
            &[(meta.permissions().mode() & 0o111 != 0) as u8],
            &body,
        ] {
            hasher.update(&(field.len() as u64).to_le_bytes());
            hasher.update(field);
        }
    }
    Ok(ContentHash::from_blake3(hasher.finalize()))
}

/// blake3 of a file's content, streamed in large blocks (keys are tiny, images are not).
pub fn hash_file(path: &Path) -> std::io::Result<ContentHash> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(ContentHash::from_blake3(hasher.finalize()))
}
