//! Hashing with the expected algorithm and blake3 in one pass, on other threads.
//!
//! Why a pipeline: sha256/sha512 cost about as much CPU per byte as receiving and writing
//! them, so hashing inline would halve download throughput. Buffers are `Bytes`, so handing a
//! chunk to a hashing thread is a reference-count increment, not a copy.

use std::io::Read;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use bytes::{Bytes, BytesMut};
use indicatif::ProgressBar;

use super::FetchError;
use crate::model::hash::{ContentHash, ExpectedHash, HashAlgo, StreamHasher};

/// Size of the buffers local files are read in: large enough that syscalls and channel
/// hand-offs are noise next to hashing, small enough to stay in L2/L3 cache.
pub(crate) const READ_BUF: usize = 1 << 20;

/// How many chunks may wait for a hashing thread before the producer blocks. Bounded so a
/// slow hasher applies back-pressure instead of buffering a whole image in memory.
const QUEUE_DEPTH: usize = 16;

/// The digests of a byte stream: the one it was declared with and farm's own blake3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHashes {
    pub size: u64,
    pub blake3: ContentHash,
    /// The digest with the algorithm asked for (`None` when none was).
    pub digest: Option<ExpectedHash>,
}

/// The hashers of one stream; `blake3` doubles as the expected digest when `algo` is blake3,
/// so that case costs one hash, not two.
pub(crate) struct DualHasher {
    algo: Option<HashAlgo>,
    len: u64,
    other: Option<StreamHasher>,
    blake3: Box<blake3::Hasher>,
}

impl DualHasher {
    pub(crate) fn new(algo: Option<HashAlgo>) -> Self {
        let other = match algo {
            Some(HashAlgo::Blake3) | None => None,
            Some(a) => Some(StreamHasher::new(a)),
        };
        Self {
            algo,
            len: 0,
            other,
            blake3: Box::new(blake3::Hasher::new()),
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if let Some(o) = &mut self.other {
            o.update(bytes);
        }
        self.blake3.update(bytes);
    }

    pub(crate) fn finish(self) -> FileHashes {
        let blake3 = ContentHash::from_blake3(self.blake3.finalize());
        let digest = match (self.algo, self.other) {
            (_, Some(o)) => Some(o.finish()),
            (Some(HashAlgo::Blake3), None) => Some(ExpectedHash {
                algo: HashAlgo::Blake3,
                digest: blake3.0.to_vec(),
            }),
            (_, None) => None,
        };
        FileHashes {
            size: self.len,
            blake3,
            digest,
        }
    }

    /// Splits into independent halves so two threads can hash the same chunks in parallel.
    fn split(self) -> (Half, Option<Half>) {
        let b3 = Half::Blake3(self.blake3);
        match self.other {
            Some(o) => (Half::Other(o), Some(b3)),
            None => (b3, None),
        }
    }

    fn join(algo: Option<HashAlgo>, len: u64, a: Half, b: Option<Half>) -> Self {
        let mut other = None;
        let mut blake3 = None;
        for half in [Some(a), b].into_iter().flatten() {
            match half {
                Half::Other(o) => other = Some(o),
                Half::Blake3(h) => blake3 = Some(h),
            }
        }
        Self {
            algo,
            len,
            other,
            blake3: blake3.expect("blake3 half is always present"),
        }
    }
}

enum Half {
    Other(StreamHasher),
    Blake3(Box<blake3::Hasher>),
}

impl Half {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Half::Other(o) => o.update(bytes),
            Half::Blake3(h) => {
                h.update(bytes);
            }
        }
    }
}

/// Hashes chunks on background threads while the caller keeps receiving and writing.
///
/// With two algorithms each gets its own thread: sha2 and blake3 are both single-stream
/// bound, and running them side by side keeps hashing off the critical path of the network.
pub(crate) struct HashPipeline {
    algo: Option<HashAlgo>,
    len: u64,
    senders: Vec<SyncSender<Bytes>>,
    workers: Vec<JoinHandle<Half>>,
}

impl HashPipeline {
    pub(crate) fn spawn(hasher: DualHasher) -> Self {
        let algo = hasher.algo;
        let len = hasher.len;
        let (a, b) = hasher.split();
        let mut senders = Vec::new();
        let mut workers = Vec::new();
        for half in [Some(a), b].into_iter().flatten() {
            let (tx, rx) = sync_channel::<Bytes>(QUEUE_DEPTH);
            senders.push(tx);
            workers.push(
                std::thread::Builder::new()
                    .name("farm-hash".into())
                    .spawn(move || hash_worker(half, rx))
                    .expect("spawning a hashing thread"),
            );
        }
        Self {
            algo,
            len,
            senders,
            workers,
        }
    }

    /// Queues a chunk for hashing; blocks only if the hashers are `QUEUE_DEPTH` chunks behind.
    pub(crate) fn send(&mut self, chunk: Bytes) {
        self.len += chunk.len() as u64;
        if let Some((last, rest)) = self.senders.split_last() {
            for tx in rest {
                // A send fails only if the worker panicked; `finish` reports that.
                let _ = tx.send(chunk.clone());
            }
            let _ = last.send(chunk);
        }
    }

