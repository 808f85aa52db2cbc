//! HTTP downloads into a resumable `.part` file, hashed as they arrive.
//!
//! Shape of one call: re-hash whatever the `.part` file already holds (it may come from a
//! crashed run), then up to `attempts` HTTP requests, each asking only for the missing tail
//! (`Range: bytes=N-`), then verification. The network is read on a current-thread tokio
//! runtime (reqwest's async `chunk()` hands over hyper's buffers without copying them),
//! each chunk is written to the file on this thread and passed to hashing threads, so
//! receiving, writing and hashing overlap.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, HeaderMap, IF_RANGE, RANGE};

use super::decompress::Compression;
use super::hashing::HashPipeline;
use super::partial::{Fetched, Partial, remove_if_exists, sidecar_path};
use super::{Download, FetchError};
use crate::model::hash::ContentHash;
use crate::model::text::error_chain;

/// How long a connection may stay silent before it counts as stalled, unless told.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A complete download whose hash matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downloaded {
    /// The `.part` file given in [`Download::partial`], now complete and verified.
    pub path: PathBuf,
    pub size: u64,
    /// Of the bytes as downloaded (before any decompression).
    pub blake3: ContentHash,
    /// Detected from the magic bytes, falling back to the URL's suffix.
    pub compression: Compression,
}

