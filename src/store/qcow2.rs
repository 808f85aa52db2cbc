//! A qcow2 disk's header, read in-process: its virtual size, backing file and backing
//! format.
//!
//! `commit` uses the backing file to refuse a layer whose backing path would break when the
//! store moves; `verify` follows backing chains; `farm up` refuses a `disk_size` smaller than
//! the layer. Reading the first cluster is far cheaper than running `qemu-img info`, and
//! keeps these checks free of a process.
//!
//! The header is parsed here rather than by a qcow2 crate: `verify` reads disks it is asked
//! to judge (damaged ones, or ones a hypervisor VM sent), so every field is checked against
//! the bytes there are before it is used, and any bytes give an answer or an error, never a
//! panic (`fuzz` target `qcow2_header`).

use std::io::{self, Read};
use std::path::Path;

const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Bytes of a version 2 header; version 3 headers say their length at byte 100.
const V2_HEADER_LEN: usize = 72;
/// Bytes of the fixed header every version has, plus room for the version 3 fields.
const FIXED_HEADER_LEN: usize = 104;
/// qemu's cluster sizes: 512 bytes to 2 MiB. The header, its extensions and the backing
/// file's name lie in the first cluster.
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
/// qemu refuses longer backing file names.
const MAX_BACKING_NAME: u32 = 1023;
/// The header extension that names the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// What the header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Qcow2Info {
    /// The size of the disk a guest sees.
    pub virtual_size: u64,
    /// The backing file as recorded (relative names are relative to the image's directory).
    pub backing: Option<String>,
    /// The backing file's format, when the header records it (qemu requires it since 6.1).
    pub backing_format: Option<String>,
}

/// The header of `path`, or `None` if it is not a qcow2 image at all.
pub(crate) fn read_info(path: &Path) -> io::Result<Option<Qcow2Info>> {
    let file = fs_err::File::open(path)?;
    let max_cluster = 1u64 << CLUSTER_BITS.end();
    let mut first = Vec::new();
    file.take(max_cluster).read_to_end(&mut first)?;
    parse_header(&first).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "`{}` has a qcow2 header farm cannot read: {e}",
                path.display()
            ),
        )
    })
}

/// The header in `bytes`, the start of a file (its first 2 MiB, or all of a shorter one):
/// `Ok(None)` when it is not qcow2 at all, `Err` saying what is wrong with a damaged one.
pub(crate) fn parse_header(bytes: &[u8]) -> Result<Option<Qcow2Info>, String> {
    if bytes.len() < V2_HEADER_LEN || bytes[..4] != MAGIC {
        return Ok(None);
    }
    let version = be_u32(bytes, 4)?;
    if !(2..=3).contains(&version) {
        return Err(format!("version {version} (farm reads 2 and 3)"));
    }
    let cluster_bits = be_u32(bytes, 20)?;
    if !CLUSTER_BITS.contains(&cluster_bits) {
        return Err(format!(
            "cluster_bits {cluster_bits} (qcow2 clusters are 2^9 to 2^21 bytes)"
        ));
    }
    // Everything below lies in the first cluster, and in the bytes the file has.
    let first = &bytes[..bytes.len().min(1 << cluster_bits)];
    let header_len = match version {
        2 => V2_HEADER_LEN,
        _ => {
            let len = be_u32(first, 100)? as usize;
            if len < FIXED_HEADER_LEN || !len.is_multiple_of(8) {
                return Err(format!("header_length {len}"));
            }
            len
        }
    };
    let backing = match be_u64(first, 8)? {
        0 => None,
        offset => {
            let size = be_u32(first, 16)?;
            if size > MAX_BACKING_NAME {
                return Err(format!("a backing file name of {size} bytes"));
            }
            let name = usize::try_from(offset)
                .ok()
                .and_then(|start| first.get(start..start.checked_add(size as usize)?))
                .ok_or_else(|| {
                    format!("a backing file name at {offset}, past the first cluster")
                })?;
            Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| "a backing file name that is not UTF-8".to_string())?,
            )
        }
    };
    Ok(Some(Qcow2Info {
        virtual_size: be_u64(first, 24)?,
        backing,
        backing_format: backing_format(first, header_len)?,
    }))
}

