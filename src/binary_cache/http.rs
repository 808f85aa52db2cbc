//! A binary cache on a web server (`http(s)://`): read with GET and HEAD, written with PUT
//! where the server allows it, as nginx's `dav_methods PUT` or any S3-style gateway does.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use super::backend::{Backend, BackendError, Counting, Progress, Timeouts};

pub(super) struct HttpBackend {
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
    pub(super) fn open(url: &str, timeouts: Timeouts) -> Result<HttpBackend, BackendError> {
        let client = reqwest::blocking::Client::builder()
            .user_agent(concat!("farm/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(timeouts.connect)
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .build()
            .map_err(|e| BackendError::Unreachable {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
        Ok(HttpBackend {
            url: url.trim_end_matches('/').to_string(),
            client,
            timeouts,
        })
    }

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
