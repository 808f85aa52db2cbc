//! A KubeVirt containerDisk, as bytes: an OCI image whose one layer is a tar holding
//! `disk/<name>.qcow2`, readable by KubeVirt's qemu (uid and gid 107), and the JSON
//! documents around it (config, manifest, and the `index.json` of an OCI archive).
//!
//! Why farm writes these itself rather than asking Docker or buildah: a containerDisk is
//! two tar headers, the disk and three small JSON files, and written here every byte is
//! fixed (mtime 0, no user names from this machine, a fixed key order), so the same
//! derivation gives the same image digest on any machine. The layer is a plain tar, not
//! gzip: the qcow2 inside is already as small as `--compress` makes it, and for a plain tar
//! the layer's digest is its `diff_id`, so one hashing pass gives both.

use serde_json::json;

use crate::model::values::Arch;

/// The uid and gid of qemu inside KubeVirt's launcher pod: the disk must be readable by it.
pub const QEMU_ID: u64 = 107;
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// A tar block: headers and the file's padding come in these.
const BLOCK: u64 = 512;

/// Where the disk lies inside the layer: KubeVirt takes the one file in `/disk`.
pub fn disk_path(name: &str) -> String {
    format!("disk/{name}.qcow2")
}

/// What comes before the disk's bytes in the layer: the `disk/` directory (mode 0555) and
/// the disk's own header (mode 0444), both owned by 107:107 with mtime 0. GNU headers, so a
/// disk of 8 GiB or more still has its size written (base-256), which Go's `archive/tar`
/// (containerd, CRI-O) reads.
pub fn layer_head(name: &str, disk_bytes: u64) -> Vec<u8> {
    let mut head = Vec::with_capacity(2 * BLOCK as usize);
    let entries = [
        ("disk/".to_string(), tar::EntryType::Directory, 0o555, 0),
        (disk_path(name), tar::EntryType::Regular, 0o444, disk_bytes),
    ];
    for (path, kind, mode, size) in entries {
        let mut header = tar::Header::new_gnu();
        header
            .set_path(&path)
            .expect("a platform name is a short plain file name");
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(QEMU_ID);
        header.set_gid(QEMU_ID);
        header.set_size(size);
        header.set_mtime(0);
        header.set_cksum();
        head.extend_from_slice(header.as_bytes());
    }
    head
}

/// What comes after the disk's bytes: zeros to the end of its last block, then the two
/// zero blocks that end a tar.
pub fn layer_tail(disk_bytes: u64) -> Vec<u8> {
    let padding = (BLOCK - disk_bytes % BLOCK) % BLOCK;
    vec![0; (padding + 2 * BLOCK) as usize]
}

/// The layer's size for a disk of `disk_bytes`.
pub fn layer_bytes(disk_bytes: u64) -> u64 {
    2 * BLOCK + disk_bytes + layer_tail(disk_bytes).len() as u64
}

/// A blob as the OCI documents name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub media_type: &'static str,
    /// `sha256:<hex>`
    pub digest: String,
    pub size: u64,
}

impl Blob {
    fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }

    /// The blob's path inside an OCI image layout.
    pub fn layout_path(&self) -> String {
        format!("blobs/{}", self.digest.replacen(':', "/", 1))
    }
}

/// The image config: what runtimes and `skopeo inspect` read (architecture, os) and the
/// layer's `diff_id`, which containerd checks the unpacked layer against. No `created`:
/// a time would make every export a new image.
pub fn config(arch: Arch, diff_id: &str) -> Vec<u8> {
    let value = json!({
        "architecture": arch.debian_name(),
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    serde_json::to_vec(&value).expect("JSON values encode")
}

/// The image manifest over `config` and the one `layer`, with an annotation naming the
/// derivation the disk came from.
pub fn manifest(config: &Blob, layer: &Blob, derivation: &str) -> Vec<u8> {
    let value = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
        "annotations": {"dev.farm.derivation": derivation},
    });
    serde_json::to_vec(&value).expect("JSON values encode")
}

/// An OCI archive's `index.json`: the one manifest, tagged `tag` (what
/// `skopeo copy oci-archive:FILE:TAG` and `podman load` find it by).
pub fn index(manifest: &Blob, tag: &str) -> Vec<u8> {
    let mut descriptor = manifest.descriptor();
    descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    let value = json!({"schemaVersion": 2, "manifests": [descriptor]});
    serde_json::to_vec(&value).expect("JSON values encode")
}

/// An OCI layout's marker file.
pub const LAYOUT_MARKER: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layer_is_a_tar_that_holds_the_disk_owned_by_qemu() {
        let disk = b"QFI\xfb and the rest of a disk".to_vec();
        let mut layer = layer_head("web", disk.len() as u64);
        layer.extend_from_slice(&disk);
        layer.extend(layer_tail(disk.len() as u64));
        assert_eq!(layer.len() as u64, layer_bytes(disk.len() as u64));
        assert_eq!(layer.len() % 512, 0);

        let mut archive = tar::Archive::new(layer.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (107, 107));
            assert_eq!(header.mtime().unwrap(), 0);
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut body).unwrap();
            seen.push((
                entry.path().unwrap().display().to_string(),
                header.mode().unwrap(),
                body,
            ));
        }
        assert_eq!(
            seen,
            vec![
                ("disk/".to_string(), 0o555, vec![]),
                ("disk/web.qcow2".to_string(), 0o444, disk)
            ]
        );
    }

    #[test]
    fn a_disk_of_eight_gibibytes_or_more_keeps_its_size() {
        let big = 9u64 << 30;
        let head = layer_head("big", big);
        let header = tar::Header::from_byte_slice(&head[512..1024]);
        assert_eq!(header.size().unwrap(), big);
        assert_eq!(layer_bytes(big), 1024 + big + 1024);
    }

    #[test]
    fn the_documents_name_their_blobs_and_carry_no_time() {
        let layer = Blob {
            media_type: LAYER_MEDIA_TYPE,
            digest: "sha256:aa".into(),
            size: 3072,
        };
        let config_bytes = config(Arch::Aarch64, &layer.digest);
        let config_json: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap();
        assert_eq!(config_json["architecture"], "arm64");
        assert_eq!(config_json["rootfs"]["diff_ids"][0], "sha256:aa");
        assert!(config_json.get("created").is_none());
        let config_blob = Blob {
            media_type: CONFIG_MEDIA_TYPE,
            digest: "sha256:cc".into(),
            size: config_bytes.len() as u64,
        };
        let manifest_json: serde_json::Value =
            serde_json::from_slice(&manifest(&config_blob, &layer, "drv")).unwrap();
        assert_eq!(manifest_json["layers"][0]["digest"], "sha256:aa");
        assert_eq!(manifest_json["layers"][0]["size"], 3072);
        assert_eq!(manifest_json["config"]["mediaType"], CONFIG_MEDIA_TYPE);
        assert_eq!(layer.layout_path(), "blobs/sha256/aa");
        let index_json: serde_json::Value =
            serde_json::from_slice(&index(&config_blob, "v1")).unwrap();
        assert_eq!(
            index_json["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
            "v1"
        );
    }
}
