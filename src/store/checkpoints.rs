//! Build-step checkpoints: the build disk after each step of a platform layer's build, kept
//! so a rebuild that changes step N resumes from step N-1 instead of from the parent.
//!
//! ```text
//! <root>/steps/<parent entry>/<key>/disk.qcow2   backing: ../<previous key>/disk.qcow2,
//!                                                 or the parent's disk for the first step
//! <root>/steps/<parent entry>/<key>/boot/        the kernel the guest booted next, when a
//!                                                 step changed it (direct-boot images)
//! <root>/steps/<parent entry>/<key>/vm/          the build VM's machine state right after the
//!                                                 step, and what loading it needs
//! <root>/steps/<parent entry>/<key>/meta.json    key, previous key, step label
//! ```
//!
//! Keys come from `crate::model::build::build_steps::checkpoint_keys`: a key covers its step and
//! every one before it, so a checkpoint's backing chain holds exactly its prefix. Checkpoints
//! are grouped by parent entry so `farm gc` drops a group with its parent, and a chain never
//! leaves its group. They are a local build cache only: no layer, closure or export ever
//! backs onto one (a finished layer is squashed onto its parent), so chains seen by
//! instances stay one layer per platform whatever the number of steps.
//!
//! Commits are lock-free: a checkpoint directory is renamed into place whole. When two builds
//! make the same key, the second finds it there and keeps nothing from that step on, since
//! its later checkpoints back onto its own copy, not the one that won.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::entry::{DISK_FILE, Entry, META_FILE};
use super::{STORE_DIR, Store, StoreError, fsutil};
use crate::model::hash::ContentHash;

pub(crate) const STEPS_DIR: &str = "steps";
const VM_DIR: &str = "vm";
/// The build's ssh key in a saved machine state: readable by its owner only.
const VM_KEY: &str = "id_ed25519";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub key: ContentHash,
    /// The checkpoint this one backs onto; `None` for a build's first step (the parent).
    pub previous: Option<ContentHash>,
    /// The step whose result this is, for people reading the store.
    pub label: String,
    pub created_unix: u64,
}

/// A committed checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub meta: CheckpointMeta,
}

impl Checkpoint {
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join(DISK_FILE)
    }

    /// The boot files the guest boots with after this step, when a step changed them.
    pub fn boot_dir(&self) -> Option<PathBuf> {
        Some(self.dir.join(super::BOOT_DIR)).filter(|d| d.join("vmlinuz").is_file())
    }

    /// The build VM's saved machine state, when one was kept.
    pub fn vm_dir(&self) -> Option<PathBuf> {
        Some(self.dir.join(VM_DIR)).filter(|d| d.is_dir())
    }
}

impl Store {
    /// The group of checkpoints of builds on `parent`.
    pub fn checkpoints_dir(&self, parent: &Entry) -> PathBuf {
        self.root.join(STEPS_DIR).join(parent.dir_name())
    }

    /// The backing path a checkpoint's disk records: relative, so the store can move.
    pub fn checkpoint_backing(&self, parent: &Entry, previous: Option<&ContentHash>) -> PathBuf {
        match previous {
            Some(key) => Path::new("..").join(key.to_hex()).join(DISK_FILE),
            None => Path::new("../../..")
                .join(STORE_DIR)
                .join(parent.dir_name())
                .join(DISK_FILE),
        }
    }

    /// The checkpoint of `key`, if committed.
    pub fn checkpoint(&self, parent: &Entry, key: &ContentHash) -> Option<Checkpoint> {
        let dir = self.checkpoints_dir(parent).join(key.to_hex());
        let text = fs_err::read_to_string(dir.join(META_FILE)).ok()?;
        let meta: CheckpointMeta = serde_json::from_str(&text).ok()?;
        (meta.key == *key && dir.join(DISK_FILE).is_file()).then_some(Checkpoint { dir, meta })
    }

    /// How many steps of `keys` can be skipped, and the checkpoint to resume from: the
    /// longest prefix whose checkpoints are all committed.
    pub fn resume_point(
        &self,
        parent: &Entry,
        keys: &[ContentHash],
    ) -> Option<(usize, Checkpoint)> {
        let mut found = None;
        for (i, key) in keys.iter().enumerate() {
            match self.checkpoint(parent, key) {
                Some(checkpoint) => found = Some((i + 1, checkpoint)),
                None => break,
            }
        }
        found
    }

    /// Moves `disk` (already backed by [`Store::checkpoint_backing`]), `boot` and `vm` into
    /// the store as the checkpoint `meta.key`. `Ok(false)` when that key was committed
    /// meanwhile by another build: the caller must commit none of its later checkpoints.
    pub fn commit_checkpoint(
        &self,
        parent: &Entry,
        meta: &CheckpointMeta,
        disk: &Path,
        boot: Option<&Path>,
        vm: Option<&Path>,
    ) -> Result<bool, StoreError> {
        let group = self.checkpoints_dir(parent);
        fs_err::create_dir_all(&group)?;
        let target = group.join(meta.key.to_hex());
        if target.exists() {
            return Ok(false);
        }
        let staging = group.join(format!(".tmp-{}-{}", meta.key.to_hex(), std::process::id()));
        if staging.exists() {
            fsutil::remove_tree(&staging)?;
        }
        fs_err::create_dir_all(&staging)?;
        let staged_disk = staging.join(DISK_FILE);
        fs_err::rename(disk, &staged_disk)?;
        if let Some(boot) = boot {
            let dest = staging.join(super::BOOT_DIR);
            fs_err::create_dir_all(&dest)?;
            for name in ["vmlinuz", "initrd.img", "cmdline"] {
                if boot.join(name).is_file() {
                    fs_err::copy(boot.join(name), dest.join(name))?;
                }
            }
        }
        if let Some(vm) = vm {
            fs_err::rename(vm, staging.join(VM_DIR))?;
        }
        fs_err::write(
            staging.join(META_FILE),
            serde_json::to_vec_pretty(meta).expect("checkpoint metadata serializes"),
        )?;
        // Durable and read-only before it is visible: a later build backs onto it.
        fsutil::seal_tree(&staging)?;
        let key = staging.join(VM_DIR).join(VM_KEY);
        if key.exists() {
            use std::os::unix::fs::PermissionsExt;
            fs_err::set_permissions(&key, std::fs::Permissions::from_mode(0o400))?;
        }
        match fs_err::rename(&staging, &target) {
            Ok(()) => {
                fsutil::seal_dir(&target)?;
                Ok(true)
            }
            Err(_) if target.exists() => {
                fsutil::remove_tree(&staging)?;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the checkpoint groups of parents not in `live` (entry directory names), or
    /// only measures them in a dry run.
    pub fn sweep_checkpoints(
        &self,
        live: &std::collections::BTreeSet<String>,
        dry_run: bool,
    ) -> Result<super::Swept, StoreError> {
        let mut swept = super::Swept::default();
        let dir = self.root.join(STEPS_DIR);
        let Ok(groups) = fs_err::read_dir(&dir) else {
            return Ok(swept);
        };
        for group in groups {
            let group = group?;
            let name = group.file_name().to_string_lossy().into_owned();
            if live.contains(&name) {
                continue;
            }
            swept.items += 1;
            swept.bytes += Store::disk_usage(&group.path())?;
            if !dry_run {
                fsutil::remove_tree(&group.path())?;
            }
        }
        Ok(swept)
    }
}
