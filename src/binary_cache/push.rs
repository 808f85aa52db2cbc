//! `farm store push`: uploading store entries to a cache, signed.
//!
//! Per entry, blobs first and the record last, so a record never names a blob the cache
//! does not have; what the cache already has (a record, a blob shared with another entry)
//! is not uploaded again, which also makes an interrupted push resume where it stopped.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::backend::{Backend, BackendError, Progress, no_progress};
use super::blob::compress;
use crate::model::build::cache_record::{
    Blob, CACHE_FORMAT, CACHE_INFO, CacheRecord, SnapshotRecord, blob_path, record_path,
    snapshot_path,
};
use crate::model::signing::SecretKey;
use crate::progress::Reporter;
use crate::store::{Entry, Store, StoreError};

/// How many files are compressed and uploaded at once.
const PARALLEL_UPLOADS: usize = 4;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Entries whose record was uploaded.
    pub pushed: Vec<String>,
    /// Entries the cache already had.
    pub present: Vec<String>,
    pub blobs_uploaded: usize,
    /// Compressed bytes uploaded.
    pub bytes_uploaded: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("`{path}` changed since it was committed\nhint: `farm store verify --repair`")]
    Changed { path: std::path::PathBuf },
    #[error("Cannot compress `{path}`: {source}")]
    Compress {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Pushes `entries` (parents first, each parent in the list or already in the cache) to
/// `cache`, signing each record with `key`.
pub fn push(
    store: &Store,
    cache: &dyn Backend,
    entries: &[Entry],
    key: &SecretKey,
    reporter: &Reporter,
) -> Result<PushReport, PushError> {
    let mut report = PushReport::default();
    if cache.size(CACHE_INFO)?.is_none() {
        let info = tempfile::NamedTempFile::new_in(store.tmp_dir()).map_err(StoreError::Io)?;
        fs_err::write(info.path(), format!("{{\"format\": {CACHE_FORMAT}}}\n"))
            .map_err(StoreError::Io)?;
        cache.put(CACHE_INFO, info.path(), &no_progress())?;
    }
    for entry in entries {
        let name = entry.dir_name().to_string();
        if cache.size(&record_path(&entry.meta.drv_hash))?.is_some() {
            report.present.push(name);
            continue;
        }
        let files = store.files_of(entry)?;
        let blobs = Mutex::new(BTreeMap::new());
        let failure = Mutex::new(None);
        let queue = Mutex::new(files.iter());
        let uploaded = Mutex::new((0usize, 0u64));
        std::thread::scope(|scope| {
            for _ in 0..PARALLEL_UPLOADS {
                scope.spawn(|| {
                    loop {
                        let Some((file, record)) =
                            queue.lock().unwrap_or_else(|e| e.into_inner()).next()
                        else {
                            return;
                        };
                        let result = upload_file(store, cache, entry, file, record, reporter);
                        match result {
                            Ok((blob, sent)) => {
                                blobs
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(file.clone(), blob);
                                if let Some(bytes) = sent {
                                    let mut u = uploaded.lock().unwrap_or_else(|e| e.into_inner());
                                    u.0 += 1;
                                    u.1 += bytes;
                                }
                            }
                            Err(e) => {
                                failure
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .get_or_insert(e);
                                return;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        let (count, bytes) = uploaded.into_inner().unwrap_or_else(|e| e.into_inner());
        report.blobs_uploaded += count;
        report.bytes_uploaded += bytes;
        let parent = entry
            .meta
            .parent
            .as_ref()
            .and_then(|p| store.entry_by_dir(p));
        let mut record = CacheRecord {
            format: CACHE_FORMAT,
            drv_hash: entry.meta.drv_hash,
            name: entry.meta.name.clone(),
            derivation: entry.meta.derivation.clone(),
            parent: parent.as_ref().map(|p| p.meta.drv_hash),
            parent_dir: entry.meta.parent.clone(),
            parent_output: parent.as_ref().map(|p| p.meta.output_blake3),
            files: blobs.into_inner().unwrap_or_else(|e| e.into_inner()),
            signatures: Vec::new(),
        };
        record.signatures.push(key.sign(&record.signed_bytes()));
        let json = tempfile::NamedTempFile::new_in(store.tmp_dir()).map_err(StoreError::Io)?;
        fs_err::write(
            json.path(),
            serde_json::to_vec_pretty(&record).expect("records serialize"),
        )
        .map_err(StoreError::Io)?;
        cache.put(&record_path(&record.drv_hash), json.path(), &no_progress())?;
        reporter.line(format!("{:>12} {name}", "pushed"));
        report.pushed.push(name);
    }
    Ok(report)
}

/// Uploads the record naming snapshot `snapshot`'s entries (pushed before it, so the name
/// never points at entries the cache lacks), signed with `key`. Replaces an older one of
/// that name: a snapshot saved again is the one its name means.
pub fn push_snapshot(
    store: &Store,
    cache: &dyn Backend,
    mut snapshot: SnapshotRecord,
    key: &SecretKey,
) -> Result<(), PushError> {
    snapshot.signatures = vec![key.sign(&snapshot.signed_bytes())];
    let json = tempfile::NamedTempFile::new_in(store.tmp_dir()).map_err(StoreError::Io)?;
    fs_err::write(
        json.path(),
        serde_json::to_vec_pretty(&snapshot).expect("records serialize"),
    )
    .map_err(StoreError::Io)?;
    cache.put(&snapshot_path(&snapshot.name), json.path(), &no_progress())?;
    Ok(())
}

/// Uploads one file's blob unless the cache has it; returns the blob and the compressed
/// bytes sent (`None` when nothing was sent).
fn upload_file(
    store: &Store,
    cache: &dyn Backend,
    entry: &Entry,
    file: &str,
    record: &crate::store::FileRecord,
    reporter: &Reporter,
) -> Result<(Blob, Option<u64>), PushError> {
    let path = blob_path(&record.blake3);
    if let Some(zstd_size) = cache.size(&path)? {
        return Ok((
            Blob {
                blake3: record.blake3,
                size: record.size,
                zstd_size,
            },
            None,
        ));
    }
    let source = entry.dir.join(file);
    let bar = reporter.spinner("compressing", &format!("{}/{file}", entry.dir_name()));
    let (compressed, zstd_size, read) =
        compress(&source, &store.tmp_dir()).map_err(|source_err| PushError::Compress {
            path: source.clone(),
            source: source_err,
        })?;
    bar.finish_and_clear();
    if read != record.blake3 {
        return Err(PushError::Changed { path: source });
    }
    let bar = reporter.bytes_for(
        "uploading",
        &format!("{}/{file}", entry.dir_name()),
        Some(zstd_size),
    );
    let progress_bar = bar.clone();
    let progress: Progress = std::sync::Arc::new(move |n| progress_bar.inc(n));
    cache.put(&path, compressed.path(), &progress)?;
    bar.finish_and_clear();
    Ok((
        Blob {
            blake3: record.blake3,
            size: record.size,
            zstd_size,
        },
        Some(zstd_size),
    ))
}
