//! Where a qcow2 chain's guest bytes live, read in-process from each image's L1 and L2
//! tables: what `qemu-img map` says, without a process (an export's map took a twentieth of
//! its time as one).
//!
//! Only what farm's own images use is read: standard clusters, zero clusters and holes that
//! fall through to the image below. A chain that uses anything else (compressed clusters,
//! subclusters, an external data file, encryption) gets `None`, and the caller lets
//! `qemu-img convert` read it. Every offset is checked against the file before it is
//! followed, so a damaged image is an error, never a panic or a read past its end.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::qcow2::{be_u32, be_u64, parse_header};
use crate::model::build::flat_image::MapExtent;

/// Bits 9–55 of an L1 or L2 entry: the offset of the table or cluster it points to.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// An L2 entry's flag: a compressed cluster (its offset field means something else).
const COMPRESSED: u64 = 1 << 62;
/// An L2 entry's flag (version 3): the cluster reads as zeros.
const ZERO: u64 = 1;
/// Incompatible features that change nothing for a reader of standard clusters: the dirty
/// bit (refcounts may be stale) and the compression type (only compressed clusters use it).
const HARMLESS_INCOMPATIBLE: u64 = 0b1001;
/// The largest L1 table read: 32 MiB of entries maps 2 PiB with 64 KiB clusters.
const MAX_L1_BYTES: u64 = 32 << 20;

/// One image of the chain, its tables read as they are needed.
struct Image {
    path: PathBuf,
    file: File,
    len: u64,
    cluster_bits: u32,
    virtual_size: u64,
    l1: Vec<u64>,
    l2: HashMap<u64, Vec<u64>>,
}

enum Cluster {
    /// At this byte of the image's file.
    Data(u64),
    Zero,
    /// Not here: the image below says.
    Below,
}

/// The extents of the chain `images` (top first, each backed by the next), in guest order,
/// neighbours merged; `None` when an image uses what farm does not read here.
pub(crate) fn map_chain(images: &[PathBuf]) -> io::Result<Option<Vec<MapExtent>>> {
    let mut opened = Vec::new();
    for path in images {
        match Image::open(path)? {
            Some(image) => opened.push(image),
            None => return Ok(None),
        }
    }
    let Some(top) = opened.first() else {
        return Ok(Some(Vec::new()));
    };
    let mut extents = Vec::new();
    let size = top.virtual_size;
    if !resolve(&mut opened, 0, 0, size, &mut extents)? {
        return Ok(None);
    }
    Ok(Some(extents))
}

/// Maps guest bytes `start..start+length` from image `depth` down; false when a cluster
/// is one this reader leaves to qemu-img.
fn resolve(
    images: &mut [Image],
    depth: usize,
    start: u64,
    length: u64,
    out: &mut Vec<MapExtent>,
) -> io::Result<bool> {
    let Some(image) = images.get_mut(depth) else {
        return Ok(true);
    };
    // Beyond an image's end, it and everything below read as zeros.
    let end = (start + length).min(image.virtual_size);
    let mut at = start;
    while at < end {
        let image = &mut images[depth];
        let cluster_bytes = 1u64 << image.cluster_bits;
        let run = ((at / cluster_bytes + 1) * cluster_bytes).min(end) - at;
        match image.cluster(at)? {
            None => return Ok(false),
            Some(Cluster::Data(offset)) => push(out, at, run, depth, offset + at % cluster_bytes),
            Some(Cluster::Zero) => {}
            Some(Cluster::Below) => {
                if !resolve(images, depth + 1, at, run, out)? {
                    return Ok(false);
                }
            }
        }
        at += run;
    }
    Ok(true)
}

fn push(out: &mut Vec<MapExtent>, start: u64, length: u64, depth: usize, offset: u64) {
    if let Some(last) = out.last_mut()
        && last.depth == depth
        && last.start + last.length == start
        && last.offset.map(|o| o + last.length) == Some(offset)
    {
        last.length += length;
        return;
    }
    out.push(MapExtent {
        start,
        length,
        depth,
        data: true,
        offset: Some(offset),
    });
}

