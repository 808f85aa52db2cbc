//! Store archives: entries carried to another machine as one zstd-compressed tar stream.
//!
//! The first member is `farm-export.json`, a manifest naming every entry (parents first)
//! and the blake3 and size of each of its files. Import reads the manifest, then writes
//! each member into a private directory under `tmp/` while hashing it, refuses anything the
//! manifest does not list or whose bytes differ, checks each entry's metadata against its
//! key, and only when the whole archive has been read and found good moves the entries
//! into `store/`. A truncated or tampered archive stores nothing.
//!
//! tar is used because any machine can list or unpack it by hand (`tar --zstd -tf`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::entry::{FileRecord, entry_dir_name, parse_entry_dir_name};
use super::{
    DISK_FILE, Entry, EntryMeta, META_FILE, STORE_DIR, Store, StoreError, TMP_DIR, fsutil,
};
use crate::model::build::derivation::hash_of_json;
use crate::model::hash::ContentHash;
use crate::sys::tar_entry::append_read_only;

/// The manifest's name, first in every archive.
pub const MANIFEST: &str = "farm-export.json";
/// The archive format this farm writes and reads.
pub const ARCHIVE_FORMAT: u32 = 1;
/// zstd level: the default, as `tar --zstd` uses; fast enough to keep up with a disk.
const ZSTD_LEVEL: i32 = 3;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// Parents before children.
    pub entries: Vec<ManifestEntry>,
}

/// The largest manifest an import reads: ~250 bytes per file, so room for thousands of
/// entries, and a member that says it is larger is refused before it is read.
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;

/// Why an archive's manifest is refused, and what to do about it.
pub type Refused = (String, &'static str);

impl Manifest {
    /// Reads an archive's manifest: JSON of this format, every entry a store entry's
    /// name, every file inside its entry. Pure, so any bytes give an answer or an error.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, Refused> {
        const NOT_OURS: &str = "give a file written by `farm store export`";
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err((
                format!("its manifest is larger than {MAX_MANIFEST_BYTES} bytes"),
                NOT_OURS,
            ));
        }
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| {
            (
                format!("its manifest is unreadable: {e}"),
                "give a file written by `farm store export` of this farm version",
            )
        })?;
        if manifest.format != ARCHIVE_FORMAT {
            return Err((
                format!(
                    "it is archive format {}; this farm reads {ARCHIVE_FORMAT}",
                    manifest.format
                ),
                "import it with the farm version that exported it",
            ));
        }
        for entry in &manifest.entries {
            if parse_entry_dir_name(&entry.dir).is_none() {
                return Err((
                    format!(
                        "its manifest lists `{}`, which is not an entry name",
                        entry.dir
                    ),
                    NOT_OURS,
                ));
            }
            if let Some(file) = entry.files.keys().find(|f| !is_plain_relative(f)) {
                return Err((
                    format!(
                        "its manifest lists `{}/{file}`, outside its entry",
                        entry.dir
                    ),
                    NOT_OURS,
                ));
            }
        }
        Ok(manifest)
    }

    /// Every member the archive may hold (`<entry>/<file>`), with what it must be.
    fn expected_members(&self) -> BTreeMap<String, &FileRecord> {
        self.entries
            .iter()
            .flat_map(|entry| {
                entry
                    .files
                    .iter()
                    .map(move |(file, record)| (format!("{}/{file}", entry.dir), record))
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// `<key>-<name>`.
    pub dir: String,
    /// Every file of the entry, `meta.json` and `disk.qcow2` included.
    pub files: BTreeMap<String, FileRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Space(#[from] crate::sys::space::SpaceShort),
    #[error("Cannot read `{path}` as a farm store archive: {reason}\nhint: {hint}")]
    Invalid {
        path: PathBuf,
        reason: String,
        hint: String,
    },
    #[error(
        "Entry `{entry}` changed while it was exported: {reason}\nhint: run `farm store verify`"
    )]
    ChangedDuringExport { entry: String, reason: String },
    #[error("Cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<io::Error> for ArchiveError {
    fn from(e: io::Error) -> Self {
        ArchiveError::Store(StoreError::Io(e))
    }
}

/// What an export or import moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveReport {
    /// Entries written to the archive, or added to the store.
    pub entries: Vec<String>,
    /// On import: entries the store already had (the same key), left as they were.
    pub present: Vec<String>,
    /// Bytes of entry files (uncompressed).
    pub bytes: u64,
}