/// How long connecting may take. Whole downloads have no time limit (a multi-GiB image on
/// a slow link is not an error); silence does (`Download::stall_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Downloads `req.url` into `req.partial`, resuming what is there, and verifies it against
/// `req.expected`.
///
/// On a hash mismatch the `.part` file is deleted so a bad download never lingers; if the
/// mismatching bytes were partly resumed (a stale `.part` from a file that has since changed
/// upstream), it downloads once more from scratch before giving up. On other errors the
/// `.part` file is kept, so the next call resumes.
pub fn download(req: &Download<'_>, progress: &ProgressBar) -> Result<Downloaded, FetchError> {
    let parsed = reqwest::Url::parse(req.url).map_err(|e| FetchError::InvalidUrl {
        url: req.url.to_string(),
        detail: e.to_string(),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(FetchError::InvalidUrl {
            url: req.url.to_string(),
            detail: format!("the `{}` scheme is not supported", parsed.scheme()),
        });
    }
    // `block_on` panics inside another runtime; a caller that is itself async (ssh, say)
    // gets the download on a thread of its own instead.
    if tokio::runtime::Handle::try_current().is_ok() {
        return std::thread::scope(|scope| {
            scope
                .spawn(|| download_blocking(req, progress))
                .join()
                .expect("download thread panicked")
        });
    }
    download_blocking(req, progress)
}

fn download_blocking(req: &Download<'_>, progress: &ProgressBar) -> Result<Downloaded, FetchError> {
    let session = Session::new(req, progress)?;
    let fetched = session.fetch(false)?;
    match session.verify(&fetched) {
        Err(FetchError::HashMismatch { .. }) if fetched.resumed => {
            (req.say)(&format!(
                "warning: `{}` did not match its hash after resuming a partial download; \
                 downloading it again from the start",
                req.url
            ));
            let fetched = session.fetch(true)?;
            session.verify(&fetched)
        }
        result => result,
    }
}

struct Session<'a> {
    req: &'a Download<'a>,
    progress: &'a ProgressBar,
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl<'a> Session<'a> {
    fn new(req: &'a Download<'a>, progress: &'a ProgressBar) -> Result<Self, FetchError> {
        let client_error = |detail: String| FetchError::Client { detail };
        // One thread: the runtime only drives our single connection; writing and hashing
        // have threads of their own.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| client_error(e.to_string()))?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("farm/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(req.stall_timeout)
            // The hash is of the bytes as served: never let another crate's feature flag
            // turn on transparent decoding.
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .build()
            .map_err(|e| client_error(error_chain(&e)))?;
        Ok(Self {
            req,
            progress,
            runtime,
            client,
        })
    }

    /// Runs up to `attempts` requests until the `.part` file is complete. `fresh` discards
    /// any existing partial first.
    fn fetch(&self, fresh: bool) -> Result<Fetched, FetchError> {
        let mut partial = Partial::open(self.req, fresh, self.progress)?;
        let attempts = self.req.attempts.max(1);
        let mut attempt = 1;
        loop {
            match self.runtime.block_on(self.attempt(&mut partial)) {
                Ok(()) => return Ok(partial.finish()),
                Err(e) if e.is_retryable() && attempt < attempts => {
                    let first_line = e.to_string();
                    let first_line = first_line.lines().next().unwrap_or_default();
                    let wait = backoff(attempt);
                    (self.req.say)(&format!(
                        "warning: attempt {attempt} of {attempts} failed: {first_line}; retrying in {:.1} s",
                        wait.as_secs_f64()
                    ));
                    std::thread::sleep(wait);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One request: asks for what is missing and appends it (or starts over when the server
    /// cannot resume). Restarts do not count as attempts: nothing failed.
    async fn attempt(&self, partial: &mut Partial) -> Result<(), FetchError> {
        let url = self.req.url;
        loop {
            let offset = partial.written;
            partial.truncate_to_written()?;
            let mut request = self.client.get(url);
            if offset > 0 {
                request = request.header(RANGE, format!("bytes={offset}-"));
                if let Some(validator) = partial.if_range(url) {
                    request = request.header(IF_RANGE, validator);
                }
            }
            let mut response = request
                .send()
                .await
                .map_err(|e| transport_error(url, e, self.req.stall_timeout))?;
            let status = response.status();
            let total = match status {
                StatusCode::PARTIAL_CONTENT if offset > 0 => {
                    match content_range(response.headers()) {
                        Some((Some(start), total)) if start == offset => {
                            partial.resumed = true;
                            (self.req.say)(&format!(
                                "note: resuming `{url}` at {} of {}",
                                indicatif::BinaryBytes(offset),
                                total.map_or("?".to_string(), |t| indicatif::BinaryBytes(t)
                                    .to_string())
                            ));
                            total
                        }
                        _ => {
                            self.note("answered an unexpected Content-Range");
                            partial.restart()?;
                            continue;
                        }
                    }
                }
                StatusCode::OK => {
                    if offset > 0 {
                        // No Range support, or If-Range found the file changed.
                        self.note("sent the whole file instead of the missing part");
                        partial.restart()?;
                    }
                    partial.save_validators(url, response.headers())?;
                    response.content_length()
                }
                StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                    match content_range(response.headers()) {
                        Some((None, Some(total))) if total == offset => {
                            // The partial file already holds every byte.
                            partial.resumed = true;
                            return Ok(());
                        }
                        _ => {
                            self.note("could not resume the partial download");
                            partial.restart()?;
                            continue;
                        }
                    }
                }
                _ => return Err(status_error(url, status)),
            };

            if let Some(total) = total {
                let dir = partial.path.parent().unwrap_or(Path::new("."));
                let needed = total.saturating_sub(partial.written);
                if let Err(short) =
                    crate::sys::space::ensure(dir, needed, &format!("the download of `{url}`"))
                {
                    // An empty part file is no start to keep; bytes already there are.
                    if partial.written == 0 {
                        let _ = remove_if_exists(&partial.path);
                        let _ = remove_if_exists(&sidecar_path(&partial.path));
                    }
                    return Err(short.into());
                }
            }
            self.show_progress(offset, total);
            let mut pipeline = HashPipeline::spawn(partial.take_hasher());
            let streamed = async {
                loop {
                    match response.chunk().await {
                        Ok(Some(mut chunk)) => {
                            // Never more than the server announced: the rest is cut off.
                            let room = total.map_or(u64::MAX, |t| t.saturating_sub(partial.written));
                            let overflow = chunk.len() as u64 > room;
                            if overflow {
                                chunk.truncate(room as usize);
                            }
                            if let Err(e) = partial.file.write_all(&chunk) {
                                return Err(disk_error(url, partial.written, &partial.path, e));
                            }
                            let len = chunk.len() as u64;
                            partial.written += len;
                            pipeline.send(chunk);
                            self.progress.inc(len);
                            if overflow {
                                (self.req.say)(&format!(
                                    "warning: `{url}` sent more than the {} bytes it announced; the rest was cut off",
                                    total.unwrap_or_default()
                                ));
                                return Ok(());
                            }
                        }
                        Ok(None) => return Ok(()),
                        Err(e) if e.is_timeout() => {
                            return Err(FetchError::Stalled {
                                url: url.to_string(),
                                seconds: self.req.stall_timeout.as_secs(),
                                received: partial.written,
                            });
                        }
                        Err(e) => {
                            return Err(FetchError::Interrupted {
                                url: url.to_string(),
                                received: partial.written,
                                detail: error_chain(&e.without_url()),
                            });
                        }
                    }
                }
            }
            .await;
            partial.hasher = Some(pipeline.finish());
            streamed?;
            if let Some(total) = total
                && partial.written != total
            {
                return Err(FetchError::Interrupted {
                    url: url.to_string(),
                    received: partial.written,
                    detail: format!("the server announced {total} bytes"),
                });
            }
            return Ok(());
        }
    }

    fn note(&self, what: &str) {
        (self.req.say)(&format!(
            "note: `{}` {what}; downloading from the start",
            self.req.url
        ));
    }

    /// Styles the caller's bar like `Reporter::bytes` (so fetch bars line up with the
    /// others), plus the caller's message: a bar with ETA when the size is known, else a
    /// spinner.
    fn show_progress(&self, position: u64, total: Option<u64>) {
        let style = match total {
            Some(total) => {
                self.progress.set_length(total);
                ProgressStyle::with_template(
                    "{prefix:>12} [{bar:30}] {binary_bytes}/{binary_total_bytes} \
                     {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .map(|s| s.progress_chars("=> "))
            }
            None => {
                self.progress.unset_length();
                ProgressStyle::with_template(
                    "{prefix:>12} {spinner} {binary_bytes} {binary_bytes_per_sec} {msg}",
                )
            }
        };
        if let Ok(style) = style {
            self.progress.set_style(style);
        }
        self.progress.set_position(position);
        // Re-hashing a partial file moved the bar at disk speed; measure the network afresh.
        self.progress.reset_eta();
    }

    /// Checks the hash; deletes the `.part` file on a mismatch, the sidecar either way.
    fn verify(&self, fetched: &Fetched) -> Result<Downloaded, FetchError> {
        let req = self.req;
        let actual = fetched
            .hashes
            .digest
            .clone()
            .expect("downloads always hash with the expected algorithm");
        remove_if_exists(&sidecar_path(req.partial))?;
        if &actual != req.expected {
            remove_if_exists(req.partial)?;
            return Err(FetchError::HashMismatch {
                url: req.url.to_string(),
                expected: req.expected.clone(),
                actual,
            });
        }
        Ok(Downloaded {
            path: req.partial.to_path_buf(),
            size: fetched.hashes.size,
            blake3: fetched.hashes.blake3,
            compression: Compression::detect(req.partial, req.url)?,
        })
    }
}

/// Waits a little longer after each failure, so a briefly overloaded server can recover,
/// but never long: the caller chose how many attempts to make.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250 << attempt.min(4).saturating_sub(1))
}

/// Parses `Content-Range: bytes START-END/TOTAL` (or `bytes */TOTAL` from a 416) into the
/// start and total, either of which may be unknown.
fn content_range(headers: &HeaderMap) -> Option<(Option<u64>, Option<u64>)> {
    let value = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let total = total.trim().parse().ok();
    let start = match range.trim() {
        "*" => None,
        r => Some(r.split_once('-')?.0.trim().parse().ok()?),
    };
    Some((start, total))
}

fn status_error(url: &str, status: StatusCode) -> FetchError {
    let code = status.as_u16();
    let hint = match code {
        404 | 410 => {
            "check the URL; mirrors move or delete old images, so it may have a new URL (and hash)"
        }
        401 | 403 => {
            "the server refuses access to this URL; download it by hand and use `path = …`"
        }
        408 | 429 | 500.. => "the server is failing or overloaded; try again later or use a mirror",
        _ => "check the URL",
    };
    FetchError::Status {
        url: url.to_string(),
        status: code,
        reason: status.canonical_reason().unwrap_or("").to_string(),
        hint,
    }
}

/// A write to the `.part` file failed. A full disk keeps nothing: the partial download is
/// removed, and the error says how far it got and where.
fn disk_error(url: &str, written: u64, partial: &Path, e: std::io::Error) -> FetchError {
    if crate::sys::space::is_full(&e) {
        let removed =
            remove_if_exists(partial).is_ok() && remove_if_exists(&sidecar_path(partial)).is_ok();
        return FetchError::DiskFull {
            url: url.to_string(),
            path: partial.to_path_buf(),
            written,
            removed,
        };
    }
    FetchError::Io(e)
}

fn transport_error(url: &str, e: reqwest::Error, stall: Duration) -> FetchError {
    if e.is_timeout() && !e.is_connect() {
        return FetchError::Stalled {
            url: url.to_string(),
            seconds: stall.as_secs(),
            received: 0,
        };
    }
    // The URL is already in our message; reqwest's copy would repeat it.
    let e = e.without_url();
    if e.is_builder() {
        return FetchError::InvalidUrl {
            url: url.to_string(),
            detail: error_chain(&e),
        };
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return FetchError::ConnectionRefused {
                url: url.to_string(),
            };
        }
        source = err.source();
    }
    FetchError::Transport {
        url: url.to_string(),
        detail: error_chain(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::hash::ExpectedHash;
    use reqwest::header::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_RANGE, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn content_range_forms() {
        assert_eq!(
            content_range(&headers("bytes 100-199/200")),
            Some((Some(100), Some(200)))
        );
        assert_eq!(
            content_range(&headers("bytes */200")),
            Some((None, Some(200)))
        );
        assert_eq!(
            content_range(&headers("bytes 5-9/*")),
            Some((Some(5), None))
        );
        assert_eq!(content_range(&headers("items 1-2/3")), None);
        assert_eq!(content_range(&HeaderMap::new()), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(9), backoff(4));
    }

    /// A write the kernel refuses for space (`/dev/full` refuses every one) keeps nothing
    /// and says where: the download's own check happens only when the server announced a
    /// length.
    #[test]
    fn a_full_disk_mid_download_removes_the_part_file_and_says_how_far_it_got() {
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("x.part");
        fs_err::write(&partial, b"half").unwrap();
        fs_err::write(sidecar_path(&partial), b"{}").unwrap();
        let full = std::io::Write::write_all(&mut fs_err::File::create("/dev/full").unwrap(), b"x")
            .unwrap_err();
        let err = disk_error("http://127.0.0.1/x", 4, &partial, full);
        assert!(
            matches!(err, FetchError::DiskFull { removed: true, .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("is full after 4 bytes of `http://127.0.0.1/x`"),
            "{message}"
        );
        assert!(
            message.contains("the partial download was removed"),
            "{message}"
        );
        assert!(!partial.exists() && !sidecar_path(&partial).exists());
    }

    #[test]
    fn non_http_urls_are_rejected_with_a_hint() {
        let expected = ExpectedHash {
            algo: crate::model::hash::HashAlgo::Sha256,
            digest: vec![0; 32],
        };
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("x.part");
        let say = |_: &str| {};
        let req = Download {
            url: "ftp://example.org/x",
            expected: &expected,
            partial: &partial,
            attempts: 1,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            say: &say,
        };
        let err = download(&req, &ProgressBar::hidden())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`ftp://example.org/x`") && err.contains("hint:"),
            "{err}"
        );
        assert!(!partial.exists());
    }
}