/// The backing format named among the header extensions, which start at `offset`, each a
/// type, a length and data padded to 8 bytes, up to an end marker (type 0).
fn backing_format(first: &[u8], mut offset: usize) -> Result<Option<String>, String> {
    let mut format = None;
    loop {
        let kind = be_u32(first, offset)?;
        if kind == 0 {
            return Ok(format);
        }
        let len = be_u32(first, offset + 4)? as usize;
        let data = first
            .get(offset + 8..)
            .and_then(|rest| rest.get(..len))
            .ok_or_else(|| format!("a header extension at {offset} past the first cluster"))?;
        if kind == EXT_BACKING_FORMAT {
            format = Some(
                String::from_utf8(data.to_vec())
                    .map_err(|_| "a backing format that is not UTF-8".to_string())?,
            );
        }
        offset += 8 + len.next_multiple_of(8);
    }
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], String> {
    at.checked_add(N)
        .and_then(|end| bytes.get(at..end))
        .map(|b| b.try_into().expect("N bytes"))
        .ok_or_else(|| format!("a header cut short at byte {at}"))
}

pub(super) fn be_u32(bytes: &[u8], at: usize) -> Result<u32, String> {
    field(bytes, at).map(u32::from_be_bytes)
}

pub(super) fn be_u64(bytes: &[u8], at: usize) -> Result<u64, String> {
    field(bytes, at).map(u64::from_be_bytes)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    /// Runs `qemu-img` and returns what it printed; a failure fails the test.
    pub(in crate::store) fn qemu_img(args: &[&str]) -> Vec<u8> {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img (scripts/setup.sh installs it)");
        assert!(out.status.success(), "qemu-img {args:?}");
        out.stdout
    }

    /// `base.qcow2` of `base_size` in `dir`, and `child.qcow2` of `child_size` on it.
    fn base_and_child(dir: &Path, base_size: &str, child_size: &str) -> (PathBuf, PathBuf) {
        let base = dir.join("base.qcow2");
        let child = dir.join("child.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            base.to_str().unwrap(),
            base_size,
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            child.to_str().unwrap(),
            child_size,
        ]);
        (base, child)
    }

    #[test]
    fn reads_size_backing_name_and_format_that_qemu_img_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let (base, child) = base_and_child(dir.path(), "96M", "128M");
        assert_eq!(
            read_info(&base).unwrap(),
            Some(Qcow2Info {
                virtual_size: 96 << 20,
                backing: None,
                backing_format: None,
            })
        );
        assert_eq!(
            read_info(&child).unwrap(),
            Some(Qcow2Info {
                virtual_size: 128 << 20,
                backing: Some("base.qcow2".into()),
                backing_format: Some("qcow2".into()),
            })
        );
    }

    #[test]
    fn other_files_are_not_qcow2_and_a_damaged_header_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        fs_err::write(&path, b"raw").unwrap();
        assert_eq!(read_info(&path).unwrap(), None);
        fs_err::write(&path, [0u8; 4096]).unwrap();
        assert_eq!(read_info(&path).unwrap(), None);
        qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "16M"]);
        let mut bytes = fs_err::read(&path).unwrap();
        bytes[20..24].copy_from_slice(&40u32.to_be_bytes()); // a 1 TiB cluster
        fs_err::write(&path, &bytes).unwrap();
        let err = read_info(&path).unwrap_err();
        assert!(err.to_string().contains("qcow2 header"), "{err}");
        // The case: byte 23 set to 0 (`cluster_bits` 0) once made `verify` panic.
        bytes[20..24].copy_from_slice(&16u32.to_be_bytes());
        bytes[23] = 0;
        fs_err::write(&path, &bytes).unwrap();
        let err = read_info(&path).unwrap_err();
        assert!(err.to_string().contains("cluster_bits 0"), "{err}");
    }

    #[test]
    fn every_truncation_of_a_real_header_is_an_answer_or_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_, child) = base_and_child(dir.path(), "1M", "1M");
        let bytes = fs_err::read(&child).unwrap();
        let whole = parse_header(&bytes).unwrap().unwrap();
        assert_eq!(whole.backing.as_deref(), Some("base.qcow2"));
        for len in 0..1024.min(bytes.len()) {
            // Cut anywhere, the header is refused, not-qcow2, or read the same.
            if let Ok(Some(info)) = parse_header(&bytes[..len]) {
                assert_eq!(info, whole, "cut at {len}");
            }
        }
    }
}