impl Store {
    /// Writes `entries` (which must include every parent, parents first) to `out` as one
    /// archive. Files are hashed as they are read and must match what was recorded; `out`
    /// appears only when the archive is complete.
    pub fn export(&self, entries: &[Entry], out: &Path) -> Result<ArchiveReport, ArchiveError> {
        let mut manifest = Manifest {
            format: ARCHIVE_FORMAT,
            entries: Vec::new(),
        };
        let mut report = ArchiveReport::default();
        for entry in entries {
            // An entry from an older farm has no record of its boot files: they are hashed
            // now, so the archive carries and checks them all the same.
            let mut files = self.files_of(entry)?;
            let (blake3, size) = fsutil::hash_file(&entry.dir.join(META_FILE))?;
            files.insert(META_FILE.to_string(), FileRecord { blake3, size });
            report.bytes += files.values().map(|f| f.size).sum::<u64>();
            report.entries.push(entry.dir_name().to_string());
            manifest.entries.push(ManifestEntry {
                dir: entry.dir_name().to_string(),
                files,
            });
        }
        let write_error = |source: io::Error| ArchiveError::Write {
            path: out.to_path_buf(),
            source,
        };
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let partial = tempfile::Builder::new()
            .prefix(".farm-export.")
            .tempfile_in(dir)
            .map_err(write_error)?;
        let mut encoder = zstd::stream::write::Encoder::new(
            io::BufWriter::with_capacity(1 << 20, partial.as_file()),
            ZSTD_LEVEL,
        )
        .map_err(write_error)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        encoder.multithread(threads).map_err(write_error)?;
        let mut tar = tar::Builder::new(encoder);
        let manifest_json = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
        append_read_only(
            &mut tar,
            MANIFEST,
            manifest_json.len() as u64,
            &manifest_json[..],
        )
        .map_err(write_error)?;
        for (entry, listed) in entries.iter().zip(&manifest.entries) {
            for (file, record) in &listed.files {
                let source = fs_err::File::open(entry.dir.join(file))?;
                let mut reader = HashingReader::new(source.take(record.size));
                append_read_only(
                    &mut tar,
                    format!("{}/{file}", listed.dir),
                    record.size,
                    &mut reader,
                )
                .map_err(write_error)?;
                let (blake3, size) = reader.finish();
                if blake3 != record.blake3 || size != record.size {
                    return Err(ArchiveError::ChangedDuringExport {
                        entry: listed.dir.clone(),
                        reason: format!("`{file}` is not what was recorded at commit"),
                    });
                }
            }
        }
        let encoder = tar.into_inner().map_err(write_error)?;
        let buffered = encoder.finish().map_err(write_error)?;
        buffered
            .into_inner()
            .map_err(|e| write_error(e.into_error()))?
            .sync_all()
            .map_err(write_error)?;
        partial.persist(out).map_err(|e| write_error(e.error))?;
        Ok(report)
    }

