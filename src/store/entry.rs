//! Finished store entries, their `meta.json`, and the names they live under.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::hash::{ContentHash, DrvHash, STORE_KEY_HEX_LEN};

/// File names inside an entry directory. Fixed so that any tool (qemu, rsync, a human) finds
/// the same things in every entry; the disk's is the model's, which cache records name too.
pub use crate::model::build::cache_record::DISK_FILE;
pub const BOOT_DIR: &str = "boot";
pub const META_FILE: &str = "meta.json";

/// The longest entry name accepted: `<key>-<name>.<pid>.<random>` must stay well under the
/// 255-byte file name limit of common filesystems.
pub const MAX_NAME_LEN: usize = 160;

/// What farm records about an entry, next to its disk, in `meta.json`.
///
/// It is written last, inside the staging directory, so an entry in `store/` always has one.
/// It answers "what is this and where did it come from" without opening the disk image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryMeta {
    /// The store layout this entry was written under; `commit` sets it.
    pub layout: u32,
    /// The image or platform name; also the directory name suffix.
    pub name: String,
    /// The full derivation hash; the directory name carries only its prefix.
    pub drv_hash: DrvHash,
    /// The derivation as the model encodes it, kept so `farm show` and humans can see what
    /// produced this entry without the farm.toml that did.
    pub derivation: serde_json::Value,
    /// blake3 of `disk.qcow2`, for `farm store verify`.
    pub output_blake3: ContentHash,
    /// Size of `disk.qcow2` in bytes (the file, not the virtual disk size).
    pub size: u64,
    /// Directory name of the parent entry whose disk backs this one, if any.
    pub parent: Option<String>,
    pub built_at_unix: u64,
    pub build_seconds: f64,
    /// The disk's modification time when it was committed (ns since the epoch): a disk
    /// that differs is re-hashed before it is used. Absent in entries of older farms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mtime_ns: Option<i128>,
    /// Every other file of the entry (boot files), by path relative to the entry: what
    /// `farm store verify` checks them against. `commit` fills it; entries of older farms
    /// have none recorded, and only their disk can be checked.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, FileRecord>,
    /// blake3 of this `meta.json` as written with this field absent: a flipped byte in the
    /// metadata itself is found like one in the disk. `commit` sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_blake3: Option<ContentHash>,
}

/// A file's recorded content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub blake3: ContentHash,
    pub size: u64,
}

impl EntryMeta {
    /// The metadata of an entry made now, its work begun at `started`: what `commit`
    /// fills (layout, files, its own hash) left for it.
    pub fn made_now(
        name: String,
        drv_hash: DrvHash,
        derivation: serde_json::Value,
        (output_blake3, size): (ContentHash, u64),
        parent: Option<String>,
        started: std::time::Instant,
    ) -> EntryMeta {
        EntryMeta {
            layout: 0,
            name,
            drv_hash,
            derivation,
            output_blake3,
            size,
            parent,
            built_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            build_seconds: started.elapsed().as_secs_f64(),
            disk_mtime_ns: None,
            files: Default::default(),
            meta_blake3: None,
        }
    }

    /// The bytes of `meta.json`: pretty JSON and a newline.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("entry metadata serializes");
        json.push(b'\n');
        json
    }

    /// What `meta_blake3` must be: the hash of the metadata written without it.
    pub(crate) fn self_hash(&self) -> ContentHash {
        let bare = EntryMeta {
            meta_blake3: None,
            ..self.clone()
        };
        ContentHash::from_blake3(blake3::hash(&bare.to_json()))
    }
}

/// A finished, immutable entry in `store/`.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub dir: PathBuf,
    pub meta: EntryMeta,
}

impl Entry {
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join(DISK_FILE)
    }

    /// The size of the disk a guest on this layer sees, from its qcow2 header.
    pub fn virtual_size(&self) -> std::io::Result<Option<u64>> {
        Ok(super::qcow2::read_info(&self.disk_path())?.map(|info| info.virtual_size))
    }

    /// The kernel/initrd/cmdline directory for direct kernel boot, if this entry has one.
    pub fn boot_dir(&self) -> Option<PathBuf> {
        let dir = self.dir.join(BOOT_DIR);
        dir.is_dir().then_some(dir)
    }

    /// `<key>-<name>`: what a child's `meta.parent` and backing path refer to.
    pub fn dir_name(&self) -> &str {
        self.dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }
}

