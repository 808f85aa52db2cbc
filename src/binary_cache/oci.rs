//! OCI registries as binary caches (`oci://registry/repository`), through `oci-client`:
//! the registries CI teams already run (GitHub, GitLab, Harbor, `registry:2`) hold farm
//! caches without anything else to operate.
//!
//! Registries address content by sha256 and name it by tags, so farm's paths map to tags:
//!
//! - `blobs/<blake3>.zst` → an artifact tagged `blob-<blake3>` (artifact type
//!   `application/vnd.farm.blob.v1`) whose one layer is the zstd blob;
//! - `records/<drv>.json` → an artifact tagged `drv-<drv>` (artifact type
//!   `application/vnd.farm.record.v1`) whose config is the signed record and whose layers
//!   are the entry's blobs, so registry garbage collection and `skopeo copy` keep them;
//! - `farm-cache.json` → the repository itself.
//!
//! Registries on a loopback address are spoken to over plain HTTP, as Docker does; others
//! over HTTPS. `FARM_OCI_USERNAME` and `FARM_OCI_PASSWORD` give basic credentials.

use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::Digest;

use super::backend::{Backend, BackendError, Progress, Timeouts};
use super::blocking::{StreamReader, runtime};
use crate::model::build::container_disk::MANIFEST_MEDIA_TYPE;
use crate::model::text::error_chain;

const RECORD_ARTIFACT: &str = "application/vnd.farm.record.v1";
const RECORD_MEDIA_TYPE: &str = "application/vnd.farm.record.v1+json";
const BLOB_ARTIFACT: &str = "application/vnd.farm.blob.v1";
const BLOB_MEDIA_TYPE: &str = "application/vnd.farm.blob.v1+zstd";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// Bytes read from disk per upload chunk.
const CHUNK: usize = 8 << 20;

pub(super) struct OciBackend {
    url: String,
    repository: String,
    registry: Registry,
}

/// A registry as farm speaks to every registry: plain HTTP when it is on a loopback
/// address (as Docker does), HTTPS otherwise; basic credentials from `FARM_OCI_USERNAME`
/// and `FARM_OCI_PASSWORD`, anonymous without them. Shared by the binary cache and by
/// `farm image export --push`.
pub struct Registry {
    /// `host[:port]`, as references name it.
    host: String,
    client: Client,
    auth: RegistryAuth,
    runtime: Arc<tokio::runtime::Runtime>,
}

/// Whether `registry` (`host[:port]`, `[v6]:port`) is on this machine.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => registry.split(':').next().unwrap_or_default(),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Registry {
    /// A client for `registry` (`host[:port]`). Errors are the reason, for the caller to
    /// put in its own words.
    pub fn connect(registry: &str, timeouts: Timeouts) -> Result<Registry, String> {
        let protocol = match is_loopback(registry) {
            true => ClientProtocol::Http,
            false => ClientProtocol::Https,
        };
        let client = Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(timeouts.connect),
            read_timeout: Some(timeouts.read),
            ..Default::default()
        });
        let auth = match (
            std::env::var("FARM_OCI_USERNAME"),
            std::env::var("FARM_OCI_PASSWORD"),
        ) {
            (Ok(user), Ok(password)) => RegistryAuth::Basic(user, password),
            _ => RegistryAuth::Anonymous,
        };
        let runtime = runtime().map_err(|e| e.to_string())?;
        runtime.block_on(client.store_auth_if_needed(registry, &auth));
        Ok(Registry {
            host: registry.to_string(),
            client,
            auth,
            runtime,
        })
    }

    pub fn reference(&self, repository: &str, tag: &str) -> Reference {
        Reference::with_tag(self.host.clone(), repository.to_string(), tag.to_string())
    }

    /// Sends the `size` bytes `open` reads as the blob `digest` (`sha256:<hex>`), unless the
    /// registry has it already. The registry checks the digest it is told.
    pub fn push_stream(
        &self,
        reference: &Reference,
        open: impl FnOnce() -> io::Result<Box<dyn Read + Send>>,
        digest: &str,
        size: u64,
        sent: &Progress,
    ) -> Result<(), OciDistributionError> {
        let exists = self
            .runtime
            .block_on(self.client.blob_exists(reference, digest))
            .unwrap_or(false);
        if exists {
            return Ok(());
        }
        let reader = open().map_err(OciDistributionError::IoError)?;
        let progress = sent.clone();
        let chunks = futures_util::stream::unfold(reader, move |mut reader| {
            let progress = progress.clone();
            async move {
                let mut buf = vec![0u8; CHUNK];
                match crate::fetch::read_full(&mut reader, &mut buf) {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        progress(n as u64);
                        Some((Ok(bytes::Bytes::from(buf)), reader))
                    }
                    Err(e) => Some((Err(OciDistributionError::IoError(e)), reader)),
                }
            }
        });
        self.runtime
            .block_on(
                self.client
                    .push_blob_stream(reference, chunks, digest, Some(size)),
            )
            .map(drop)
    }

    /// Sends a small blob held in memory; returns its digest.
    pub fn push_bytes(
        &self,
        reference: &Reference,
        bytes: Vec<u8>,
    ) -> Result<String, OciDistributionError> {
        let digest = sha256_digest(&bytes);
        self.runtime
            .block_on(self.client.push_blob(reference, bytes, &digest))?;
        Ok(digest)
    }

    /// Tags `reference` with the manifest `body` exactly as given (so its digest is the one
    /// the caller computed), of type `media_type`.
    pub fn push_manifest_bytes(
        &self,
        reference: &Reference,
        body: Vec<u8>,
        media_type: &'static str,
    ) -> Result<(), OciDistributionError> {
        self.runtime
            .block_on(self.client.push_manifest_raw(
                reference,
                body,
                reqwest::header::HeaderValue::from_static(media_type),
            ))
            .map(drop)
    }
}

