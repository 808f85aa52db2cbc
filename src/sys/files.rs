//! Files replaced whole: written beside their final name, under a temporary name that no
//! other writer uses (another farm, or another thread of this one), synced, then renamed
//! over it. A reader never sees half a file, and two writers of one file never write into
//! the same temporary file: the last rename wins with a whole file.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Replaces `path` with `bytes`, readable per `mode`, making its directory first.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs_err::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("failed to create a file in `{}`: {e}", dir.display()),
            )
        })?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.persist(path).map_err(|e| {
        std::io::Error::new(
            e.error.kind(),
            format!(
                "failed to rename a file over `{}`: {}",
                path.display(),
                e.error
            ),
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_replacing_one_file_leave_one_whole_file_and_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("inventory.yml");
        std::thread::scope(|scope| {
            for i in 0..8u8 {
                let path = &path;
                scope.spawn(move || replace_file(path, &[i; 4096], 0o600).unwrap());
            }
        });
        let bytes = fs_err::read(&path).unwrap();
        assert!(bytes.len() == 4096 && bytes.iter().all(|b| *b == bytes[0]));
        let mode = fs_err::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs_err::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }
}
