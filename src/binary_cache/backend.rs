//! Where a binary cache lives: a directory (`file://`) or a web server (`http(s)://`, read
//! with GET and HEAD, written with PUT where the server allows it, as nginx's `dav_methods
//! PUT` or any S3-style gateway does).

use std::io::{self, Read};
use std::path::{Path, PathBuf};
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

/// The backend for `url` (checked by `model::limits::substituter`).
pub fn open(url: &str, timeouts: Timeouts) -> Result<Box<dyn Backend>, BackendError> {
    let unreachable = |reason: String| BackendError::Unreachable {
        url: url.to_string(),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| unreachable(e.to_string()))?;
    match parsed.scheme() {
        "file" => {
            let root = parsed
                .to_file_path()
                .map_err(|()| unreachable("it names no local directory".into()))?;
            Ok(Box::new(FileBackend {
                url: url.to_string(),
                root,
            }))
        }
        "http" | "https" => {
            let client = reqwest::blocking::Client::builder()
                .user_agent(concat!("farm/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(timeouts.connect)
                .no_gzip()
                .no_brotli()
                .no_zstd()
                .no_deflate()
                .build()
                .map_err(|e| unreachable(e.to_string()))?;
            Ok(Box::new(HttpBackend {
                url: url.trim_end_matches('/').to_string(),
                client,
                timeouts,
            }))
        }
        "s3" => Ok(Box::new(super::s3::S3Backend::open(
            url, &parsed, timeouts,
        )?)),
        "oci" => Ok(Box::new(super::oci::OciBackend::open(
            url, &parsed, timeouts,
        )?)),
        scheme => Err(unreachable(format!("`{scheme}` caches are not supported"))),
    }
}

struct FileBackend {
    url: String,
    root: PathBuf,
}

impl FileBackend {
    fn io(&self, path: &str) -> impl Fn(io::Error) -> BackendError + '_ {
        let path = path.to_string();
        move |source| BackendError::Io {
            url: self.url.clone(),
            path: path.clone(),
            source,
        }
    }
}

impl Backend for FileBackend {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, path: &str, _bytes: u64) -> Result<Option<Box<dyn Read + Send>>, BackendError> {
        match fs_err::File::open(self.root.join(path)) {
            Ok(file) => Ok(Some(Box::new(io::BufReader::with_capacity(1 << 20, file)))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.root.is_dir() {
                    Ok(None)
                } else {
                    Err(BackendError::Unreachable {
                        url: self.url.clone(),
                        reason: format!("`{}` is not a directory", self.root.display()),
                    })
                }
            }
            Err(e) => Err(self.io(path)(e)),
        }
    }

    fn size(&self, path: &str) -> Result<Option<u64>, BackendError> {
        match fs_err::metadata(self.root.join(path)) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(path)(e)),
        }
    }

    fn put(&self, path: &str, file: &Path, sent: &Progress) -> Result<(), BackendError> {
        let target = self.root.join(path);
        let dir = target.parent().expect("cache paths have a directory");
        fs_err::create_dir_all(dir).map_err(self.io(path))?;
        // Readable by all, as a file the user copied there would be: a directory cache is
        // often served as is by a web server running as another user. (A temporary file
        // is otherwise private.) Nothing in a cache is secret; records are signed.
        let tmp = tempfile::Builder::new()
            .prefix(".upload.")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .tempfile_in(dir)
            .map_err(self.io(path))?;
        let mut source = Counting {
            inner: fs_err::File::open(file).map_err(self.io(path))?,
            progress: sent.clone(),
        };
        io::copy(&mut source, &mut tmp.as_file()).map_err(self.io(path))?;
        tmp.persist(&target).map_err(|e| self.io(path)(e.error))?;
        Ok(())
    }
}

struct HttpBackend {
    url: String,
    client: reqwest::blocking::Client,
    timeouts: Timeouts,
}

/// The slowest transfer a cache may make before it counts as stalled: the blocking client
/// bounds whole requests, so an object of `bytes` gets `read` plus a second per MiB.
fn request_timeout(timeouts: Timeouts, bytes: u64) -> Duration {
    timeouts.read + Duration::from_secs(bytes >> 20)
}

impl HttpBackend {
    fn object(&self, path: &str) -> String {
        format!("{}/{path}", self.url)
    }

    fn failed(&self, e: reqwest::Error) -> BackendError {
        BackendError::Unreachable {
            url: self.url.clone(),
            reason: crate::model::text::error_chain(&e),
        }
    }

    fn status(&self, path: &str, status: reqwest::StatusCode) -> BackendError {
        BackendError::Status {
            url: self.url.clone(),
            path: path.to_string(),
            status: status.as_u16(),
        }
    }
}

impl Backend for HttpBackend {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, path: &str, bytes: u64) -> Result<Option<Box<dyn Read + Send>>, BackendError> {
        let response = self
            .client
            .get(self.object(path))
            .timeout(request_timeout(self.timeouts, bytes))
            .send()
            .map_err(|e| self.failed(e))?;
        match response.status() {
            s if s.is_success() => Ok(Some(Box::new(response))),
            reqwest::StatusCode::NOT_FOUND | reqwest::StatusCode::FORBIDDEN => Ok(None),
            s => Err(self.status(path, s)),
        }
    }

    fn size(&self, path: &str) -> Result<Option<u64>, BackendError> {
        let response = self
            .client
            .head(self.object(path))
            .timeout(self.timeouts.read)
            .send()
            .map_err(|e| self.failed(e))?;
        match response.status() {
            s if s.is_success() => Ok(Some(response.content_length().unwrap_or(0))),
            reqwest::StatusCode::NOT_FOUND | reqwest::StatusCode::FORBIDDEN => Ok(None),
            s => Err(self.status(path, s)),
        }
    }

    fn put(&self, path: &str, file: &Path, sent: &Progress) -> Result<(), BackendError> {
        let io = |source| BackendError::Io {
            url: self.url.clone(),
            path: path.to_string(),
            source,
        };
        let opened = fs_err::File::open(file).map_err(io)?;
        let len = opened.metadata().map_err(io)?.len();
        let response = self
            .client
            .put(self.object(path))
            .timeout(request_timeout(self.timeouts, len))
            .body(reqwest::blocking::Body::sized(
                Counting {
                    inner: opened.into_parts().0,
                    progress: sent.clone(),
                },
                len,
            ))
            .send()
            .map_err(|e| self.failed(e))?;
        match response.status() {
            s if s.is_success() => Ok(()),
            s => Err(self.status(path, s)),
        }
    }
}
