//! Binary cache records: what a cache says about one derivation's output, signed.
//!
//! A cache (see docs/binary-cache.md) holds `records/<drv-hash>.json` and the entry's files
//! as zstd blobs `blobs/<blake3>.zst`, keyed by the blake3 of their *uncompressed* bytes,
//! so a file two entries share (a kernel) is stored once. Pure: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::hash::{ContentHash, DrvHash};
use crate::model::signing::Signature;

/// The cache format this farm reads and writes (`farm-cache.json` and every record).
pub const CACHE_FORMAT: u32 = 1;
/// The file at a cache's root naming its format.
pub const CACHE_INFO: &str = "farm-cache.json";
/// What signatures cover, before the record's canonical JSON: keeps a record signature
/// from ever being valid for anything else.
const SIGNING_DOMAIN: &[u8] = b"farm binary cache record v1\n";
/// The entry file every record has.
pub const DISK_FILE: &str = "disk.qcow2";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRecord {
    pub format: u32,
    pub drv_hash: DrvHash,
    /// The entry's label where it was pushed (`tiny-amd64`, `web_amd64`).
    pub name: String,
    /// The derivation, as the entry's `meta.json` keeps it: hashes to `drv_hash`.
    pub derivation: serde_json::Value,
    /// The parent's derivation hash, and the directory name the disk's backing file
    /// names (`../<parent_dir>/disk.qcow2`).
    pub parent: Option<DrvHash>,
    pub parent_dir: Option<String>,
    /// The blake3 of the parent's disk this layer was built on: a layer holds only its
    /// differences, so it is only valid on those exact bytes (an `upgrade` rebuilt
    /// elsewhere gives others).
    pub parent_output: Option<ContentHash>,
    /// Every file of the entry but `meta.json` (the receiver writes its own).
    pub files: BTreeMap<String, Blob>,
    #[serde(default)]
    pub signatures: Vec<Signature>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blob {
    /// blake3 of the uncompressed bytes: the blob's name and its check.
    pub blake3: ContentHash,
    pub size: u64,
    /// Size of the compressed blob, for progress bars.
    pub zstd_size: u64,
}

/// The largest record (or snapshot record) farm reads from a cache; real ones are a few
/// KiB. A cache is someone else's bytes: a larger file is refused unread.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// The most files an entry's record may list: a layer has a disk and boot files, but a
/// snapshot's entry has the files of every VM saved with it (17 for the tiny nested lab's).
/// Each is downloaded on its own thread, so a record cannot ask for thousands.
pub const MAX_RECORD_FILES: usize = 1024;
/// The most entries a snapshot record may list (one per VM saved on one machine).
pub const MAX_SNAPSHOT_ENTRIES: usize = 1024;

/// Reads `bytes` as a record of type `T` in this cache format; `Err` says why not.
fn read_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    format_of: impl Fn(&T) -> u32,
) -> Result<T, String> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(format!("it is larger than {MAX_RECORD_BYTES} bytes"));
    }
    let record: T = serde_json::from_slice(bytes).map_err(|e| format!("it is unreadable: {e}"))?;
    match format_of(&record) {
        CACHE_FORMAT => Ok(record),
        other => Err(format!(
            "it is cache format {other}, this farm reads {CACHE_FORMAT}"
        )),
    }
}

impl CacheRecord {
    /// Reads a record a cache sent: JSON of this format, listing a disk and only files
    /// inside the entry. Its signatures and derivation are checked by the caller, which
    /// knows the trusted keys and the hash it asked for. Pure: any bytes give an answer.
    pub fn from_json(bytes: &[u8]) -> Result<CacheRecord, String> {
        let record: CacheRecord = read_json(bytes, |r: &CacheRecord| r.format)?;
        if record.files.len() > MAX_RECORD_FILES {
            return Err(format!(
                "it lists {} files (an entry has at most {MAX_RECORD_FILES})",
                record.files.len()
            ));
        }
        if let Some(file) = record.files.keys().find(|file| {
            file.is_empty()
                || !std::path::Path::new(file)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
        }) {
            return Err(format!("it lists `{file}`, outside the entry"));
        }
        if record.disk().is_none() {
            return Err("it lists no disk".to_string());
        }
        Ok(record)
    }

    /// The bytes signatures sign: a domain string, then the record without its signatures
    /// as canonical JSON (sorted keys, no whitespace).
    pub fn signed_bytes(&self) -> Vec<u8> {
        signed_bytes(SIGNING_DOMAIN, self)
    }

    pub fn disk(&self) -> Option<&Blob> {
        self.files.get(DISK_FILE)
    }

    /// Bytes to download (compressed).
    pub fn download_size(&self) -> u64 {
        self.files.values().map(|b| b.zstd_size).sum()
    }
}

/// What signatures of a snapshot record cover, before its canonical JSON.
const SNAPSHOT_SIGNING_DOMAIN: &[u8] = b"farm binary cache snapshot v1\n";