impl Image {
    /// The image at `path` with its L1 table; `None` when it is not a qcow2 this reader
    /// reads (not qcow2 at all, encrypted, or with features that move its data).
    fn open(path: &Path) -> io::Result<Option<Image>> {
        let damaged = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "`{}` has qcow2 tables farm cannot read: {why}",
                    path.display()
                ),
            )
        };
        let file = fs_err::File::open(path)?.into_parts().0;
        let len = file.metadata()?.len();
        let mut first = vec![0u8; len.min(1 << 21) as usize];
        file.read_exact_at(&mut first, 0)?;
        let Some(info) = parse_header(&first).map_err(damaged)? else {
            return Ok(None);
        };
        let field = |read: Result<u64, String>| read.map_err(damaged);
        let version = field(be_u32(&first, 4).map(u64::from))?;
        let cluster_bits = field(be_u32(&first, 20).map(u64::from))? as u32;
        let encrypted = field(be_u32(&first, 32).map(u64::from))? != 0;
        let l1_size = field(be_u32(&first, 36).map(u64::from))?;
        let l1_offset = field(be_u64(&first, 40))?;
        let incompatible = if version >= 3 {
            field(be_u64(&first, 72))?
        } else {
            0
        };
        if encrypted || incompatible & !HARMLESS_INCOMPATIBLE != 0 {
            return Ok(None);
        }
        let l1_bytes = l1_size * 8;
        if l1_bytes > MAX_L1_BYTES || l1_offset.saturating_add(l1_bytes) > len {
            return Err(damaged(format!(
                "an L1 table of {l1_size} entries at {l1_offset}, in a file of {len} bytes"
            )));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_exact_at(&mut raw, l1_offset)?;
        Ok(Some(Image {
            path: path.to_path_buf(),
            file,
            len,
            cluster_bits,
            virtual_size: info.virtual_size,
            l1: raw
                .chunks_exact(8)
                .map(|e| u64::from_be_bytes(e.try_into().expect("8 bytes")))
                .collect(),
            l2: HashMap::new(),
        }))
    }

    /// What holds guest byte `at`; `None` for a cluster this reader leaves to qemu-img.
    fn cluster(&mut self, at: u64) -> io::Result<Option<Cluster>> {
        let entries = 1u64 << (self.cluster_bits - 3);
        let cluster = at >> self.cluster_bits;
        let Some(&l1_entry) = self.l1.get((cluster / entries) as usize) else {
            return Ok(Some(Cluster::Below));
        };
        let table_at = l1_entry & OFFSET_MASK;
        if table_at == 0 {
            return Ok(Some(Cluster::Below));
        }
        let table = match self.l2.entry(table_at) {
            std::collections::hash_map::Entry::Occupied(t) => t.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let bytes = 1u64 << self.cluster_bits;
                if table_at + bytes > self.len {
                    return Err(self.damaged(format!("an L2 table at {table_at}")));
                }
                let mut raw = vec![0u8; bytes as usize];
                self.file.read_exact_at(&mut raw, table_at)?;
                slot.insert(
                    raw.chunks_exact(8)
                        .map(|e| u64::from_be_bytes(e.try_into().expect("8 bytes")))
                        .collect(),
                )
            }
        };
        let entry = table[(cluster % entries) as usize];
        if entry & COMPRESSED != 0 {
            return Ok(None);
        }
        if entry & ZERO != 0 {
            return Ok(Some(Cluster::Zero));
        }
        match entry & OFFSET_MASK {
            0 => Ok(Some(Cluster::Below)),
            offset if offset + (1 << self.cluster_bits) > self.len => {
                Err(self.damaged(format!("a data cluster at {offset}")))
            }
            offset => Ok(Some(Cluster::Data(offset))),
        }
    }

    fn damaged(&self, what: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "`{}` has {what}, past its end ({} bytes)",
                self.path.display(),
                self.len
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::qcow2::tests::qemu_img;
    use std::process::Command;

    fn qemu_io(image: &Path, command: &str) {
        let status = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", command])
            .arg(image)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("qemu-io (qemu-utils)");
        assert!(status.success(), "qemu-io {command}");
    }

    /// `qemu-img map`'s data extents of `top`, for comparison.
    fn qemu_map(top: &Path) -> Vec<MapExtent> {
        let json = qemu_img(&["map", "--output=json", top.to_str().unwrap()]);
        let all: Vec<MapExtent> = serde_json::from_slice(&json).unwrap();
        all.into_iter().filter(|e| e.data).collect()
    }

    #[test]
    fn a_chain_maps_as_qemu_img_maps_it() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let mid = dir.path().join("mid.qcow2");
        let top = dir.path().join("top.qcow2");
        let path = |p: &Path| p.to_str().unwrap().to_string();
        qemu_img(&["create", "-q", "-f", "qcow2", &path(&base), "8M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            &path(&mid),
            "12M",
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "mid.qcow2",
            &path(&top),
            "16M",
        ]);
        qemu_io(&base, "write -P 1 0 3M");
        qemu_io(&base, "write -P 2 7M 1M");
        qemu_io(&mid, "write -P 3 1M 20k");
        qemu_io(&mid, "write -z 2M 64k");
        qemu_io(&mid, "write -P 4 9M 1M");
        qemu_io(&top, "write -P 5 2500k 100k");
        qemu_io(&top, "write -z 7M 128k");
        qemu_io(&top, "write -P 6 15M 64k");
        let chain = [top.clone(), mid, base];
        let ours = map_chain(&chain).unwrap().expect("all standard clusters");
        assert_eq!(ours, qemu_map(&top));
        assert!(ours.iter().any(|e| e.depth == 2) && ours.iter().any(|e| e.depth == 0));
    }

    #[test]
    fn compressed_clusters_are_left_to_qemu_img_and_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        fs_err::write(&raw, vec![7u8; 1 << 20]).unwrap();
        let packed = dir.path().join("packed.qcow2");
        qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            packed.to_str().unwrap(),
        ]);
        assert_eq!(map_chain(std::slice::from_ref(&packed)).unwrap(), None);
        // Not qcow2 at all: left to qemu-img too.
        assert_eq!(map_chain(std::slice::from_ref(&raw)).unwrap(), None);

        // An L1 entry pointing past the end of the file.
        let plain = dir.path().join("plain.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", plain.to_str().unwrap(), "1M"]);
        qemu_io(&plain, "write -P 1 0 64k");
        let mut bytes = fs_err::read(&plain).unwrap();
        let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
        bytes[l1..l1 + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
        fs_err::write(&plain, &bytes).unwrap();
        let err = map_chain(std::slice::from_ref(&plain)).unwrap_err();
        assert!(err.to_string().contains("past its end"), "{err}");
    }
}
