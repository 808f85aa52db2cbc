//! S3 and S3-compatible object stores (`s3://bucket/prefix`) through the `object_store`
//! crate. Its API is async; farm's cache code is blocking, so each backend owns a small
//! tokio runtime and every call blocks on it. Reading streams: a blob is handed over chunk
//! by chunk, never held whole in memory; uploads above `MULTIPART_FROM` go in parts.
//!
//! Where the store is and who farm is come from the environment, as for every AWS tool:
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` (or `AWS_DEFAULT_REGION`),
//! and for S3-compatible servers `AWS_ENDPOINT` and `AWS_ALLOW_HTTP=true`.

use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, ObjectStore, PutOptions, PutPayload};

use super::backend::{Backend, BackendError, Progress, Timeouts};
use super::blocking::{StreamReader, runtime};

/// Files at least this big are uploaded in parts of this size.
const MULTIPART_FROM: usize = 16 << 20;

pub(super) struct S3Backend {
    url: String,
    prefix: String,
    store: Arc<dyn ObjectStore>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl S3Backend {
    pub(super) fn open(
        url: &str,
        parsed: &url::Url,
        timeouts: Timeouts,
    ) -> Result<S3Backend, BackendError> {
        let unreachable = |reason: String| BackendError::Unreachable {
            url: url.to_string(),
            reason,
        };
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| unreachable("it names no bucket (`s3://bucket/prefix`)".into()))?;
        // These client options replace the ones `from_env` read, so `AWS_ALLOW_HTTP` is
        // carried over by hand.
        let allow_http = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true" || v == "1");
        let client = object_store::ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(timeouts.connect)
            .with_timeout(timeouts.read);
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_client_options(client)
            .with_retry(object_store::RetryConfig {
                max_retries: 2,
                retry_timeout: timeouts.read,
                ..Default::default()
            })
            .build()
            .map_err(|e| unreachable(e.to_string()))?;
        let runtime = runtime().map_err(|e| unreachable(e.to_string()))?;
        Ok(S3Backend {
            url: url.trim_end_matches('/').to_string(),
            prefix: parsed.path().trim_matches('/').to_string(),
            store: Arc::new(store),
            runtime,
        })
    }

    fn location(&self, path: &str) -> ObjectPath {
        match self.prefix.is_empty() {
            true => ObjectPath::from(path),
            false => ObjectPath::from(format!("{}/{path}", self.prefix)),
        }
    }

    fn failed(&self, path: &str, e: object_store::Error) -> BackendError {
        match e {
            object_store::Error::Generic { .. } => BackendError::Unreachable {
                url: self.url.clone(),
                reason: crate::model::text::error_chain(&e),
            },
            other => BackendError::Io {
                url: self.url.clone(),
                path: path.to_string(),
                source: io::Error::other(crate::model::text::error_chain(&other)),
            },
        }
    }
}

impl Backend for S3Backend {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, path: &str, _bytes: u64) -> Result<Option<Box<dyn Read + Send>>, BackendError> {
        let location = self.location(path);
        let result = self
            .runtime
            .block_on(self.store.get_opts(&location, GetOptions::default()));
        match result {
            Ok(found) => Ok(Some(Box::new(StreamReader::new(
                found.into_stream(),
                self.runtime.clone(),
            )))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed(path, e)),
        }
    }

    fn size(&self, path: &str) -> Result<Option<u64>, BackendError> {
        let location = self.location(path);
        let options = GetOptions {
            head: true,
            ..Default::default()
        };
        match self
            .runtime
            .block_on(self.store.get_opts(&location, options))
        {
            Ok(found) => Ok(Some(found.meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed(path, e)),
        }
    }

    fn put(&self, path: &str, file: &Path, sent: &Progress) -> Result<(), BackendError> {
        let location = self.location(path);
        let io = |source: io::Error| BackendError::Io {
            url: self.url.clone(),
            path: path.to_string(),
            source,
        };
        let mut source = fs_err::File::open(file).map_err(io)?;
        let len = source.metadata().map_err(io)?.len() as usize;
        let read_part = |source: &mut fs_err::File| -> io::Result<Vec<u8>> {
            let mut part = Vec::with_capacity(MULTIPART_FROM);
            source
                .by_ref()
                .take(MULTIPART_FROM as u64)
                .read_to_end(&mut part)?;
            Ok(part)
        };
        if len < MULTIPART_FROM {
            let bytes = read_part(&mut source).map_err(io)?;
            let sent_bytes = bytes.len() as u64;
            let payload = PutPayload::from(bytes);
            self.runtime
                .block_on(
                    self.store
                        .put_opts(&location, payload, PutOptions::default()),
                )
                .map_err(|e| self.failed(path, e))?;
            sent(sent_bytes);
            return Ok(());
        }
        self.runtime.block_on(async {
            let mut upload = self
                .store
                .put_multipart_opts(&location, Default::default())
                .await
                .map_err(|e| self.failed(path, e))?;
            loop {
                let part = read_part(&mut source).map_err(io)?;
                if part.is_empty() {
                    break;
                }
                let part_len = part.len() as u64;
                if let Err(e) = upload.put_part(PutPayload::from(part)).await {
                    let _ = upload.abort().await;
                    return Err(self.failed(path, e));
                }
                sent(part_len);
            }
            upload
                .complete()
                .await
                .map(drop)
                .map_err(|e| self.failed(path, e))
        })
    }
}
