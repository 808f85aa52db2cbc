//! A standalone disk (qcow2 or raw, no backing file) laid out in full before its first
//! byte is written: `farm image export` writes a flattened chain with it in one forward
//! pass, hashing each byte as it goes, where `qemu-img convert` rewrites a qcow2's tables at
//! the end and its output must then be read a second time to be hashed (issue 32's
//! benchmark).
//!
//! Where the chain's bytes are comes from the chain's tables (`store::qcow2_map`, which
//! says what `qemu-img map` says: a [`MapExtent`] per run of clusters, which image of the
//! chain holds it, at which offset of that file). From those
//! a layout is a pure function. A raw disk is the guest's bytes, zeros left as holes. A
//! qcow2 is the header, the refcount table and blocks, the L1 table, the L2 tables, then
//! every data cluster in guest order. The same chain gives the same bytes on any machine.
//!
//! The qcow2 is version 3 with 64 KiB clusters and 16-bit refcounts, qemu's defaults,
//! and a 104-byte header (zlib compression type implied; no cluster is compressed). A
//! cluster the chain has allocated stays allocated, zeros and all, as `qemu-img convert -S
//! 0` would keep it; what the chain reads as zeros is left unallocated.

use serde::Deserialize;

pub const CLUSTER_BITS: u32 = 16;
/// Bytes per cluster.
pub const CLUSTER: u64 = 1 << CLUSTER_BITS;
const MAGIC: u32 = 0x5146_49fb;
const VERSION: u32 = 3;
const HEADER_LENGTH: u32 = 104;
/// 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;
const L2_ENTRIES: u64 = CLUSTER / 8;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
/// An L1 or L2 entry's flag: the cluster it points to has refcount 1 (writable in place).
const COPIED: u64 = 1 << 63;

/// One run of a chain's map, as `qemu-img map --output=json` writes it: guest bytes `start..start+length`, held by the
/// image `depth` levels below the top (with `data`) at byte `offset` of its file, or read
/// as zeros (without). A compressed run has data and no offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct MapExtent {
    pub start: u64,
    pub length: u64,
    pub depth: usize,
    pub data: bool,
    #[serde(default)]
    pub offset: Option<u64>,
}

/// Guest bytes `start..start+length` and the file bytes they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub length: u64,
    pub from: Source,
}

/// Byte `offset` of the `file`th source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    pub file: usize,
    pub offset: u64,
}

/// What the file is, front to back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Tables and the header, made here.
    Bytes(Vec<u8>),
    /// Bytes of a source file.
    Copy {
        file: usize,
        offset: u64,
        length: u64,
    },
    /// Zeros inside an allocated cluster (or after a source's end within one).
    Zeros(u64),
}

impl Segment {
    pub fn len(&self) -> u64 {
        match self {
            Segment::Bytes(bytes) => bytes.len() as u64,
            Segment::Copy { length, .. } => *length,
            Segment::Zeros(length) => *length,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A disk file's whole content, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatImage {
    pub segments: Vec<Segment>,
    /// The file's size: the sum of the segments'.
    pub file_bytes: u64,
    pub virtual_size: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "the chain's map has a compressed run at guest byte {start}, which cannot be copied as it is"
    )]
    Compressed { start: u64 },
    #[error("the chain's map names image {depth} below the top, and the chain has {images}")]
    NoSuchImage { depth: usize, images: usize },
    #[error("guest bytes at {start} are mapped twice, or out of order")]
    Overlap { start: u64 },
    #[error("guest bytes at {start} are beyond the disk's {virtual_size} bytes")]
    BeyondEnd { start: u64, virtual_size: u64 },
}

/// The pieces `extents` (a chain of `images` files, top first) put at guest byte `shift`
/// onwards, their files numbered from `first_file`. Runs read as zeros are left out.
pub fn pieces_from_map(
    extents: &[MapExtent],
    images: usize,
    shift: u64,
    first_file: usize,
) -> Result<Vec<Piece>, LayoutError> {
    extents
        .iter()
        .filter(|e| e.data && e.length > 0)
        .map(|e| {
            let offset = e.offset.ok_or(LayoutError::Compressed { start: e.start })?;
            if e.depth >= images {
                return Err(LayoutError::NoSuchImage {
                    depth: e.depth,
                    images,
                });
            }
            Ok(Piece {
                start: shift + e.start,
                length: e.length,
                from: Source {
                    file: first_file + e.depth,
                    offset,
                },
            })
        })
        .collect()
}