    /// Adds the entries of the archive at `path` to the store, verifying every file first.
    pub fn import(&self, path: &Path) -> Result<ArchiveReport, ArchiveError> {
        let invalid = |reason: String, hint: &str| ArchiveError::Invalid {
            path: path.to_path_buf(),
            reason,
            hint: hint.to_string(),
        };
        let file = fs_err::File::open(path)?;
        let decoder = zstd::stream::read::Decoder::new(file)?;
        let mut archive = tar::Archive::new(decoder);
        let mut members = archive.entries().map_err(|e| {
            invalid(
                format!("it is not a zstd-compressed tar stream: {e}"),
                "give a file written by `farm store export`",
            )
        })?;
        let damaged = |e: io::Error| {
            invalid(
                format!("it ends early or is damaged: {e}"),
                "copy the archive again; nothing was added to the store",
            )
        };

        let manifest: Manifest = {
            let mut first = members
                .next()
                .ok_or_else(|| {
                    invalid(
                        "it is empty".into(),
                        "give a file written by `farm store export`",
                    )
                })?
                .map_err(damaged)?;
            let name = first
                .path()
                .map_err(damaged)?
                .to_string_lossy()
                .into_owned();
            if name != MANIFEST {
                return Err(invalid(
                    format!("its first member is `{name}`, not `{MANIFEST}`"),
                    "give a file written by `farm store export`",
                ));
            }
            let mut bytes = Vec::new();
            (&mut first)
                .take(MAX_MANIFEST_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(damaged)?;
            Manifest::parse(&bytes).map_err(|(reason, hint)| invalid(reason, hint))?
        };
        let expected = manifest.expected_members();
        let total: u64 = expected.values().map(|r| r.size).sum();
        crate::sys::space::ensure(
            &self.root.join(TMP_DIR),
            total,
            &format!("importing `{}`", path.display()),
        )?;

        // Everything is unpacked in a directory of our own under tmp/, removed on any error.
        let scratch = tempfile::Builder::new()
            .prefix("import.")
            .tempdir_in(self.root.join(TMP_DIR))?;
        let mut received = BTreeSet::new();
        let mut report = ArchiveReport::default();
        for member in members {
            let mut member = member.map_err(damaged)?;
            let name = member
                .path()
                .map_err(damaged)?
                .to_string_lossy()
                .into_owned();
            let Some(record) = expected.get(&name) else {
                return Err(invalid(
                    format!("it holds `{name}`, which its manifest does not list"),
                    "the archive was altered; nothing was added to the store",
                ));
            };
            if !member.header().entry_type().is_file() || !received.insert(name.clone()) {
                return Err(invalid(
                    format!("`{name}` is not a single regular file"),
                    "the archive was altered; nothing was added to the store",
                ));
            }
            let target = scratch.path().join(&name);
            fs_err::create_dir_all(target.parent().expect("member paths have an entry dir"))?;
            let mut out = io::BufWriter::with_capacity(1 << 20, fs_err::File::create(&target)?);
            let mut reader = HashingReader::new(&mut member);
            io::copy(&mut reader, &mut out).map_err(damaged)?;
            out.into_inner().map_err(|e| e.into_error())?;
            let (blake3, size) = reader.finish();
            if blake3 != record.blake3 || size != record.size {
                return Err(invalid(
                    format!(
                        "`{name}` is not what its manifest says: {blake3} ({size} bytes), \
                         listed {} ({} bytes)",
                        record.blake3, record.size
                    ),
                    "the archive was altered or damaged; nothing was added to the store",
                ));
            }
            report.bytes += size;
        }
        if let Some(missing) = expected.keys().find(|k| !received.contains(*k)) {
            return Err(invalid(
                format!("it ends before `{missing}`"),
                "copy the archive again; nothing was added to the store",
            ));
        }

        // Each entry's metadata must describe the entry it keys and the files that came.
        let mut incoming = BTreeSet::new();
        let mut staged = Vec::new();
        for listed in &manifest.entries {
            let dir = scratch.path().join(&listed.dir);
            let meta: EntryMeta = serde_json::from_slice(&fs_err::read(dir.join(META_FILE))?)
                .map_err(|e| {
                    invalid(
                        format!("`{}/{META_FILE}` is unreadable: {e}", listed.dir),
                        "the archive was damaged; nothing was added to the store",
                    )
                })?;
            let problem = meta_problem(&meta, listed, &incoming, self);
            if let Some(problem) = problem {
                return Err(invalid(
                    format!("entry `{}`: {problem}", listed.dir),
                    "the archive was altered; nothing was added to the store",
                ));
            }
            incoming.insert(listed.dir.clone());
            staged.push((listed.dir.clone(), meta));
        }

        // A layer only fits the exact bytes it was built on: when this store already has
        // the parent (by key), its disk must be the one in the archive.
        for listed in &manifest.entries {
            let Some((_, meta)) = staged.iter().find(|(dir, _)| *dir == listed.dir) else {
                continue;
            };
            let Some(parent_dir) = &meta.parent else {
                continue;
            };
            let archived_parent = manifest
                .entries
                .iter()
                .find(|e| &e.dir == parent_dir)
                .and_then(|e| e.files.get(DISK_FILE));
            let parent_meta = staged
                .iter()
                .find(|(dir, _)| dir == parent_dir)
                .map(|(_, m)| m);
            let local = parent_meta.and_then(|m| self.lookup(&m.drv_hash, &m.name).ok().flatten());
            if let (Some(archived), Some(local)) = (archived_parent, local)
                && archived.blake3 != local.meta.output_blake3
            {
                return Err(invalid(
                    format!(
                        "entry `{}` is built on other bytes of `{parent_dir}` than this store \
                         holds (it was built separately, and is not bit-reproducible)",
                        listed.dir
                    ),
                    "import into another store (`--store DIR`); nothing was added to this one",
                ));
            }
        }

        // All good: move each entry in, parents first, under its key's lock.
        for (dir_name, meta) in staged {
            let lock = self.lock(&meta.drv_hash)?;
            if self.lookup(&meta.drv_hash, &meta.name)?.is_some() {
                report.present.push(dir_name);
                continue;
            }
            let from = scratch.path().join(&dir_name);
            fsutil::seal_tree(&from)?;
            let to = self.root.join(STORE_DIR).join(&dir_name);
            fs_err::rename(&from, &to)?;
            fsutil::fsync_dir(&self.root.join(STORE_DIR))?;
            fsutil::seal_dir(&to)?;
            drop(lock);
            report.entries.push(dir_name);
        }
        Ok(report)
    }
}

/// What is wrong with an imported entry's metadata, if anything.
fn meta_problem(
    meta: &EntryMeta,
    listed: &ManifestEntry,
    incoming: &BTreeSet<String>,
    store: &Store,
) -> Option<String> {
    if listed.dir != entry_dir_name(&meta.drv_hash, &meta.name) {
        return Some(format!(
            "its metadata describes {} `{}`, which belongs in another directory",
            meta.drv_hash, meta.name
        ));
    }
    if hash_of_json(&meta.derivation) != meta.drv_hash {
        return Some("its derivation does not hash to its key".into());
    }
    if meta.meta_blake3.is_some_and(|h| h != meta.self_hash()) {
        return Some(format!(
            "its `{META_FILE}` does not match its own recorded hash"
        ));
    }
    let disk = &listed.files.get(DISK_FILE)?;
    if disk.blake3 != meta.output_blake3 || disk.size != meta.size {
        return Some(format!(
            "its `{DISK_FILE}` is not the disk its metadata records"
        ));
    }
    for (file, record) in &meta.files {
        if listed.files.get(file) != Some(record) {
            return Some(format!("its `{file}` is not the file its metadata records"));
        }
    }
    let recorded = meta.files.len() + 2;
    if meta.meta_blake3.is_some() && listed.files.len() != recorded {
        return Some("it carries files its metadata does not record".into());
    }
    if let Some(parent) = &meta.parent
        && !incoming.contains(parent)
        && !store.store_dir().join(parent).join(META_FILE).is_file()
    {
        return Some(format!(
            "its parent `{parent}` is neither in the archive nor in this store"
        ));
    }
    None
}

/// `a/b`: no root, no `..`, no `.`.
fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: blake3::Hasher::new(),
        }
    }

    fn finish(&self) -> (ContentHash, u64) {
        (
            ContentHash::from_blake3(self.hasher.finalize()),
            self.hasher.count(),
        )
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
