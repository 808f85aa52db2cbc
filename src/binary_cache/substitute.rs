//! Substitution: asking caches for derivations before building them, and fetching what
//! they have into a staging directory, checked all the way.
//!
//! A record is used only if it is signed by a key in `trusted-public-keys`, its derivation
//! hashes to the derivation farm wants, and its parent is the parent farm wants; each file
//! is hashed as it is unpacked. A cache that cannot be reached is skipped with a warning
//! (after `Timeouts`), and farm builds instead.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;

use super::backend::{Backend, BackendError, Timeouts};
use super::blob::{BlobError, download};
use super::open::open;
use crate::model::build::cache_record::{
    CacheRecord, MAX_RECORD_BYTES, SnapshotRecord, record_path, snapshot_path,
};
use crate::model::build::derivation::{DrvNode, hash_of_json};
use crate::model::hash::{ContentHash, DrvHash};
use crate::model::signing::{PublicKey, Untrusted, verify};
use crate::store::Entry;

/// How many records are asked for at once per cache (HTTP has no batch query).
const PARALLEL_QUERIES: usize = 8;

/// A cache's offer of one derivation: its trusted record.
#[derive(Clone, Debug)]
pub struct Offer {
    pub backend: usize,
    pub url: String,
    pub record: CacheRecord,
}

#[derive(Debug, thiserror::Error)]
pub enum SubstituteError {
    #[error(transparent)]
    Space(#[from] crate::sys::space::SpaceShort),
    #[error(
        "Cache `{url}` has `{entry}`, but its record is not trusted: {reason}\nhint: add the \
         public key that signs the cache to `trusted-public-keys` in farm.toml (`farm store \
         keygen` printed it), or remove the cache from `substituters`"
    )]
    Untrusted {
        url: String,
        entry: String,
        reason: Untrusted,
    },
    #[error("Cache `{url}` has a record for `{entry}` that does not describe it: {reason}")]
    WrongRecord {
        url: String,
        entry: String,
        reason: String,
    },
    #[error(
        "Cache `{url}`: file `{file}` of `{entry}`: {source}\nhint: the cache is damaged or was \
         altered; nothing of `{entry}` was stored"
    )]
    Blob {
        url: String,
        entry: String,
        file: String,
        #[source]
        source: Box<BlobError>,
    },
    #[error(
        "Cache `{url}` built `{entry}` on `{theirs}`, but this store has that parent as \
         `{ours}`; its disk would not find its backing file"
    )]
    ParentLabel {
        url: String,
        entry: String,
        theirs: String,
        ours: String,
    },
    #[error(
        "Cache `{url}` built `{entry}` on other bytes of `{parent}` than this store holds (it \
         was built here, and is not bit-reproducible); the layer only fits the bytes it was \
         built on"
    )]
    ParentBytes {
        url: String,
        entry: String,
        parent: String,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// The caches of one command, in the order they are asked.
pub struct Substituters {
    backends: Vec<Box<dyn Backend>>,
    trusted: Vec<PublicKey>,
    /// Caches that failed to answer during this command: not asked again.
    down: Mutex<BTreeSet<usize>>,
}

impl std::fmt::Debug for Substituters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<&str> = self.backends.iter().map(|b| b.url()).collect();
        f.debug_struct("Substituters").field("urls", &urls).finish()
    }
}

