//! Reads the backing file name and the virtual size straight from a qcow2 header.
//!
//! `commit` uses the backing name to refuse a layer whose backing path would break when the
//! store moves (absolute, or not pointing at its declared parent); `farm up` uses the size to
//! refuse a `disk_size` smaller than the layer. Reading a few header bytes is far cheaper
//! than running `qemu-img info`, and keeps the store free of a process dependency.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

const MAGIC: [u8; 4] = *b"QFI\xfb";
const HEADER_PREFIX_LEN: usize = 24;
/// qemu's own limit on a backing file name.
const MAX_BACKING_LEN: u32 = 1023;

/// What the header says about the backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Backing {
    NotQcow2,
    None,
    /// The name as recorded (relative names are relative to the image's directory).
    File(String),
}

/// Parses the fixed start of a qcow2 header: `(offset, length)` of the backing name, if any.
pub(crate) fn parse_header_prefix(bytes: &[u8; HEADER_PREFIX_LEN]) -> Option<Option<(u64, u32)>> {
    if bytes[..4] != MAGIC {
        return None;
    }
    let offset = u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes"));
    Some((offset != 0 && len != 0).then_some((offset, len)))
}

pub(crate) fn read_backing(path: &Path) -> io::Result<Backing> {
    let mut file = fs_err::File::open(path)?;
    let mut prefix = [0u8; HEADER_PREFIX_LEN];
    match file.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Backing::NotQcow2),
        Err(e) => return Err(e),
    }
    let Some(location) = parse_header_prefix(&prefix) else {
        return Ok(Backing::NotQcow2);
    };
    let Some((offset, len)) = location else {
        return Ok(Backing::None);
    };
    if len > MAX_BACKING_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "`{}` records a {len}-byte backing file name, longer than qemu allows",
                path.display()
            ),
        ));
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut name = vec![0u8; len as usize];
    file.read_exact(&mut name)?;
    String::from_utf8(name).map(Backing::File).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "`{}` records a backing file name that is not UTF-8",
                path.display()
            ),
        )
    })
}

/// The disk size a guest sees (header bytes 24..32), or `None` if `path` is not qcow2.
pub(crate) fn read_virtual_size(path: &Path) -> io::Result<Option<u64>> {
    let mut header = [0u8; 32];
    match fs_err::File::open(path)?.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if header[..4] != MAGIC {
        return Ok(None);
    }
    Ok(Some(u64::from_be_bytes(
        header[24..32].try_into().expect("8 bytes"),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(offset: u64, len: u32) -> [u8; HEADER_PREFIX_LEN] {
        let mut h = [0u8; HEADER_PREFIX_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[8..16].copy_from_slice(&offset.to_be_bytes());
        h[16..20].copy_from_slice(&len.to_be_bytes());
        h
    }

    #[test]
    fn header_without_backing() {
        assert_eq!(parse_header_prefix(&header(0, 0)), Some(None));
    }

    #[test]
    fn header_with_backing() {
        assert_eq!(parse_header_prefix(&header(512, 17)), Some(Some((512, 17))));
    }

    #[test]
    fn other_formats_are_not_qcow2() {
        assert_eq!(parse_header_prefix(&[0u8; HEADER_PREFIX_LEN]), None);
    }

    #[test]
    fn reads_backing_name_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qcow2");
        let name = b"../abc-base/disk.qcow2";
        let mut bytes = header(100, name.len() as u32).to_vec();
        bytes.resize(100, 0);
        bytes.extend_from_slice(name);
        fs_err::write(&path, &bytes).unwrap();
        assert_eq!(
            read_backing(&path).unwrap(),
            Backing::File("../abc-base/disk.qcow2".into())
        );
        fs_err::write(&path, b"raw").unwrap();
        assert_eq!(read_backing(&path).unwrap(), Backing::NotQcow2);
    }

    #[test]
    fn reads_the_virtual_size_qemu_img_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg("96M")
            .status()
            .expect("qemu-img (scripts/setup.sh installs it)");
        assert!(made.success());
        assert_eq!(read_virtual_size(&path).unwrap(), Some(96 << 20));
        fs_err::write(&path, [0u8; 64]).unwrap();
        assert_eq!(read_virtual_size(&path).unwrap(), None);
    }
}
