//! `--format containerdisk`: the flattened qcow2 as a KubeVirt containerDisk (the bytes are
//! `model::build::container_disk`'s), written as an OCI archive — one file, which
//! `skopeo copy oci-archive:FILE docker://…` and `podman load` take — and, with `--push`,
//! sent to a registry as it is, so the image there has the archive's digest.
//!
//! The layer is never written out on its own: it is the disk between a head and a tail,
//! read once to hash it, then once more into the archive and once more per push.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::binary_cache::{Registry, Timeouts};
use crate::model::build::container_disk::{
    Blob, CONFIG_MEDIA_TYPE, LAYER_MEDIA_TYPE, LAYOUT_MARKER, MANIFEST_MEDIA_TYPE, config, index,
    layer_bytes, layer_head, layer_tail, manifest,
};
use crate::model::hash::HashAlgo;
use crate::model::values::Arch;
use crate::sys::tar_entry::append_read_only;

/// The tag an archive's one image carries (`oci-archive:FILE:latest`).
pub const ARCHIVE_TAG: &str = "latest";

/// A containerDisk of one flattened disk, its documents computed.
pub struct ContainerDisk {
    disk: PathBuf,
    name: String,
    disk_bytes: u64,
    layer: Blob,
    config: Vec<u8>,
    config_blob: Blob,
    manifest: Vec<u8>,
    manifest_blob: Blob,
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(
        "`{target}` is not a registry reference: {reason}\nhint: write it as REGISTRY/REPOSITORY:TAG (e.g. `127.0.0.1:5000/farm/web:v1`)"
    )]
    Reference { target: String, reason: String },
    #[error(
        "The registry refused the containerDisk `{target}` ({what}): {reason}\nhint: check the registry's address and credentials (`FARM_OCI_USERNAME`, `FARM_OCI_PASSWORD`)"
    )]
    Refused {
        target: String,
        what: &'static str,
        reason: String,
    },
}

fn sha256_of(reader: &mut impl Read) -> io::Result<(String, u64)> {
    let hashes = crate::fetch::hash_stream(
        reader,
        Some(HashAlgo::Sha256),
        &indicatif::ProgressBar::hidden(),
    )?;
    let digest = hashes.digest.expect("a sha256 was asked for").to_hex();
    Ok((format!("sha256:{digest}"), hashes.size))
}

fn blob_of(media_type: &'static str, bytes: &[u8]) -> Blob {
    let (digest, size) = sha256_of(&mut &bytes[..]).expect("reading memory does not fail");
    Blob {
        media_type,
        digest,
        size,
    }
}

/// The layer's bytes: head, the disk, tail.
fn layer_reader(
    disk: &Path,
    name: &str,
    disk_bytes: u64,
) -> io::Result<impl Read + Send + 'static> {
    let file = fs_err::File::open(disk)?.into_parts().0;
    Ok(io::Cursor::new(layer_head(name, disk_bytes))
        .chain(file)
        .chain(io::Cursor::new(layer_tail(disk_bytes))))
}

impl ContainerDisk {
    /// Hashes the layer around `disk` (a flattened qcow2) and writes the documents that
    /// name it. `name` is the disk's name in the layer (`disk/<name>.qcow2`).
    pub fn prepare(
        disk: &Path,
        name: &str,
        arch: Arch,
        derivation: &str,
    ) -> io::Result<ContainerDisk> {
        let disk_bytes = fs_err::metadata(disk)?.len();
        let (digest, size) = sha256_of(&mut layer_reader(disk, name, disk_bytes)?)?;
        if size != layer_bytes(disk_bytes) {
            return Err(io::Error::other(format!(
                "`{}` changed while it was read",
                disk.display()
            )));
        }
        let layer = Blob {
            media_type: LAYER_MEDIA_TYPE,
            digest,
            size,
        };
        // A plain tar: the layer as stored is the layer unpacked, so its digest is its diff_id.
        let config = config(arch, &layer.digest);
        let config_blob = blob_of(CONFIG_MEDIA_TYPE, &config);
        let manifest = manifest(&config_blob, &layer, derivation);
        let manifest_blob = blob_of(MANIFEST_MEDIA_TYPE, &manifest);
        Ok(ContainerDisk {
            disk: disk.to_path_buf(),
            name: name.to_string(),
            disk_bytes,
            layer,
            config,
            config_blob,
            manifest,
            manifest_blob,
        })
    }

    fn layer_reader(&self) -> io::Result<impl Read + Send + 'static> {
        layer_reader(&self.disk, &self.name, self.disk_bytes)
    }

    /// The image's digest (its manifest's), as registries and `skopeo inspect` show it.
    pub fn digest(&self) -> &str {
        &self.manifest_blob.digest
    }

    /// Writes the OCI archive (an OCI image layout in a tar) to `out`. Every entry has
    /// mtime 0 and fixed owners, so one derivation gives one archive.
    pub fn write_archive(&self, out: &Path) -> io::Result<()> {
        let file = fs_err::File::create(out)?;
        let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, file));
        let small = |tar: &mut tar::Builder<_>, path: &str, bytes: &[u8]| {
            append_read_only(tar, path, bytes.len() as u64, bytes)
        };
        small(&mut tar, "oci-layout", LAYOUT_MARKER)?;
        let manifest_index = index(&self.manifest_blob, ARCHIVE_TAG);
        small(&mut tar, "index.json", &manifest_index)?;
        small(&mut tar, &self.config_blob.layout_path(), &self.config)?;
        small(&mut tar, &self.manifest_blob.layout_path(), &self.manifest)?;
        append_read_only(
            &mut tar,
            self.layer.layout_path(),
            self.layer.size,
            self.layer_reader()?,
        )?;
        let mut writer = tar.into_inner()?;
        writer.flush()?;
        writer.into_inner().map_err(|e| e.into_error())?.sync_all()
    }

    /// Sends the image to `target` (`REGISTRY/REPOSITORY[:TAG]`, `latest` when untagged):
    /// the layer (skipped when the registry has it), the config, then the manifest.
    pub fn push(
        &self,
        target: &str,
        sent: &crate::binary_cache::backend::Progress,
    ) -> Result<(), PushError> {
        let reference: oci_client::Reference =
            target
                .parse()
                .map_err(|e: oci_client::ParseError| PushError::Reference {
                    target: target.to_string(),
                    reason: e.to_string(),
                })?;
        let refused = |what: &'static str| {
            move |reason: String| PushError::Refused {
                target: target.to_string(),
                what,
                reason,
            }
        };
        let registry = Registry::connect(reference.resolve_registry(), Timeouts::default())
            .map_err(refused("connecting"))?;
        let reference = registry.reference(
            reference.repository(),
            reference.tag().unwrap_or(ARCHIVE_TAG),
        );
        let chain =
            |e: oci_client::errors::OciDistributionError| crate::model::text::error_chain(&e);
        let open = || -> io::Result<Box<dyn Read + Send>> { Ok(Box::new(self.layer_reader()?)) };
        registry
            .push_stream(&reference, open, &self.layer.digest, self.layer.size, sent)
            .map_err(|e| refused("the layer")(chain(e)))?;
        registry
            .push_bytes(&reference, self.config.clone())
            .map_err(|e| refused("the config")(chain(e)))?;
        registry
            .push_manifest_bytes(&reference, self.manifest.clone(), MANIFEST_MEDIA_TYPE)
            .map_err(|e| refused("the manifest")(chain(e)))
    }
}