    /// Waits for every queued chunk to be hashed and returns the hashers.
    pub(crate) fn finish(self) -> DualHasher {
        drop(self.senders);
        let mut halves = self
            .workers
            .into_iter()
            .map(|w| w.join().expect("hashing thread panicked"));
        let a = halves.next().expect("at least one hashing thread");
        let b = halves.next();
        DualHasher::join(self.algo, self.len, a, b)
    }
}

fn hash_worker(mut half: Half, rx: Receiver<Bytes>) -> Half {
    for chunk in rx {
        half.update(&chunk);
    }
    half
}

/// Feeds `len` bytes of `reader` into `hasher`, reading and hashing on different threads.
pub(crate) fn hash_reader(
    reader: &mut impl Read,
    hasher: DualHasher,
    progress: &ProgressBar,
) -> std::io::Result<DualHasher> {
    let mut pipeline = HashPipeline::spawn(hasher);
    let result = (|| {
        loop {
            let mut buf = BytesMut::zeroed(READ_BUF);
            // Whole buffers, so the hashers always get large, SIMD-friendly chunks.
            let filled = read_full(reader, &mut buf)?;
            if filled == 0 {
                return Ok(());
            }
            buf.truncate(filled);
            progress.inc(filled as u64);
            pipeline.send(buf.freeze());
        }
    })();
    let hasher = pipeline.finish();
    result.map(|()| hasher)
}

/// Reads until `buf` is full or `reader` ends; returns how much it read. Readers chained
/// from parts (a header, a file, a trailer) otherwise return short reads at each seam.
pub fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Hashes what `reader` gives, as [`hash_file`] hashes a file.
pub fn hash_stream(
    reader: &mut impl Read,
    algo: Option<HashAlgo>,
    progress: &ProgressBar,
) -> std::io::Result<FileHashes> {
    Ok(hash_reader(reader, DualHasher::new(algo), progress)?.finish())
}

/// Hashes a local file (a `path = …` image) with blake3 and, if given, `algo`, in one read.
pub fn hash_file(
    path: &Path,
    algo: Option<HashAlgo>,
    progress: &ProgressBar,
) -> Result<FileHashes, FetchError> {
    let mut file = fs_err::File::open(path)?;
    let len = file.metadata()?.len();
    progress.set_length(len);
    progress.set_position(0);
    let hasher = hash_reader(&mut file, DualHasher::new(algo), progress)?;
    Ok(hasher.finish())
}

/// Hashes a local file and checks it against `expected`. Unlike a download, a mismatching
/// file is left alone: it belongs to the user.
pub fn verify_file(
    path: &Path,
    expected: &ExpectedHash,
    progress: &ProgressBar,
) -> Result<FileHashes, FetchError> {
    let hashes = hash_file(path, Some(expected.algo), progress)?;
    let actual = hashes.digest.clone().expect("digest requested");
    if &actual != expected {
        return Err(FetchError::FileHashMismatch {
            path: path.to_path_buf(),
            expected: expected.clone(),
            actual,
        });
    }
    Ok(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn pipeline_matches_one_shot_hashes_for_every_algo() {
        let bytes = data(3 * READ_BUF + 12345);
        for algo in [HashAlgo::Sha256, HashAlgo::Sha512, HashAlgo::Blake3] {
            let mut one = StreamHasher::new(algo);
            one.update(&bytes);
            let mut pipeline = HashPipeline::spawn(DualHasher::new(Some(algo)));
            for chunk in bytes.chunks(100_000) {
                pipeline.send(Bytes::copy_from_slice(chunk));
            }
            let got = pipeline.finish().finish();
            assert_eq!(got.size, bytes.len() as u64);
            assert_eq!(got.blake3, ContentHash::of(&bytes));
            assert_eq!(got.digest, Some(one.finish()), "{algo:?}");
        }
    }

    #[test]
    fn pipeline_can_be_resumed_with_returned_hasher() {
        let bytes = data(500_000);
        let mut p = HashPipeline::spawn(DualHasher::new(Some(HashAlgo::Sha256)));
        p.send(Bytes::copy_from_slice(&bytes[..200_000]));
        let mut h = p.finish();
        assert_eq!(h.len(), 200_000);
        h.update(&bytes[200_000..300_000]);
        let mut p = HashPipeline::spawn(h);
        p.send(Bytes::copy_from_slice(&bytes[300_000..]));
        let got = p.finish().finish();
        assert_eq!(got.blake3, ContentHash::of(&bytes));
    }

    #[test]
    fn hash_file_and_verify_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes = data(2 * READ_BUF + 3);
        fs_err::write(&path, &bytes).unwrap();
        let bar = ProgressBar::hidden();
        let h = hash_file(&path, None, &bar).unwrap();
        assert_eq!(h.digest, None);
        assert_eq!(h.blake3, ContentHash::of(&bytes));
        let mut sha = StreamHasher::new(HashAlgo::Sha512);
        sha.update(&bytes);
        let expected = sha.finish();
        assert_eq!(
            verify_file(&path, &expected, &bar).unwrap().size,
            bytes.len() as u64
        );
        let wrong = ExpectedHash {
            algo: HashAlgo::Sha512,
            digest: vec![0; 64],
        };
        let err = verify_file(&path, &wrong, &bar).unwrap_err().to_string();
        assert!(
            err.contains(&expected.to_hex()) && err.contains(&"00".repeat(64)),
            "{err}"
        );
        assert!(path.exists(), "a user's file is never deleted");
    }
}
