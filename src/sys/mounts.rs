//! Mounts left inside directories farm deletes. mmdebstrap bind-mounts the host's `/dev`,
//! `/proc` and `/sys` into the root tree it builds; a farm killed mid-build can leave them
//! there, and deleting through them would delete the host's device nodes. Anything that
//! removes a staging tree detaches such mounts first.

use std::io;
use std::path::{Path, PathBuf};

/// Mount points at or below `dir`, deepest first, from `/proc/self/mountinfo`.
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let dir = match fs_err::canonicalize(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mountinfo = fs_err::read_to_string("/proc/self/mountinfo")?;
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|mount| mount.starts_with(&dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    Ok(mounts)
}

/// Detaches (lazily) every mount at or below `dir`; an error if any is still there after.
pub fn detach_mounts_under(dir: &Path) -> io::Result<()> {
    for mount in mounts_under(dir)? {
        let c_path = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: a valid NUL-terminated path; MNT_DETACH only unhooks the mount.
        unsafe {
            libc::umount2(c_path.as_ptr(), libc::MNT_DETACH);
        }
    }
    if let Some(left) = mounts_under(dir)?.first() {
        return Err(io::Error::other(format!(
            "`{}` is still mounted inside `{}`; refusing to delete through it (hint: umount it by hand)",
            left.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// mountinfo writes space, tab, newline and backslash in paths as octal escapes (`\040`).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal_in_mountinfo_paths() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mountinfo(r"/plain\04"), r"/plain\04");
    }

    #[test]
    fn a_bind_mount_inside_a_tree_is_detached_before_deletion() {
        if !nix_root() {
            eprintln!("skipping: needs root to mount");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("rootfs/dev");
        fs_err::create_dir_all(&inner).unwrap();
        let source = tempfile::tempdir().unwrap();
        fs_err::write(source.path().join("precious"), "host data").unwrap();
        let status = std::process::Command::new("mount")
            .args(["--bind"])
            .arg(source.path())
            .arg(&inner)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(mounts_under(dir.path()).unwrap().len(), 1);
        assert!(
            !mounts_under(Path::new("/")).unwrap().is_empty(),
            "/proc is under /"
        );
        detach_mounts_under(dir.path()).unwrap();
        fs_err::remove_dir_all(dir.path().join("rootfs")).unwrap();
        assert!(
            source.path().join("precious").exists(),
            "nothing deleted through the mount"
        );
    }

    fn nix_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
