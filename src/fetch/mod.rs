//! Getting image bytes from outside into the store: HTTP downloads that are streamed, hashed
//! as they arrive, resumable and verified; decompression; hashing of local files.
//!
//! The store owns where files live: callers hand [`download`] the path of a `.part` file in
//! the store's `tmp/` and rename the verified result into place. This module never decides
//! store layout, reads the environment, or retries beyond the `attempts` it is given.
//!
//! Every byte that is kept is hashed exactly once while it is written (the expected algorithm
//! and blake3 together), so verifying costs no second read of a multi-GiB image.

mod decompress;
mod download;
mod hashing;
mod partial;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use decompress::{Compression, decompress};
pub use download::{DEFAULT_STALL_TIMEOUT, Downloaded, download};
pub(crate) use hashing::DualHasher;
pub use hashing::{FileHashes, hash_file, hash_stream, read_full, verify_file};

use crate::model::hash::ExpectedHash;

/// What to download, and where its bytes go while they arrive.
#[derive(Clone, Copy)]
pub struct Download<'a> {
    pub url: &'a str,
    pub expected: &'a ExpectedHash,
    /// The resumable `.part` file, owned by the caller's store. A sidecar `<partial>.json`
    /// beside it remembers the server's validators (ETag, Last-Modified) for `If-Range`.
    pub partial: &'a Path,
    /// HTTP requests allowed in this call (at least one); each resumes where the last stopped.
    pub attempts: u32,
    /// How long a connection may go without sending a byte before it counts as stalled
    /// (and is retried): `--fetch-timeout`.
    pub stall_timeout: Duration,
    /// Where retries, resumes and stalls are told, one line each: a progress bar cannot
    /// show them off a terminal.
    pub say: &'a (dyn Fn(&str) + Sync),
}

/// Everything that can go wrong while fetching, decompressing or hashing an input.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "`{url}` is not a URL farm can download: {detail}\nhint: use an `http://` or `https://` URL, or `path = …` for a local file"
    )]
    InvalidUrl { url: String, detail: String },

    #[error(
        "Could not connect to `{url}`: connection refused\nhint: check that the server is running and that the host and port in the URL are right"
    )]
    ConnectionRefused { url: String },

    #[error(
        "Could not download `{url}`: {detail}\nhint: check the network connection and the URL, then run again; a partial download is resumed"
    )]
    Transport { url: String, detail: String },

    #[error("Download of `{url}` failed: the server answered HTTP {status} {reason}\nhint: {hint}")]
    Status {
        url: String,
        status: u16,
        reason: String,
        hint: &'static str,
    },

    #[error(
        "Download of `{url}` was cut off after {received} bytes: {detail}\nhint: run again to resume from the partial file"
    )]
    Interrupted {
        url: String,
        received: u64,
        detail: String,
    },

    #[error(
        "`{url}` sent nothing for {seconds} s (after {received} bytes): the server accepted the connection but stopped sending\nhint: run again later (the partial download is resumed), or allow more silence with `--fetch-timeout SECONDS`"
    )]
    Stalled {
        url: String,
        seconds: u64,
        received: u64,
    },

    #[error(
        "The disk holding `{}` is full after {written} bytes of `{url}`; {}\nhint: free space there (or point `--store` at a larger disk) and run again",
        path.display(),
        if *removed { "the partial download was removed" } else { "the partial download could not be removed" }
    )]
    DiskFull {
        url: String,
        path: PathBuf,
        written: u64,
        removed: bool,
    },

    #[error(
        "Hash mismatch for `{url}`:\n  expected {expected}\n  actual   {actual}\nThe downloaded file was deleted.\nhint: if the image changed upstream on purpose, update its hash in farm.toml"
    )]
    HashMismatch {
        url: String,
        expected: ExpectedHash,
        actual: ExpectedHash,
    },

    #[error(
        "Hash mismatch for `{path}`:\n  expected {expected}\n  actual   {actual}\nhint: if the file changed on purpose, update its hash in farm.toml"
    )]
    FileHashMismatch {
        path: PathBuf,
        expected: ExpectedHash,
        actual: ExpectedHash,
    },

    #[error(
        "Could not decompress `{path}` as {compression}: {source}\nhint: the file may be truncated or not really {compression}"
    )]
    Decompress {
        path: PathBuf,
        compression: Compression,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Space(#[from] crate::sys::space::SpaceShort),

    #[error("Could not set up the HTTP client: {detail}")]
    Client { detail: String },

    /// Local I/O; `fs_err` already puts the path in the message.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl FetchError {
    /// Whether another attempt could succeed: network trouble and server overload, not a
    /// missing file, a full disk or a wrong hash.
    pub fn is_retryable(&self) -> bool {
        match self {
            FetchError::ConnectionRefused { .. }
            | FetchError::Transport { .. }
            | FetchError::Stalled { .. }
            | FetchError::Interrupted { .. } => true,
            FetchError::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }
}