/// What a cache says a snapshot is (`snapshots/<name>.json`): which entries hold it, so a
/// store that has none of them can ask for them by name (`farm store pull URL converged`).
/// Signed like a record: whoever can write to the cache cannot point a name elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    pub format: u32,
    pub name: String,
    /// When it was saved (seconds since the epoch).
    pub created: u64,
    /// The derivation hashes of its entries (one per VM saved on the machine that pushed
    /// it), each with its own record.
    pub entries: Vec<DrvHash>,
    /// Every VM it holds, those inside hypervisors too: what a store pulls first, as
    /// farm.toml builds them, for the entries to back onto and for `up` to find.
    pub vms: Vec<String>,
    /// The key `up` saved it under, when it is farm's `converged` snapshot: a store that
    /// pulls it finds it current only for the same lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converged_key: Option<String>,
    #[serde(default)]
    pub signatures: Vec<Signature>,
}

impl SnapshotRecord {
    /// Reads a snapshot record a cache sent: JSON of this format, named as snapshots are,
    /// listing a bounded number of entries. Signatures are the caller's to check.
    pub fn from_json(bytes: &[u8]) -> Result<SnapshotRecord, String> {
        let record: SnapshotRecord = read_json(bytes, |r: &SnapshotRecord| r.format)?;
        if record.entries.len() > MAX_SNAPSHOT_ENTRIES {
            return Err(format!(
                "it lists {} entries (at most {MAX_SNAPSHOT_ENTRIES})",
                record.entries.len()
            ));
        }
        if !crate::model::config::limits::is_snapshot_name(&record.name) {
            return Err(format!("its name `{}` is not a snapshot name", record.name));
        }
        Ok(record)
    }

    /// The bytes signatures sign, as for [`CacheRecord::signed_bytes`] under their own domain.
    pub fn signed_bytes(&self) -> Vec<u8> {
        signed_bytes(SNAPSHOT_SIGNING_DOMAIN, self)
    }
}

/// `domain`, then `signed` without its `signatures` as canonical JSON (sorted keys, no
/// whitespace).
fn signed_bytes(domain: &[u8], signed: &impl Serialize) -> Vec<u8> {
    let mut value = serde_json::to_value(signed).expect("records serialize");
    if let serde_json::Value::Object(map) = &mut value {
        map.remove("signatures");
    }
    let mut bytes = domain.to_vec();
    bytes.extend(serde_json::to_vec(&value).expect("JSON values encode"));
    bytes
}

/// Where a snapshot's record lives in a cache (its name is letters, digits, `-`, `_`, `.`).
pub fn snapshot_path(name: &str) -> String {
    format!("snapshots/{name}.json")
}

/// Where a derivation's record lives in a cache.
pub fn record_path(drv: &DrvHash) -> String {
    format!("records/{}.json", drv.to_hex())
}

/// Where a blob lives in a cache.
pub fn blob_path(hash: &ContentHash) -> String {
    format!("blobs/{}.zst", hash.to_hex())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::signing::{SecretKey, verify};

    fn record() -> CacheRecord {
        CacheRecord {
            format: CACHE_FORMAT,
            drv_hash: DrvHash([1; 32]),
            name: "web_amd64".into(),
            derivation: serde_json::json!({"type": "layer"}),
            parent: Some(DrvHash([2; 32])),
            parent_dir: Some("0202-base".into()),
            parent_output: Some(ContentHash([4; 32])),
            files: [(
                DISK_FILE.to_string(),
                Blob {
                    blake3: ContentHash([3; 32]),
                    size: 10,
                    zstd_size: 4,
                },
            )]
            .into(),
            signatures: Vec::new(),
        }
    }

    #[test]
    fn signatures_cover_everything_but_themselves() {
        let key = SecretKey::from_seed("ci", [9; 32]).unwrap();
        let mut signed = record();
        signed.signatures.push(key.sign(&signed.signed_bytes()));
        let trusted = [key.public()];
        assert_eq!(
            verify(&trusted, &signed.signed_bytes(), &signed.signatures),
            Ok("ci")
        );
        let mut altered = signed.clone();
        altered.files.get_mut(DISK_FILE).unwrap().size = 11;
        assert!(verify(&trusted, &altered.signed_bytes(), &altered.signatures).is_err());
        assert_eq!(
            record_path(&signed.drv_hash),
            format!("records/{}.json", "01".repeat(32))
        );
    }

    #[test]
    fn a_snapshot_signature_is_no_record_signature_and_covers_its_entries() {
        let key = SecretKey::from_seed("ci", [9; 32]).unwrap();
        let mut snapshot = SnapshotRecord {
            format: CACHE_FORMAT,
            name: "converged".into(),
            created: 1,
            entries: vec![DrvHash([5; 32])],
            vms: vec!["hv".into()],
            converged_key: Some("k".into()),
            signatures: Vec::new(),
        };
        snapshot.signatures.push(key.sign(&snapshot.signed_bytes()));
        let trusted = [key.public()];
        assert_eq!(
            verify(&trusted, &snapshot.signed_bytes(), &snapshot.signatures),
            Ok("ci")
        );
        let mut moved = snapshot.clone();
        moved.entries = vec![DrvHash([6; 32])];
        assert!(verify(&trusted, &moved.signed_bytes(), &moved.signatures).is_err());
        let mut as_record = record();
        as_record.signatures = snapshot.signatures.clone();
        assert!(verify(&trusted, &as_record.signed_bytes(), &as_record.signatures).is_err());
        assert_eq!(snapshot_path("converged"), "snapshots/converged.json");
    }
}
