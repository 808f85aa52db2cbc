//! Checking an entry against what was recorded when it was committed: every file's hash,
//! the metadata's own hash and derivation, and the backing chain.
//!
//! A finding names the file it is about, so `farm store verify` can say "kernel of
//! `…-tiny` changed" rather than "entry damaged". Nothing here changes the store; moving a
//! damaged entry aside is `Store::set_aside`.

use std::io;
use std::path::Path;

use super::entry::relative_backing_for;
use super::{DISK_FILE, Entry, META_FILE, Store, fsutil, qcow2};
use crate::model::build::derivation::hash_of_json;
use crate::sys::qemu_img;

/// One thing wrong with an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The file it is about, relative to the entry (`disk.qcow2`, `boot/vmlinuz`, …).
    pub file: String,
    pub problem: String,
}

/// How thoroughly to look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyDepth {
    /// Also run `qemu-img check` on the disk (reads its metadata; seconds per layer).
    pub qemu_img_check: bool,
}

impl Store {
    /// Everything wrong with `entry`, empty when it is intact. An entry committed by an
    /// older farm records no hashes for its other files; only its disk and chain are checked.
    pub fn findings(&self, entry: &Entry, depth: VerifyDepth) -> io::Result<Vec<Finding>> {
        let mut findings = Vec::new();
        let mut found = |file: &str, problem: String| {
            findings.push(Finding {
                file: file.to_string(),
                problem,
            })
        };
        let meta = &entry.meta;
        if let Some(recorded) = meta.meta_blake3
            && recorded != meta.self_hash()
        {
            found(
                META_FILE,
                "its contents changed since it was committed".into(),
            );
        }
        let derivation_hash = hash_of_json(&meta.derivation);
        if derivation_hash != meta.drv_hash {
            found(
                META_FILE,
                format!(
                    "its derivation hashes to {derivation_hash}, not the {} it is stored under",
                    meta.drv_hash
                ),
            );
        }

        let disk = entry.disk_path();
        match fsutil::hash_file(&disk) {
            Ok((hash, size)) if hash == meta.output_blake3 && size == meta.size => {}
            Ok((hash, size)) => found(
                DISK_FILE,
                changed(meta.output_blake3, meta.size, hash, size),
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => found(DISK_FILE, "missing".into()),
            Err(e) => return Err(e),
        }
        for (file, record) in &meta.files {
            match fsutil::hash_file(&entry.dir.join(file)) {
                Ok((hash, size)) if hash == record.blake3 && size == record.size => {}
                Ok((hash, size)) => found(file, changed(record.blake3, record.size, hash, size)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => found(file, "missing".into()),
                Err(e) => return Err(e),
            }
        }
        if meta.meta_blake3.is_some() {
            for extra in unrecorded_files(&entry.dir, entry)? {
                found(&extra, "not recorded when the entry was committed".into());
            }
        }

        for (file, problem) in self.chain_findings(entry, depth)? {
            found(file, problem);
        }
        Ok(findings)
    }

    /// The backing chain: the disk's backing file is the recorded parent's disk, as a
    /// relative path, in qcow2 format; and qemu-img finds the image sound.
    fn chain_findings(
        &self,
        entry: &Entry,
        depth: VerifyDepth,
    ) -> io::Result<Vec<(&'static str, String)>> {
        let disk = entry.disk_path();
        if !disk.is_file() {
            return Ok(Vec::new()); // already reported as missing
        }
        let mut out = Vec::new();
        let info = match qcow2::read_info(&disk) {
            Ok(Some(info)) => info,
            Ok(None) => return Ok(vec![(DISK_FILE, "it is not a qcow2 image".into())]),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Ok(vec![(DISK_FILE, e.to_string())]);
            }
            Err(e) => return Err(e),
        };
        match (&entry.meta.parent, &info.backing) {
            (None, None) => {}
            (None, Some(backing)) => out.push((
                DISK_FILE,
                format!("it is backed by `{backing}` but its metadata names no parent"),
            )),
            (Some(parent), None) => out.push((
                DISK_FILE,
                format!("its metadata names parent `{parent}` but the disk has no backing file"),
            )),
            (Some(parent), Some(backing)) => {
                let expected = relative_backing_for(parent);
                if Path::new(backing) != expected {
                    out.push((
                        DISK_FILE,
                        format!(
                            "it is backed by `{backing}`, not its parent's disk `{}`",
                            expected.display()
                        ),
                    ));
                } else if !self.store_dir().join(parent).join(META_FILE).is_file() {
                    out.push((
                        DISK_FILE,
                        format!("its parent `{parent}` is not in the store"),
                    ));
                }
                if info.backing_format.as_deref() != Some("qcow2") {
                    out.push((
                        DISK_FILE,
                        format!(
                            "its backing format is {}, not qcow2",
                            info.backing_format
                                .map_or("not recorded".to_string(), |f| format!("`{f}`"))
                        ),
                    ));
                }
            }
        }
        if depth.qemu_img_check && out.is_empty() {
            match qemu_img::check(&disk) {
                Ok(()) => {}
                Err(qemu_img::QemuImgError::Failed { stderr, .. }) => out.push((
                    DISK_FILE,
                    format!("`qemu-img check` finds it damaged: {}", stderr.trim()),
                )),
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
        Ok(out)
    }
}

fn changed(
    expected: crate::model::hash::ContentHash,
    expected_size: u64,
    actual: crate::model::hash::ContentHash,
    actual_size: u64,
) -> String {
    if expected_size != actual_size {
        format!("its size is {actual_size} bytes, not the {expected_size} recorded")
    } else {
        format!("its content changed: {actual}, recorded {expected}")
    }
}

/// Files in the entry that are neither the disk, `meta.json`, nor recorded.
fn unrecorded_files(dir: &Path, entry: &Entry) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for child in fs_err::read_dir(&current)? {
            let path = child?.path();
            if fs_err::symlink_metadata(&path)?.is_dir() {
                pending.push(path);
                continue;
            }
            let relative = path
                .strip_prefix(dir)
                .expect("walked from dir")
                .to_string_lossy()
                .into_owned();
            if relative != DISK_FILE
                && relative != META_FILE
                && !entry.meta.files.contains_key(&relative)
            {
                out.push(relative);
            }
        }
    }
    out.sort();
    Ok(out)
}