/// The backing path a child layer records for `parent`: relative, `../<parent-dir>/disk.qcow2`,
/// so the whole store can be moved or copied and every chain still resolves.
///
/// It resolves only once the child sits in `store/`: build the child against the parent's
/// absolute path and `qemu_img::rebase_unsafe` to this before `Store::commit`.
pub fn relative_backing(parent: &Entry) -> PathBuf {
    relative_backing_for(parent.dir_name())
}

pub(crate) fn relative_backing_for(parent_dir_name: &str) -> PathBuf {
    Path::new("..").join(parent_dir_name).join(DISK_FILE)
}

/// `<key>-<name>`.
pub fn entry_dir_name(key: &DrvHash, name: &str) -> String {
    format!("{}-{name}", key.store_key())
}

/// Whether `name` may be used in entry directory names: `[A-Za-z0-9._-]+`, not starting with
/// a dot (so entries are never hidden files) and not too long.
pub(crate) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Splits `<key>-<name>` into the 32-hex key and the name, if it has that shape.
pub(crate) fn parse_entry_dir_name(dir_name: &str) -> Option<(&str, &str)> {
    let (key, name) = dir_name.split_at_checked(STORE_KEY_HEX_LEN)?;
    let name = name.strip_prefix('-')?;
    let key_ok = key
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (key_ok && is_valid_name(name)).then_some((key, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `meta_blake3` is checked by re-serialising the parsed metadata, so every value must
    /// come back bit for bit: without serde_json's `float_roundtrip` about one build time in
    /// ten (this one among them) parsed a ULP off, and a sound entry looked damaged.
    #[test]
    fn metadata_hash_survives_a_round_trip_through_json() {
        let mut meta = EntryMeta {
            layout: 1,
            name: "tiny-amd64".into(),
            drv_hash: DrvHash([7; 32]),
            derivation: serde_json::json!({"kind": "image", "ratio": 0.1 + 0.2}),
            output_blake3: ContentHash::from_blake3(blake3::hash(b"disk")),
            size: 4096,
            parent: None,
            built_at_unix: 1_700_000_000,
            build_seconds: 15.570079557007801,
            disk_mtime_ns: Some(1_700_000_000_123_456_789),
            files: BTreeMap::new(),
            meta_blake3: None,
        };
        meta.meta_blake3 = Some(meta.self_hash());
        let parsed: EntryMeta = serde_json::from_slice(&meta.to_json()).unwrap();
        assert_eq!(parsed.build_seconds.to_bits(), meta.build_seconds.to_bits());
        assert_eq!(parsed.self_hash(), meta.meta_blake3.unwrap());
    }

    #[test]
    fn names_are_restricted_to_safe_characters() {
        for ok in ["debian-bookworm", "debian_vs", "a", "v1.2", "X-9_y.z"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "", ".", "..", ".hidden", "a/b", "a b", "é", "a\0", "x:y", "../x",
        ] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        assert!(is_valid_name(&"n".repeat(MAX_NAME_LEN)));
        assert!(!is_valid_name(&"n".repeat(MAX_NAME_LEN + 1)));
    }

    #[test]
    fn entry_dir_names_round_trip() {
        let key = DrvHash([0x5a; 32]);
        let dir = entry_dir_name(&key, "debian_vs");
        assert_eq!(dir, format!("{}-debian_vs", "5a".repeat(16)));
        assert_eq!(
            parse_entry_dir_name(&dir),
            Some((key.store_key().as_str(), "debian_vs"))
        );
    }

    #[test]
    fn entry_dir_name_parsing_rejects_other_shapes() {
        let key = "0123456789abcdef0123456789abcdef";
        assert!(parse_entry_dir_name(&format!("{key}-x")).is_some());
        assert_eq!(parse_entry_dir_name(&format!("{key}x")), None);
        assert_eq!(parse_entry_dir_name(&format!("{key}-")), None);
        assert_eq!(
            parse_entry_dir_name(&format!("{}-x", key.to_uppercase())),
            None
        );
        assert_eq!(parse_entry_dir_name("short-x"), None);
        assert_eq!(parse_entry_dir_name("é"), None);
    }

    #[test]
    fn relative_backing_points_at_sibling_entry() {
        assert_eq!(
            relative_backing_for("abc-base"),
            PathBuf::from("../abc-base/disk.qcow2")
        );
    }
}
