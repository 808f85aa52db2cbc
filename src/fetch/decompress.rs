//! Turning a downloaded, compressed image into the disk image the store keeps.
//!
//! The format is read from the file's magic bytes rather than trusted from the URL, because
//! mirrors rename files and some serve `.img` that is really `.xz`. Output is hashed with
//! blake3 as it is written, so the store learns the content hash without reading it back.

use std::cell::Cell;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;

use indicatif::ProgressBar;

use super::FetchError;
use super::hashing::READ_BUF;
use crate::model::hash::ContentHash;

/// How a downloaded file is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Xz,
    Gzip,
    Zstd,
    Bzip2,
}

impl Compression {
    /// Longest magic number checked by [`Compression::from_magic`].
    pub const MAGIC_LEN: usize = 6;

    /// Recognises a format from the first bytes of a file; `None` if no known magic matches.
    pub fn from_magic(head: &[u8]) -> Option<Self> {
        const TABLE: [(&[u8], Compression); 4] = [
            (&[0xFD, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (&[0x1F, 0x8B], Compression::Gzip),
            (&[0x28, 0xB5, 0x2F, 0xFD], Compression::Zstd),
            (b"BZh", Compression::Bzip2),
        ];
        TABLE
            .iter()
            .find(|(magic, _)| head.starts_with(magic))
            .map(|&(_, c)| c)
    }

    /// Guesses from a URL or file name (query and fragment ignored); the fallback when the
    /// magic bytes say nothing.
    pub fn from_suffix(name: &str) -> Self {
        let name = name.split(['?', '#']).next().unwrap_or(name);
        let lower = name.to_ascii_lowercase();
        [
            (".xz", Compression::Xz),
            (".txz", Compression::Xz),
            (".gz", Compression::Gzip),
            (".tgz", Compression::Gzip),
            (".zst", Compression::Zstd),
            (".zstd", Compression::Zstd),
            (".bz2", Compression::Bzip2),
        ]
        .iter()
        .find(|(suffix, _)| lower.ends_with(suffix))
        .map_or(Compression::None, |&(_, c)| c)
    }

    /// Detects the compression of the file at `path` by its magic bytes, falling back to the
    /// suffix of `name` (the URL it came from, or its file name).
    pub fn detect(path: &Path, name: &str) -> io::Result<Self> {
        let mut head = [0u8; Self::MAGIC_LEN];
        let mut file = fs_err::File::open(path)?;
        let mut filled = 0;
        while filled < head.len() {
            match file.read(&mut head[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(Self::from_magic(&head[..filled]).unwrap_or_else(|| Self::from_suffix(name)))
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Xz => "xz",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Counts compressed bytes consumed, so the bar shows progress through the input (the only
/// size known in advance).
/// It also notes whether reading the input itself failed, to tell a disk error (already
/// naming its path) from a corrupt stream.
struct Counting<'a, R> {
    inner: R,
    progress: &'a ProgressBar,
    failed: &'a Cell<bool>,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted {
                self.failed.set(true);
            }
        })?;
        self.progress.inc(n as u64);
        Ok(n)
    }
}

/// Decompresses `src` into `dest` (created or truncated), streaming; returns the size and
/// blake3 of the OUTPUT. `Compression::None` copies, for callers that want one code path;
/// a caller that can simply rename should use [`super::hash_file`] instead.
pub fn decompress(
    src: &Path,
    compression: Compression,
    dest: &Path,
    progress: &ProgressBar,
) -> Result<(u64, ContentHash), FetchError> {
    let input = fs_err::File::open(src)?;
    progress.set_length(input.metadata()?.len());
    progress.set_position(0);
    let input_failed = Cell::new(false);
    let input = Counting {
        inner: input,
        progress,
        failed: &input_failed,
    };
    let mut reader: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(input),
        // Multi-stream decoders: `xz -T`, `pigz` and `pbzip2` write concatenated streams.
        Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(input)),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(input)?),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(input)),
    };
    let mut output = fs_err::File::create(dest)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; READ_BUF];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(if input_failed.get() {
                    FetchError::Io(source)
                } else {
                    FetchError::Decompress {
                        path: src.to_path_buf(),
                        compression,
                        source,
                    }
                });
            }
        };
        output.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    output.flush()?;
    Ok((total, ContentHash::from_blake3(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_bytes_win_over_suffix() {
        assert_eq!(
            Compression::from_magic(&[0xFD, b'7', b'z', b'X', b'Z', 0]),
            Some(Compression::Xz)
        );
        assert_eq!(
            Compression::from_magic(&[0x1F, 0x8B, 8]),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_magic(&[0x28, 0xB5, 0x2F, 0xFD, 0]),
            Some(Compression::Zstd)
        );
        assert_eq!(
            Compression::from_magic(b"BZh91AY"),
            Some(Compression::Bzip2)
        );
        assert_eq!(Compression::from_magic(b"QFI\xfb\0\0"), None);
        assert_eq!(Compression::from_magic(b""), None);
    }

    #[test]
    fn suffix_fallback_ignores_query_and_case() {
        assert_eq!(
            Compression::from_suffix("https://x/a.raw.XZ?x=1"),
            Compression::Xz
        );
        assert_eq!(Compression::from_suffix("a.img.gz"), Compression::Gzip);
        assert_eq!(Compression::from_suffix("a.zst#frag"), Compression::Zstd);
        assert_eq!(Compression::from_suffix("a.bz2"), Compression::Bzip2);
        assert_eq!(Compression::from_suffix("a.qcow2"), Compression::None);
    }

    #[test]
    fn corrupt_input_is_a_decompress_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("bad.xz");
        fs_err::write(&src, b"\xFD7zXZ\0 definitely not xz").unwrap();
        let err = decompress(
            &src,
            Compression::Xz,
            &dir.path().join("out"),
            &ProgressBar::hidden(),
        )
        .unwrap_err();
        assert!(matches!(err, FetchError::Decompress { .. }), "{err:?}");
        assert!(err.to_string().contains("bad.xz"), "{err}");
    }
}