/// Refuses `pieces` unless they are in guest order, none overlapping, within the disk.
fn check_pieces(virtual_size: u64, pieces: &[Piece]) -> Result<(), LayoutError> {
    let mut end = 0;
    for piece in pieces.iter().filter(|p| p.length > 0) {
        if piece.start < end {
            return Err(LayoutError::Overlap { start: piece.start });
        }
        end = piece.start + piece.length;
        if end > virtual_size {
            return Err(LayoutError::BeyondEnd {
                start: piece.start,
                virtual_size,
            });
        }
    }
    Ok(())
}

/// Lays out a raw disk of `virtual_size` bytes holding `pieces` (in guest order, none
/// overlapping): the guest's bytes, every other one a zero.
pub fn raw(virtual_size: u64, pieces: &[Piece]) -> Result<FlatImage, LayoutError> {
    check_pieces(virtual_size, pieces)?;
    let mut data = DataWriter::default();
    let mut at = 0;
    for piece in pieces.iter().filter(|p| p.length > 0) {
        data.zeros(piece.start - at);
        data.copy(piece.from.file, piece.from.offset, piece.length);
        at = piece.start + piece.length;
    }
    data.zeros(virtual_size - at);
    Ok(FlatImage {
        segments: data.segments,
        file_bytes: virtual_size,
        virtual_size,
    })
}