/// What a cache path is in the registry.
enum Object<'a> {
    Info,
    Record(&'a str),
    Blob(&'a str),
}

fn object(path: &str) -> Option<Object<'_>> {
    if path == crate::model::build::cache_record::CACHE_INFO {
        return Some(Object::Info);
    }
    if let Some(hex) = path
        .strip_prefix("records/")
        .and_then(|p| p.strip_suffix(".json"))
    {
        return Some(Object::Record(hex));
    }
    path.strip_prefix("blobs/")
        .and_then(|p| p.strip_suffix(".zst"))
        .map(Object::Blob)
}

fn is_not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::ServerError { code: 404, .. } => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NotFound
            )
        }),
        _ => false,
    }
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

impl OciBackend {
    pub(super) fn open(
        url: &str,
        parsed: &url::Url,
        timeouts: Timeouts,
    ) -> Result<OciBackend, BackendError> {
        let unreachable = |reason: String| BackendError::Unreachable {
            url: url.to_string(),
            reason,
        };
        let host = parsed.host_str().filter(|h| !h.is_empty()).ok_or_else(|| {
            unreachable("it names no registry (`oci://registry/repository`)".into())
        })?;
        let registry = match parsed.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let repository = parsed.path().trim_matches('/').to_string();
        if repository.is_empty() {
            return Err(unreachable("it names no repository".into()));
        }
        let registry = Registry::connect(&registry, timeouts).map_err(unreachable)?;
        Ok(OciBackend {
            url: url.trim_end_matches('/').to_string(),
            repository,
            registry,
        })
    }

    fn reference(&self, tag: &str) -> Reference {
        self.registry.reference(&self.repository, tag)
    }

    fn failed(&self, path: &str, e: OciDistributionError) -> BackendError {
        match e {
            OciDistributionError::RequestError(_) => BackendError::Unreachable {
                url: self.url.clone(),
                reason: error_chain(&e),
            },
            other => BackendError::Io {
                url: self.url.clone(),
                path: path.to_string(),
                source: io::Error::other(error_chain(&other)),
            },
        }
    }

    /// The manifest tagged `tag`, or `None`.
    fn manifest(&self, path: &str, tag: &str) -> Result<Option<OciImageManifest>, BackendError> {
        let reference = self.reference(tag);
        match self.registry.runtime.block_on(
            self.registry
                .client
                .pull_image_manifest(&reference, &self.registry.auth),
        ) {
            Ok((manifest, _)) => Ok(Some(manifest)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.failed(path, e)),
        }
    }

    fn stream(
        &self,
        path: &str,
        tag: &str,
        layer: &OciDescriptor,
    ) -> Result<Box<dyn Read + Send>, BackendError> {
        let reference = self.reference(tag);
        let sized = self
            .registry
            .runtime
            .block_on(self.registry.client.pull_blob_stream(&reference, layer))
            .map_err(|e| self.failed(path, e))?;
        Ok(Box::new(StreamReader::new(
            sized.stream,
            self.registry.runtime.clone(),
        )))
    }

    /// Pushes the bytes at `file` as a blob; returns its descriptor.
    fn push_file(
        &self,
        path: &str,
        tag: &str,
        file: &Path,
        media_type: &str,
        sent: &Progress,
    ) -> Result<OciDescriptor, BackendError> {
        let io = |source: io::Error| BackendError::Io {
            url: self.url.clone(),
            path: path.to_string(),
            source,
        };
        // The registry checks the digest it is told, so the file is read twice: once to
        // hash it, once to send it, chunk by chunk.
        let hashes = crate::fetch::hash_file(
            file,
            Some(crate::model::hash::HashAlgo::Sha256),
            &indicatif::ProgressBar::hidden(),
        )
        .map_err(|e| io(io::Error::other(error_chain(&e))))?;
        let size = hashes.size;
        let digest = format!(
            "sha256:{}",
            hashes.digest.expect("a sha256 was asked for").to_hex()
        );
        let reference = self.reference(tag);
        let open = || -> io::Result<Box<dyn Read + Send>> {
            Ok(Box::new(fs_err::File::open(file)?.into_parts().0))
        };
        self.registry
            .push_stream(&reference, open, &digest, size, sent)
            .map_err(|e| self.failed(path, e))?;
        Ok(OciDescriptor {
            media_type: media_type.to_string(),
            digest,
            size: size as i64,
            ..Default::default()
        })
    }

