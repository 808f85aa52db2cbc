//! A qcow2 disk's header, read in-process with `qcow2-rs`: its virtual size, backing file
//! and backing format.
//!
//! `commit` uses the backing file to refuse a layer whose backing path would break when the
//! store moves; `verify` follows backing chains; `farm up` refuses a `disk_size` smaller than
//! the layer. Reading the first cluster is far cheaper than running `qemu-img info`, and
//! keeps these checks free of a process.

use std::io::{self, Read};
use std::path::Path;

use qcow2_rs::meta::Qcow2Header;

const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Bytes of the fixed header every version has, plus room for the version 3 fields.
const FIXED_HEADER_LEN: usize = 112;
/// qcow2's largest cluster; the header, its extensions and the backing name lie in the first.
const MAX_CLUSTER: u64 = 2 << 20;

/// What the header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Qcow2Info {
    /// The size of the disk a guest sees.
    pub virtual_size: u64,
    /// The backing file as recorded (relative names are relative to the image's directory).
    pub backing: Option<String>,
    /// The backing file's format, when the header records it (qemu requires it since 6.1).
    pub backing_format: Option<String>,
}

/// The header of `path`, or `None` if it is not a qcow2 image at all.
pub(crate) fn read_info(path: &Path) -> io::Result<Option<Qcow2Info>> {
    let mut file = fs_err::File::open(path)?;
    let len = file.metadata()?.len();
    let mut fixed = [0u8; FIXED_HEADER_LEN];
    if len < FIXED_HEADER_LEN as u64 {
        return Ok(None);
    }
    file.read_exact(&mut fixed)?;
    if fixed[..4] != MAGIC {
        return Ok(None);
    }
    let cluster_bits = u32::from_be_bytes(fixed[20..24].try_into().expect("4 bytes"));
    let cluster = 1u64
        .checked_shl(cluster_bits)
        .unwrap_or(u64::MAX)
        .min(MAX_CLUSTER)
        .min(len);
    let mut header = fixed.to_vec();
    header.resize(cluster as usize, 0);
    file.read_exact(&mut header[FIXED_HEADER_LEN..])?;
    // Incompatible features (zstd compression, extended L2 entries, a dirty bit) change how
    // *data* is read, not the header; qcow2-rs refuses any it does not implement, so they
    // are cleared in this copy, which is only used to read the header.
    let version = u32::from_be_bytes(fixed[4..8].try_into().expect("4 bytes"));
    if version >= 3 {
        header[72..80].fill(0);
    }
    let parsed = Qcow2Header::from_buf(&header).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "`{}` has a qcow2 header farm cannot read: {e}",
                path.display()
            ),
        )
    })?;
    Ok(Some(Qcow2Info {
        virtual_size: parsed.size(),
        backing: parsed.backing_filename().cloned(),
        backing_format: parsed.backing_format().cloned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) {
        let status = Command::new("qemu-img")
            .args(args)
            .status()
            .expect("qemu-img (scripts/setup.sh installs it)");
        assert!(status.success(), "qemu-img {args:?}");
    }

    #[test]
    fn reads_size_backing_name_and_format_that_qemu_img_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let child = dir.path().join("child.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "96M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            child.to_str().unwrap(),
            "128M",
        ]);
        assert_eq!(
            read_info(&base).unwrap(),
            Some(Qcow2Info {
                virtual_size: 96 << 20,
                backing: None,
                backing_format: None,
            })
        );
        assert_eq!(
            read_info(&child).unwrap(),
            Some(Qcow2Info {
                virtual_size: 128 << 20,
                backing: Some("base.qcow2".into()),
                backing_format: Some("qcow2".into()),
            })
        );
    }

    #[test]
    fn other_files_are_not_qcow2_and_a_damaged_header_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        fs_err::write(&path, b"raw").unwrap();
        assert_eq!(read_info(&path).unwrap(), None);
        fs_err::write(&path, [0u8; 4096]).unwrap();
        assert_eq!(read_info(&path).unwrap(), None);
        qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "16M"]);
        let mut bytes = fs_err::read(&path).unwrap();
        bytes[20..24].copy_from_slice(&40u32.to_be_bytes()); // a 1 TiB cluster
        fs_err::write(&path, &bytes).unwrap();
        let err = read_info(&path).unwrap_err();
        assert!(err.to_string().contains("qcow2 header"), "{err}");
    }
}
