//! Blobs: one entry file, zstd-compressed, named by the blake3 of its uncompressed bytes.

use std::io::{self, Read, Write};
use std::path::Path;

use super::backend::{Backend, BackendError};
use crate::model::build::cache_record::{Blob, blob_path};
use crate::model::hash::ContentHash;
use crate::store::fsutil::start_writeback;

/// zstd's default level: about as fast as a disk reads, a third of a qcow2's size.
const LEVEL: i32 = 3;
/// Bytes handed from the unpacking thread to the hashing and writing one at a time.
const CHUNK: usize = 4 << 20;
/// How much is written before the kernel is asked to start putting it on disk, so the
/// store's fsync at commit has little left to wait for.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// `source` compressed into a temporary file in `scratch`; returns the file, its size and
/// the blake3 of the bytes that went in (so a file that changed since commit is caught).
pub(super) fn compress(
    source: &Path,
    scratch: &Path,
) -> io::Result<(tempfile::NamedTempFile, u64, ContentHash)> {
    let out = tempfile::Builder::new()
        .prefix("blob.")
        .tempfile_in(scratch)?;
    let mut encoder = zstd::stream::write::Encoder::new(
        io::BufWriter::with_capacity(1 << 20, out.as_file()),
        LEVEL,
    )?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    encoder.multithread(threads)?;
    let mut input = fs_err::File::open(source)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        encoder.write_all(&buf[..n])?;
    }
    encoder.finish()?.flush()?;
    let size = out.as_file().metadata()?.len();
    Ok((out, size, ContentHash::from_blake3(hasher.finalize())))
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the cache has no blob {0}")]
    Missing(ContentHash),
    #[error(
        "its bytes are {actual} ({actual_size} bytes), not the {expected} ({expected_size} bytes) its record lists"
    )]
    Mismatch {
        expected: ContentHash,
        expected_size: u64,
        actual: ContentHash,
        actual_size: u64,
    },
    #[error("it cannot be unpacked: {0}")]
    Corrupt(io::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Downloads the blob `blob` into `target`, decompressing and hashing as it arrives;
/// `on_bytes` is told of compressed bytes read. The file is left only if it matches.
pub(super) fn download(
    backend: &dyn Backend,
    blob: &Blob,
    target: &Path,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<(), BlobError> {
    let reader = backend
        .get(&blob_path(&blob.blake3), blob.zstd_size)?
        .ok_or(BlobError::Missing(blob.blake3))?;
    let counted = BorrowedCounting {
        inner: reader,
        on_bytes,
    };
    let mut decoder = zstd::stream::read::Decoder::new(counted).map_err(BlobError::Corrupt)?;
    if let Some(dir) = target.parent() {
        fs_err::create_dir_all(dir)?;
    }
    let mut out = fs_err::File::create(target)?;
    let mut hasher = blake3::Hasher::new();
    // Two stages, so unpacking overlaps hashing and writing: a thread reads and unpacks
    // into chunks, this one hashes and writes them.
    let result = std::thread::scope(|scope| -> Result<(), BlobError> {
        let (chunks, received) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let unpacker = scope.spawn(move || -> Result<(), BlobError> {
            let limit = blob.size;
            let mut unpacked = 0u64;
            loop {
                let mut chunk = vec![0u8; CHUNK];
                let mut filled = 0;
                while filled < CHUNK {
                    let n = decoder
                        .read(&mut chunk[filled..])
                        .map_err(BlobError::Corrupt)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    return Ok(());
                }
                chunk.truncate(filled);
                unpacked += filled as u64;
                if chunks.send(chunk).is_err() || unpacked > limit {
                    return Ok(());
                }
            }
        });
        let (mut written, mut flushed) = (0u64, 0u64);
        for chunk in received {
            hasher.update(&chunk);
            out.write_all(&chunk)?;
            written += chunk.len() as u64;
            if written - flushed >= WRITEBACK_EVERY {
                start_writeback(out.file(), flushed, written - flushed);
                flushed = written;
            }
        }
        unpacker
            .join()
            .expect("the unpacking thread does not panic")?;
        out.flush()?;
        let actual = ContentHash::from_blake3(hasher.finalize());
        if actual != blob.blake3 || hasher.count() != blob.size {
            return Err(BlobError::Mismatch {
                expected: blob.blake3,
                expected_size: blob.size,
                actual,
                actual_size: hasher.count(),
            });
        }
        Ok(())
    });
    if result.is_err() {
        drop(out);
        let _ = fs_err::remove_file(target);
    }
    result
}

struct BorrowedCounting<'a, R> {
    inner: R,
    on_bytes: &'a (dyn Fn(u64) + Sync),
}

impl<R: Read> Read for BorrowedCounting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.on_bytes)(n as u64);
        Ok(n)
    }
}