    fn push_manifest(
        &self,
        path: &str,
        tag: &str,
        manifest: OciImageManifest,
    ) -> Result<(), BackendError> {
        let reference = self.reference(tag);
        self.registry
            .runtime
            .block_on(
                self.registry
                    .client
                    .push_manifest(&reference, &OciManifest::Image(manifest)),
            )
            .map(drop)
            .map_err(|e| self.failed(path, e))
    }

    /// The empty config artifacts without one of their own carry.
    fn empty_config(&self, path: &str, tag: &str) -> Result<OciDescriptor, BackendError> {
        let empty = b"{}";
        let digest = self
            .registry
            .push_bytes(&self.reference(tag), empty.to_vec())
            .map_err(|e| self.failed(path, e))?;
        Ok(OciDescriptor {
            media_type: EMPTY_MEDIA_TYPE.to_string(),
            digest,
            size: empty.len() as i64,
            ..Default::default()
        })
    }
}

impl Backend for OciBackend {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, path: &str, _bytes: u64) -> Result<Option<Box<dyn Read + Send>>, BackendError> {
        let (tag, pick_config) = match object(path) {
            Some(Object::Info) => {
                return Ok(Some(Box::new(io::Cursor::new(
                    b"{\"format\": 1}\n".to_vec(),
                ))));
            }
            Some(Object::Record(hex)) => (format!("drv-{hex}"), true),
            Some(Object::Blob(hex)) => (format!("blob-{hex}"), false),
            None => return Ok(None),
        };
        let Some(manifest) = self.manifest(path, &tag)? else {
            return Ok(None);
        };
        let layer = match pick_config {
            true => manifest.config,
            false => match manifest.layers.into_iter().next() {
                Some(layer) => layer,
                None => return Ok(None),
            },
        };
        self.stream(path, &tag, &layer).map(Some)
    }

    fn size(&self, path: &str) -> Result<Option<u64>, BackendError> {
        let (tag, pick_config) = match object(path) {
            Some(Object::Info) => return Ok(Some(0)),
            Some(Object::Record(hex)) => (format!("drv-{hex}"), true),
            Some(Object::Blob(hex)) => (format!("blob-{hex}"), false),
            None => return Ok(None),
        };
        Ok(self.manifest(path, &tag)?.and_then(|m| match pick_config {
            true => Some(m.config.size as u64),
            false => m.layers.first().map(|l| l.size as u64),
        }))
    }

    fn put(&self, path: &str, file: &Path, sent: &Progress) -> Result<(), BackendError> {
        match object(path) {
            Some(Object::Info) | None => Ok(()),
            Some(Object::Blob(hex)) => {
                let tag = format!("blob-{hex}");
                let layer = self.push_file(path, &tag, file, BLOB_MEDIA_TYPE, sent)?;
                let config = self.empty_config(path, &tag)?;
                self.push_manifest(
                    path,
                    &tag,
                    OciImageManifest {
                        media_type: Some(MANIFEST_MEDIA_TYPE.to_string()),
                        artifact_type: Some(BLOB_ARTIFACT.to_string()),
                        config,
                        layers: vec![layer],
                        ..Default::default()
                    },
                )
            }
            Some(Object::Record(hex)) => {
                let tag = format!("drv-{hex}");
                // The record's blobs become the artifact's layers: they are pushed already
                // (records go last), so their descriptors come from their own artifacts.
                let text = fs_err::read(file).map_err(|source| BackendError::Io {
                    url: self.url.clone(),
                    path: path.to_string(),
                    source,
                })?;
                let record: crate::model::build::cache_record::CacheRecord =
                    serde_json::from_slice(&text).map_err(|e| BackendError::Io {
                        url: self.url.clone(),
                        path: path.to_string(),
                        source: io::Error::other(e),
                    })?;
                let mut layers = Vec::new();
                for blob in record.files.values() {
                    let blob_tag = format!("blob-{}", blob.blake3.to_hex());
                    if let Some(manifest) = self.manifest(path, &blob_tag)? {
                        layers.extend(manifest.layers.into_iter().next());
                    }
                }
                let config = self.push_file(path, &tag, file, RECORD_MEDIA_TYPE, sent)?;
                self.push_manifest(
                    path,
                    &tag,
                    OciImageManifest {
                        media_type: Some(MANIFEST_MEDIA_TYPE.to_string()),
                        artifact_type: Some(RECORD_ARTIFACT.to_string()),
                        config,
                        layers,
                        ..Default::default()
                    },
                )
            }
        }
    }
}