impl Substituters {
    pub fn new(
        urls: &[String],
        trusted: Vec<PublicKey>,
        timeouts: Timeouts,
    ) -> Result<Substituters, BackendError> {
        let backends = urls
            .iter()
            .map(|url| open(url, timeouts))
            .collect::<Result<_, _>>()?;
        Ok(Substituters {
            backends,
            trusted,
            down: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    pub fn url(&self, backend: usize) -> &str {
        self.backends[backend].url()
    }

    /// For each of `nodes` that some cache has, the first cache's trusted record. Problems
    /// (a cache down, a record not trusted) go to `warn`, once per cache or entry.
    pub fn query(
        &self,
        nodes: &[&DrvNode],
        warn: &(dyn Fn(String) + Sync),
    ) -> BTreeMap<DrvHash, Offer> {
        let offers = Mutex::new(BTreeMap::new());
        for backend in 0..self.backends.len() {
            let wanted: Vec<&&DrvNode> = {
                let offers = offers.lock().unwrap_or_else(|e| e.into_inner());
                nodes
                    .iter()
                    .filter(|n| !offers.contains_key(&n.hash))
                    .collect()
            };
            let next = Mutex::new(wanted.into_iter());
            std::thread::scope(|scope| {
                for _ in 0..PARALLEL_QUERIES {
                    scope.spawn(|| {
                        loop {
                            if self.is_down(backend) {
                                return;
                            }
                            let Some(node) = next.lock().unwrap_or_else(|e| e.into_inner()).next()
                            else {
                                return;
                            };
                            match self.record(backend, node) {
                                Ok(Some(record)) => {
                                    offers.lock().unwrap_or_else(|e| e.into_inner()).insert(
                                        node.hash,
                                        Offer {
                                            backend,
                                            url: self.url(backend).to_string(),
                                            record,
                                        },
                                    );
                                }
                                Ok(None) => {}
                                Err(SubstituteError::Backend(e)) => {
                                    if self.mark_down(backend) {
                                        warn(format!("{e}; building without it"));
                                    }
                                    return;
                                }
                                Err(e) => warn(format!("{e}; building `{}` instead", node.name)),
                            }
                        }
                    });
                }
            });
        }
        offers.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    fn is_down(&self, backend: usize) -> bool {
        self.down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&backend)
    }

    /// Marks `backend` down; true the first time.
    fn mark_down(&self, backend: usize) -> bool {
        self.down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(backend)
    }

    /// The record cache `backend` has for `node`, checked: trusted, for this derivation,
    /// on this parent. `None` when the cache has none.
    pub fn record(
        &self,
        backend: usize,
        node: &DrvNode,
    ) -> Result<Option<CacheRecord>, SubstituteError> {
        let Some(record) = self.record_by_hash(backend, &node.hash, &node.name)? else {
            return Ok(None);
        };
        if record.parent != node.derivation.parent() {
            return Err(self.wrong_record(backend, &node.name, "it is built on another parent"));
        }
        Ok(Some(record))
    }

    /// The record cache `backend` has for the derivation `hash` (`name` for messages),
    /// checked: trusted, for that derivation, with a disk. `None` when the cache has none.
    /// For entries farm.toml does not describe (a snapshot's), whose derivation the record
    /// itself carries.
    pub fn record_by_hash(
        &self,
        backend: usize,
        hash: &DrvHash,
        name: &str,
    ) -> Result<Option<CacheRecord>, SubstituteError> {
        let Some(bytes) = self.read(backend, &record_path(hash))? else {
            return Ok(None);
        };
        let record = CacheRecord::from_json(&bytes)
            .map_err(|reason| self.wrong_record(backend, name, &reason))?;
        self.check_signed(backend, name, &record.signed_bytes(), &record.signatures)?;
        if record.drv_hash != *hash || hash_of_json(&record.derivation) != *hash {
            return Err(self.wrong_record(backend, name, "its derivation is another one"));
        }
        Ok(Some(record))
    }

    /// The snapshot cache `backend` has under `name`, checked: trusted, of that name.
    /// `None` when the cache has none.
    pub fn snapshot(
        &self,
        backend: usize,
        name: &str,
    ) -> Result<Option<SnapshotRecord>, SubstituteError> {
        let Some(bytes) = self.read(backend, &snapshot_path(name))? else {
            return Ok(None);
        };
        let what = format!("snapshot {name}");
        let snapshot = SnapshotRecord::from_json(&bytes)
            .map_err(|reason| self.wrong_record(backend, &what, &reason))?;
        self.check_signed(
            backend,
            &what,
            &snapshot.signed_bytes(),
            &snapshot.signatures,
        )?;
        if snapshot.name != name {
            return Err(self.wrong_record(backend, &what, "it is another snapshot's"));
        }
        Ok(Some(snapshot))
    }

    /// The whole file at `path` of cache `backend`; `None` when it has none.
    fn read(&self, backend: usize, path: &str) -> Result<Option<Vec<u8>>, SubstituteError> {
        let cache = &self.backends[backend];
        let Some(mut reader) = cache.get(path, 0)? else {
            return Ok(None);
        };
        // One byte more than a record may have: enough for `from_json` to refuse it.
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&mut reader, MAX_RECORD_BYTES as u64 + 1),
            &mut bytes,
        )
        .map_err(|source| BackendError::Io {
            url: cache.url().to_string(),
            path: path.to_string(),
            source,
        })?;
        Ok(Some(bytes))
    }

    fn check_signed(
        &self,
        backend: usize,
        entry: &str,
        bytes: &[u8],
        signatures: &[crate::model::signing::Signature],
    ) -> Result<(), SubstituteError> {
        verify(&self.trusted, bytes, signatures)
            .map(drop)
            .map_err(|reason| SubstituteError::Untrusted {
                url: self.backends[backend].url().to_string(),
                entry: entry.to_string(),
                reason,
            })
    }

    fn wrong_record(&self, backend: usize, entry: &str, reason: &str) -> SubstituteError {
        SubstituteError::WrongRecord {
            url: self.backends[backend].url().to_string(),
            entry: entry.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Refuses `offer` unless its disk backs onto `parent` as this store holds it: the
    /// same directory name (the disk's backing path names it) and the same bytes.
    pub fn check_parent(
        &self,
        offer: &Offer,
        parent: Option<&Entry>,
    ) -> Result<(), SubstituteError> {
        let record = &offer.record;
        if let (Some(theirs), Some(parent)) = (&record.parent_dir, parent)
            && theirs != parent.dir_name()
        {
            return Err(SubstituteError::ParentLabel {
                url: offer.url.clone(),
                entry: record.name.clone(),
                theirs: theirs.clone(),
                ours: parent.dir_name().to_string(),
            });
        }
        if let (Some(theirs), Some(parent)) = (&record.parent_output, parent)
            && *theirs != parent.meta.output_blake3
        {
            return Err(SubstituteError::ParentBytes {
                url: offer.url.clone(),
                entry: record.name.clone(),
                parent: parent.dir_name().to_string(),
            });
        }
        Ok(())
    }

    /// Downloads every file of `offer` into `dir` (a staging directory), each checked
    /// against the record; returns the disk's blake3 and size. The parent is not needed
    /// yet, so a child downloads while its parent is still arriving; check it with
    /// [`Substituters::check_parent`] before committing.
    pub fn fetch(
        &self,
        offer: &Offer,
        dir: &Path,
        on_bytes: &(dyn Fn(u64) + Sync),
    ) -> Result<(ContentHash, u64), SubstituteError> {
        let record = &offer.record;
        let cache = self.backends[offer.backend].as_ref();
        let size: u64 = record.files.values().map(|b| b.size).sum();
        crate::sys::space::ensure(
            dir,
            size,
            &format!("`{}` from `{}`", record.name, offer.url),
        )?;
        // Every file at once: the kernel and initrd arrive while the disk does.
        let results: Vec<_> = std::thread::scope(|scope| {
            let downloads: Vec<_> = record
                .files
                .iter()
                .map(|(file, blob)| {
                    let target = dir.join(file);
                    let handle = scope.spawn(move || download(cache, blob, &target, on_bytes));
                    (file, handle)
                })
                .collect();
            downloads
                .into_iter()
                .map(|(file, handle)| {
                    let result = handle.join().expect("blob downloads do not panic");
                    (file, result)
                })
                .collect()
        });
        for (file, result) in results {
            result.map_err(|source| SubstituteError::Blob {
                url: offer.url.clone(),
                entry: record.name.clone(),
                file: file.clone(),
                source: Box::new(source),
            })?;
        }
        let disk = record.disk().expect("checked when the record was read");
        Ok((disk.blake3, disk.size))
    }
}