/// Lays out a qcow2 of `virtual_size` bytes holding `pieces` (in guest order, none
/// overlapping); every other byte reads as zero.
pub fn qcow2(virtual_size: u64, pieces: &[Piece]) -> Result<FlatImage, LayoutError> {
    check_pieces(virtual_size, pieces)?;
    let allocated = allocated_clusters(pieces);
    let mut tables: Vec<u64> = allocated.iter().map(|c| c / L2_ENTRIES).collect();
    tables.dedup();

    let guest_clusters = virtual_size.div_ceil(CLUSTER);
    let l1_size = guest_clusters.div_ceil(L2_ENTRIES);
    let l1_clusters = (l1_size * 8).div_ceil(CLUSTER).max(1);
    let fixed = 1 + l1_clusters + tables.len() as u64 + allocated.len() as u64;
    let (refcount_table, refcount_blocks) = refcount_clusters(fixed);

    // Cluster numbers of each part, in file order.
    let refcount_table_at = 1;
    let blocks_at = refcount_table_at + refcount_table;
    let l1_at = blocks_at + refcount_blocks;
    let tables_at = l1_at + l1_clusters;
    let data_at = tables_at + tables.len() as u64;
    let total = data_at + allocated.len() as u64;

    let mut segments = vec![Segment::Bytes(header(
        virtual_size,
        l1_size,
        l1_at * CLUSTER,
        refcount_table,
    ))];

    let mut table = zeroed(refcount_table);
    for block in 0..refcount_blocks {
        put_u64(&mut table, block as usize, (blocks_at + block) * CLUSTER);
    }
    segments.push(Segment::Bytes(table));

    let mut blocks = zeroed(refcount_blocks);
    for cluster in 0..total as usize {
        blocks[cluster * 2..cluster * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    segments.push(Segment::Bytes(blocks));

    let mut l1 = zeroed(l1_clusters);
    for (i, index) in tables.iter().enumerate() {
        put_u64(
            &mut l1,
            *index as usize,
            ((tables_at + i as u64) * CLUSTER) | COPIED,
        );
    }
    segments.push(Segment::Bytes(l1));

    let mut l2 = zeroed(tables.len() as u64);
    for (i, cluster) in allocated.iter().enumerate() {
        let table = tables
            .binary_search(&(cluster / L2_ENTRIES))
            .expect("every allocated cluster's table is listed");
        let entry = table * L2_ENTRIES as usize + (cluster % L2_ENTRIES) as usize;
        put_u64(&mut l2, entry, ((data_at + i as u64) * CLUSTER) | COPIED);
    }
    segments.push(Segment::Bytes(l2));

    let mut data = DataWriter::default();
    let mut next = pieces.iter().filter(|p| p.length > 0).peekable();
    for cluster in &allocated {
        let (from, to) = (cluster * CLUSTER, (cluster + 1) * CLUSTER);
        let mut at = from;
        // Pieces that end in this cluster are used up; one that runs on stays for the next.
        while let Some(piece) = next.peek() {
            let piece_end = piece.start + piece.length;
            if piece.start >= to {
                break;
            }
            let (start, stop) = (piece.start.max(from), piece_end.min(to));
            data.zeros(start - at);
            data.copy(
                piece.from.file,
                piece.from.offset + (start - piece.start),
                stop - start,
            );
            at = stop;
            if piece_end <= to {
                next.next();
            } else {
                break;
            }
        }
        data.zeros(to - at);
    }
    segments.extend(data.segments);
    segments.retain(|s| !s.is_empty());
    let file_bytes = segments.iter().map(Segment::len).sum();
    debug_assert_eq!(file_bytes, total * CLUSTER);
    Ok(FlatImage {
        segments,
        file_bytes,
        virtual_size,
    })
}

/// The guest clusters any piece touches, ascending.
fn allocated_clusters(pieces: &[Piece]) -> Vec<u64> {
    let mut clusters: Vec<u64> = Vec::new();
    for piece in pieces.iter().filter(|p| p.length > 0) {
        let first = piece.start / CLUSTER;
        let last = (piece.start + piece.length - 1) / CLUSTER;
        let from = match clusters.last() {
            Some(&seen) if seen >= first => seen + 1,
            _ => first,
        };
        clusters.extend(from..=last);
    }
    clusters
}

/// How many clusters the refcount table and its blocks take, beside `others` clusters:
/// the blocks count themselves and the table too, so this is a fixed point.
fn refcount_clusters(others: u64) -> (u64, u64) {
    let (mut table, mut blocks) = (1, 1);
    loop {
        let total = others + table + blocks;
        let need_blocks = total.div_ceil(REFCOUNTS_PER_BLOCK).max(blocks);
        let need_table = (need_blocks * 8).div_ceil(CLUSTER).max(table);
        if (need_table, need_blocks) == (table, blocks) {
            return (table, blocks);
        }
        (table, blocks) = (need_table, need_blocks);
    }
}

/// Cluster 0: the header, then zeros (an empty header extension list ends at the first
/// zero type).
fn header(virtual_size: u64, l1_size: u64, l1_offset: u64, refcount_table: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(CLUSTER as usize);
    h.extend(MAGIC.to_be_bytes());
    h.extend(VERSION.to_be_bytes());
    h.extend(0u64.to_be_bytes()); // backing file offset
    h.extend(0u32.to_be_bytes()); // backing file size
    h.extend(CLUSTER_BITS.to_be_bytes());
    h.extend(virtual_size.to_be_bytes());
    h.extend(0u32.to_be_bytes()); // no encryption
    h.extend((l1_size as u32).to_be_bytes());
    h.extend(l1_offset.to_be_bytes());
    h.extend(CLUSTER.to_be_bytes()); // the refcount table, at cluster 1
    h.extend((refcount_table as u32).to_be_bytes());
    h.extend(0u32.to_be_bytes()); // snapshots
    h.extend(0u64.to_be_bytes()); // snapshot table offset
    h.extend(0u64.to_be_bytes()); // incompatible features
    h.extend(0u64.to_be_bytes()); // compatible features
    h.extend(0u64.to_be_bytes()); // autoclear features
    h.extend(REFCOUNT_ORDER.to_be_bytes());
    h.extend(HEADER_LENGTH.to_be_bytes());
    debug_assert_eq!(h.len(), HEADER_LENGTH as usize);
    h.resize(CLUSTER as usize, 0);
    h
}

fn zeroed(clusters: u64) -> Vec<u8> {
    vec![0; (clusters * CLUSTER) as usize]
}

fn put_u64(table: &mut [u8], index: usize, value: u64) {
    table[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes());
}

/// The data clusters' segments, neighbours merged: a run of clusters that is one run of a
/// source file is one copy.
#[derive(Default)]
struct DataWriter {
    segments: Vec<Segment>,
}

impl DataWriter {
    fn copy(&mut self, file: usize, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        if let Some(Segment::Copy {
            file: f,
            offset: o,
            length: l,
        }) = self.segments.last_mut()
            && *f == file
            && *o + *l == offset
        {
            *l += length;
            return;
        }
        self.segments.push(Segment::Copy {
            file,
            offset,
            length,
        });
    }

    fn zeros(&mut self, length: u64) {
        if length == 0 {
            return;
        }
        if let Some(Segment::Zeros(l)) = self.segments.last_mut() {
            *l += length;
            return;
        }
        self.segments.push(Segment::Zeros(length));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(start: u64, length: u64, file: usize, offset: u64) -> Piece {
        Piece {
            start,
            length,
            from: Source { file, offset },
        }
    }

    fn be_u64(bytes: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    fn be_u32(bytes: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn bytes(segment: &Segment) -> &[u8] {
        match segment {
            Segment::Bytes(b) => b,
            other => panic!("not bytes: {other:?}"),
        }
    }

    #[test]
    fn an_empty_disk_is_its_tables_alone() {
        let flat = qcow2(8 << 30, &[]).unwrap();
        // Header, refcount table, one refcount block, L1; no L2, no data.
        assert_eq!(flat.file_bytes, 4 * CLUSTER);
        let header = bytes(&flat.segments[0]);
        assert_eq!(&header[..4], b"QFI\xfb");
        assert_eq!(be_u32(header, 4), 3);
        assert_eq!(be_u32(header, 20), 16);
        assert_eq!(be_u64(header, 24), 8 << 30);
        assert_eq!(be_u32(header, 36), 16, "8 GiB is 16 L2 tables of 512 MiB");
        assert_eq!(be_u64(header, 40), 3 * CLUSTER, "L1");
        assert_eq!(be_u64(header, 48), CLUSTER, "refcount table");
        assert_eq!(be_u32(header, 96), 4);
        assert_eq!(be_u32(header, 100), 104);
        let table = bytes(&flat.segments[1]);
        assert_eq!(be_u64(table, 0), 2 * CLUSTER);
        let block = bytes(&flat.segments[2]);
        assert_eq!(&block[..10], &[0, 1, 0, 1, 0, 1, 0, 1, 0, 0]);
    }

    #[test]
    fn data_clusters_follow_the_tables_in_guest_order_and_runs_merge() {
        // 1.5 clusters from file 0 at guest 0, then one cluster of file 1 past the first
        // L2 table's reach (512 MiB).
        let far = 600 << 20;
        let pieces = [
            piece(0, CLUSTER + CLUSTER / 2, 0, 4096),
            piece(far, CLUSTER, 1, 0),
        ];
        let flat = qcow2(1 << 30, &pieces).unwrap();
        // Header, refcount table, block, L1, two L2s, three data clusters.
        assert_eq!(flat.file_bytes, 9 * CLUSTER);
        let l1 = bytes(&flat.segments[3]);
        assert_eq!(be_u64(l1, 0), (4 * CLUSTER) | COPIED);
        assert_eq!(be_u64(l1, 8), (5 * CLUSTER) | COPIED);
        let l2 = bytes(&flat.segments[4]);
        assert_eq!(l2.len() as u64, 2 * CLUSTER);
        assert_eq!(be_u64(l2, 0), (6 * CLUSTER) | COPIED);
        assert_eq!(be_u64(l2, 8), (7 * CLUSTER) | COPIED);
        let second = CLUSTER as usize + ((far / CLUSTER) % L2_ENTRIES) as usize * 8;
        assert_eq!(be_u64(l2, second), (8 * CLUSTER) | COPIED);
        let refcounts = bytes(&flat.segments[2]);
        assert_eq!(
            refcounts[..18].chunks(2).filter(|c| c == &[0, 1]).count(),
            9
        );
        assert_eq!(&refcounts[18..20], &[0, 0]);
        assert_eq!(
            &flat.segments[5..],
            &[
                Segment::Copy {
                    file: 0,
                    offset: 4096,
                    length: CLUSTER + CLUSTER / 2
                },
                Segment::Zeros(CLUSTER / 2),
                Segment::Copy {
                    file: 1,
                    offset: 0,
                    length: CLUSTER
                },
            ]
        );
    }

    #[test]
    fn a_cluster_made_of_several_pieces_is_copied_piece_by_piece() {
        // Sources with 4 KiB granularity: one output cluster from two files and a gap.
        let pieces = [piece(0, 4096, 0, 0), piece(8192, 4096, 1, 8192)];
        let flat = qcow2(CLUSTER, &pieces).unwrap();
        assert_eq!(
            &flat.segments[5..],
            &[
                Segment::Copy {
                    file: 0,
                    offset: 0,
                    length: 4096
                },
                Segment::Zeros(4096),
                Segment::Copy {
                    file: 1,
                    offset: 8192,
                    length: 4096
                },
                Segment::Zeros(CLUSTER - 3 * 4096),
            ]
        );
    }

    #[test]
    fn a_raw_disk_is_the_guest_bytes_with_zeros_between() {
        let pieces = [
            piece(4096, 100, 0, 7),
            piece(4196, 50, 0, 107),
            piece(8192, 1, 1, 0),
        ];
        let flat = raw(3 * 4096, &pieces).unwrap();
        assert_eq!(flat.file_bytes, 3 * 4096);
        assert_eq!(
            flat.segments,
            [
                Segment::Zeros(4096),
                Segment::Copy {
                    file: 0,
                    offset: 7,
                    length: 150
                },
                Segment::Zeros(4096 - 150),
                Segment::Copy {
                    file: 1,
                    offset: 0,
                    length: 1
                },
                Segment::Zeros(4095),
            ]
        );
        assert_eq!(
            raw(4096, &[piece(4000, 100, 0, 0)]),
            Err(LayoutError::BeyondEnd {
                start: 4000,
                virtual_size: 4096
            })
        );
    }

    #[test]
    fn refcounts_grow_a_block_and_the_table_when_they_must() {
        assert_eq!(refcount_clusters(10), (1, 1));
        // 32768 refcounts fit a block: one more cluster needs a second.
        assert_eq!(refcount_clusters(REFCOUNTS_PER_BLOCK - 2), (1, 1));
        assert_eq!(refcount_clusters(REFCOUNTS_PER_BLOCK - 1), (1, 2));
        // 8192 blocks fit the table's first cluster.
        let (table, blocks) = refcount_clusters(8192 * REFCOUNTS_PER_BLOCK);
        assert_eq!((table, blocks), (2, 8193));
    }

    #[test]
    fn bad_maps_are_refused() {
        let compressed = MapExtent {
            start: 65536,
            length: 65536,
            depth: 0,
            data: true,
            offset: None,
        };
        assert_eq!(
            pieces_from_map(&[compressed], 1, 0, 0),
            Err(LayoutError::Compressed { start: 65536 })
        );
        let deep = MapExtent {
            offset: Some(0),
            depth: 2,
            ..compressed
        };
        assert_eq!(
            pieces_from_map(&[deep], 2, 0, 0),
            Err(LayoutError::NoSuchImage {
                depth: 2,
                images: 2
            })
        );
        let zero = MapExtent {
            data: false,
            ..compressed
        };
        assert_eq!(
            pieces_from_map(&[zero, deep], 3, 1 << 20, 1),
            Ok(vec![piece((1 << 20) + 65536, 65536, 3, 0)])
        );
        assert_eq!(
            qcow2(CLUSTER, &[piece(0, 2 * CLUSTER, 0, 0)]),
            Err(LayoutError::BeyondEnd {
                start: 0,
                virtual_size: CLUSTER
            })
        );
        assert_eq!(
            qcow2(4 * CLUSTER, &[piece(CLUSTER, 10, 0, 0), piece(0, 10, 0, 0)]),
            Err(LayoutError::Overlap { start: 0 })
        );
    }
}
