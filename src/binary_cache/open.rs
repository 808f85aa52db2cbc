//! The cache a URL names: its scheme chooses the carrier (`file`, `http(s)`, `s3`, `oci`).

use super::backend::{Backend, BackendError, Timeouts};
use super::file::FileBackend;
use super::http::HttpBackend;
use super::oci::OciBackend;
use super::s3::S3Backend;

/// The backend for `url` (checked by `model::limits::substituter`).
pub fn open(url: &str, timeouts: Timeouts) -> Result<Box<dyn Backend>, BackendError> {
    let unreachable = |reason: String| BackendError::Unreachable {
        url: url.to_string(),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| unreachable(e.to_string()))?;
    match parsed.scheme() {
        "file" => Ok(Box::new(FileBackend::open(url, &parsed)?)),
        "http" | "https" => Ok(Box::new(HttpBackend::open(url, timeouts)?)),
        "s3" => Ok(Box::new(S3Backend::open(url, &parsed, timeouts)?)),
        "oci" => Ok(Box::new(OciBackend::open(url, &parsed, timeouts)?)),
        scheme => Err(unreachable(format!("`{scheme}` caches are not supported"))),
    }
}
