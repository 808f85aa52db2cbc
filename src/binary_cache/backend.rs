//! What every binary cache is to farm, whatever carries it: the [`Backend`] trait, its
//! error, progress reporting and timeouts. A leaf: each carrier (`file`, `http`, `s3`, `oci`)
//! implements it here, and `open` chooses one by URL.

use std::io::{self, Read};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("Cache `{url}` cannot be reached: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Cache `{url}` answered {status} for `{path}`")]
    Status {
        url: String,
        path: String,
        status: u16,
    },
    #[error("Cache `{url}`: `{path}`: {source}")]
    Io {
        url: String,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// One cache, whatever carries it. Paths are relative, `/`-separated (`records/….json`).
pub trait Backend: Send + Sync {
    fn url(&self) -> &str;
    /// The object at `path`, or `None` when the cache has none. `bytes` is how big it is
    /// expected to be (0 for small objects): it bounds how long reading it may take.
    fn get(&self, path: &str, bytes: u64) -> Result<Option<Box<dyn Read + Send>>, BackendError>;
    /// The size of the object at `path`, or `None` when the cache has none.
    fn size(&self, path: &str) -> Result<Option<u64>, BackendError>;
    /// Stores `file` at `path`, replacing any object there; readers never see half of it.
    /// `sent` is told of bytes as they go, for progress bars.
    fn put(&self, path: &str, file: &Path, sent: &Progress) -> Result<(), BackendError>;
}

/// Told of bytes as they are sent or received.
pub type Progress = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// A progress that tells nobody.
pub fn no_progress() -> Progress {
    std::sync::Arc::new(|_| {})
}

/// A reader that tells `progress` of every byte read through it.
pub(super) struct Counting<R> {
    pub(super) inner: R,
    pub(super) progress: Progress,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// How long a cache may take to accept a connection, and to send the next byte: a cache
/// that is down or stalled costs this much, then farm builds instead.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(30),
        }
    }
}
