//! The tiny image's initramfs: busybox, the virtio modules and an `/init` that mounts the
//! disk, as a gzip'd newc cpio written in memory.

use std::io::Write;
use std::path::Path;

use super::modules::index_modules;
use super::{TinyImageError, lines};
use crate::model::build::tiny_recipe::INITRAMFS_INIT;

/// The gzip'd newc initramfs: busybox, the modules (flat, by module name) and `/init`.
pub(super) fn initramfs(
    busybox: &[u8],
    module_dir: &Path,
    modules: &[String],
) -> Result<Vec<u8>, TinyImageError> {
    let index = index_modules(module_dir)?;
    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "newroot",
        "proc",
        "sys",
        "run",
        "tmp",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before anything can mount devtmpfs.
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.char_device("dev/null", 0o666, 1, 3);
    cpio.file("bin/busybox", 0o755, busybox);
    cpio.file("init", 0o755, INITRAMFS_INIT.as_bytes());
    cpio.file("etc/farm-modules", 0o644, lines(modules).as_bytes());
    for module in modules {
        let path = &index[module];
        cpio.file(
            &format!("lib/modules/{module}.ko"),
            0o644,
            &fs_err::read(path)?,
        );
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&cpio.finish())?;
    Ok(gz.finish()?)
}

/// A newc ("070701") cpio archive in memory: just what an initramfs needs. Every entry is
/// owned by root with mtime 0, so the same inputs give the same bytes.
#[derive(Default)]
pub struct Cpio {
    data: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            body.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, perm: u32, body: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), body);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, (0, 0), target.as_bytes());
    }

    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | perm, (major, minor), &[]);
    }

    /// The archive with its `TRAILER!!!` entry.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_newc_with_trailer() {
        let mut cpio = Cpio::default();
        cpio.dir("bin");
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        cpio.symlink("bin/sh", "busybox");
        let data = cpio.finish();
        assert!(data.starts_with(b"070701"));
        assert_eq!(data.len() % 4, 0);
        let text = String::from_utf8_lossy(&data);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
    }
}
