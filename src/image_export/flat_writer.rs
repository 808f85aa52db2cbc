//! Writes a [`FlatImage`] front to back and hashes it on the way: one thread copies the
//! source files' runs into the output with `copy_file_range` (the kernel copies page to
//! page, nothing passes through farm), while another hashes the same runs from the sources
//! mapped into memory. The checksum costs no second read of the output, and neither thread
//! waits for the other.
//!
//! The hash is of the bytes the layout says the file holds; the writer puts exactly those
//! bytes there, or fails.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::fetch::{DualHasher, FileHashes};
use crate::model::build::flat_image::{FlatImage, Segment};
use crate::model::hash::HashAlgo;

/// Zeros hashed per call, and copied per `copy_file_range` call at most (the kernel takes
/// large copies in pieces anyway; this keeps the progress bar moving).
const CHUNK: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FlatWriteError {
    #[error("Cannot read `{}`: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("`{}` is {len} bytes, and the chain's map reads bytes up to {wanted} of it", path.display())]
    Short {
        path: PathBuf,
        len: u64,
        wanted: u64,
    },
    #[error("Cannot write `{}`: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// Writes `flat` to `out` (created; it must not exist), reading the `sources` its segments
/// name; returns the file's hashes (blake3, and `algo` when it is another), or `None`
/// without an `algo` (a disk that goes into an archive, which is hashed instead).
pub fn write(
    flat: &FlatImage,
    sources: &[PathBuf],
    out: &Path,
    algo: Option<HashAlgo>,
    progress: &indicatif::ProgressBar,
) -> Result<Option<FileHashes>, FlatWriteError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FlatWriteError::Read { path, source }
    };
    let files: Vec<File> = sources
        .iter()
        .map(|path| {
            fs_err::File::open(path)
                .map(|f| f.into_parts().0)
                .map_err(read_error(path))
        })
        .collect::<Result<_, _>>()?;
    // Every run is checked against its file before a byte is written.
    let lens: Vec<u64> = files
        .iter()
        .zip(sources)
        .map(|(file, path)| file.metadata().map(|m| m.len()).map_err(read_error(path)))
        .collect::<Result<_, _>>()?;
    for segment in &flat.segments {
        if let Segment::Copy {
            file,
            offset,
            length,
        } = segment
            && offset + length > lens[*file]
        {
            return Err(FlatWriteError::Short {
                path: sources[*file].clone(),
                len: lens[*file],
                wanted: offset + length,
            });
        }
    }
    // Mapped on the hashing thread, so the copy starts at once, with every page faulted in
    // by the one call (`populate`): measured, a tenth faster than faulting them in as the
    // hash reads them.
    // SAFETY: the sources are store files (sealed read-only), the kernel and initrd beside
    // them, and the export's own loader; nothing truncates them while the export runs, and
    // every run was checked in bounds above.
    let map_all = || -> Result<Vec<memmap2::Mmap>, FlatWriteError> {
        files
            .iter()
            .zip(sources)
            .map(|(file, path)| {
                unsafe { memmap2::MmapOptions::new().populate().map(file) }
                    .map_err(read_error(path))
            })
            .collect()
    };
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|source| FlatWriteError::Write {
            path: out.to_path_buf(),
            source,
        })?;
    progress.set_length(flat.file_bytes);
    progress.set_position(0);
    let (written, hashes) = std::thread::scope(|scope| {
        let hashing =
            algo.map(|algo| scope.spawn(move || map_all().map(|maps| hash(flat, &maps, algo))));
        let written = copy_all(flat, &files, &output, progress);
        let hashes = hashing
            .map(|h| h.join().expect("hashing does not panic"))
            .transpose();
        (written, hashes)
    });
    written
        .and_then(|()| output.set_len(flat.file_bytes))
        .map_err(|source| FlatWriteError::Write {
            path: out.to_path_buf(),
            source,
        })?;
    hashes
}

fn hash(flat: &FlatImage, maps: &[memmap2::Mmap], algo: HashAlgo) -> FileHashes {
    let mut hasher = DualHasher::new(Some(algo));
    let zeros = vec![0u8; CHUNK as usize];
    for segment in &flat.segments {
        match segment {
            Segment::Bytes(bytes) => hasher.update(bytes),
            Segment::Copy {
                file,
                offset,
                length,
            } => hasher.update(&maps[*file][*offset as usize..(*offset + *length) as usize]),
            Segment::Zeros(length) => {
                let mut left = *length;
                while left > 0 {
                    let n = left.min(CHUNK);
                    hasher.update(&zeros[..n as usize]);
                    left -= n;
                }
            }
        }
    }
    hasher.finish()
}

/// Writes every segment at its place, in order, on one thread; zeros are left as holes
/// (`set_len` ends the file). One writer is the fastest: writes to one file take its inode
/// lock in turn, and the other core is hashing (measured: two writers are 5% slower).
fn copy_all(
    flat: &FlatImage,
    files: &[File],
    output: &File,
    progress: &indicatif::ProgressBar,
) -> io::Result<()> {
    let mut at = 0u64;
    for segment in &flat.segments {
        match segment {
            Segment::Bytes(bytes) => {
                output.write_all_at(bytes, at)?;
                progress.inc(segment.len());
            }
            Segment::Copy {
                file,
                offset,
                length,
            } => copy_range(&files[*file], *offset, output, at, *length, progress)?,
            Segment::Zeros(length) => progress.inc(*length),
        }
        at += segment.len();
    }
    Ok(())
}

/// `length` bytes of `from` at `offset` to `to` at `at`: in the kernel when it can,
/// through a buffer when the two files' filesystems cannot (`EXDEV`, `EINVAL`, `ENOSYS`).
fn copy_range(
    from: &File,
    mut offset: u64,
    to: &File,
    mut at: u64,
    mut length: u64,
    progress: &indicatif::ProgressBar,
) -> io::Result<()> {
    while length > 0 {
        let want = length.min(CHUNK) as usize;
        let (mut off_in, mut off_out) = (offset as libc::loff_t, at as libc::loff_t);
        // SAFETY: both descriptors are open files and the offsets are plain integers the
        // kernel reads and advances.
        let copied = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        let copied = match copied {
            n if n > 0 => n as u64,
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "a source ended before its run",
                ));
            }
            _ => {
                let error = io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                        let mut buffer = vec![0u8; want];
                        from.read_exact_at(&mut buffer, offset)?;
                        to.write_all_at(&buffer, at)?;
                        want as u64
                    }
                    Some(libc::EINTR) => continue,
                    _ => return Err(error),
                }
            }
        };
        offset += copied;
        at += copied;
        length -= copied;
        progress.inc(copied);
    }
    Ok(())
}
