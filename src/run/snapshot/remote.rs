//! The saved VMs of remote hosts stay on their host: each one's frozen overlay and machine
//! state become an entry of the host's own store (gigabytes are not carried to this
//! machine and back, and a state loads only where its qemu is). The entry backs onto the
//! VM's layer (or the snapshot it was restored from) there by a relative path, as local entries do; this machine keeps the VM's
//! records in the snapshot's directory and the manifest names the host.

use super::*;
use crate::model::build::qemu_img::QemuImg;
use crate::model::hash::ContentHash;
use crate::model::shell::{quote_path, shell_quote};

/// Where a remote VM's machine state is written while it is saved.
pub(super) fn state_file(store: &HostStore, snapshot: &str, vm: &str) -> PathBuf {
    store
        .root
        .join("tmp")
        .join(format!("snapshot-{snapshot}-{vm}.{STATE_FILE}"))
}

/// A saved VM's entry directory in its host's store.
pub(super) fn entry_dir(store: &HostStore, entry: &str) -> PathBuf {
    store.root.join("store").join(entry)
}

/// Makes the host's store ready to receive a state, and says how much room it has.
pub(super) fn prepare(host: &dyn Host, store: &HostStore, vm: &str) -> Result<u64, SnapshotError> {
    let tmp = store.root.join("tmp");
    let out = instance::check(
        host,
        vm,
        "Preparing the host's store for the snapshot",
        &format!(
            "mkdir -p {tmp} && df -Pk {tmp} | awk 'NR==2 {{ print $4 }}'",
            tmp = quote_path(&tmp)
        ),
    )?;
    Ok(out.trim().parse::<u64>().map_or(u64::MAX, |kib| kib << 10))
}

/// A remote VM's entry, staged on its host and ready to commit.
pub(super) struct RemoteStaged {
    pub saved: SavedVm,
    host: Arc<dyn Host>,
    staging: PathBuf,
    dir: PathBuf,
}

/// Stages a remote VM's entry on its host: a copy of its overlay rebased onto the entry it
/// backs onto there (its layer, or the snapshot it was restored from; the original stays
/// until the commit: a failure loses nothing), its state and the entry's metadata.
pub(super) fn stage(
    host: &Arc<dyn Host>,
    store: &HostStore,
    state_file: &Path,
    v: StageVm<'_>,
) -> Result<RemoteStaged, SnapshotError> {
    let started = Instant::now();
    let spec = &v.record.spec;
    let disk = spec.paths.disk();
    let hashes = instance::check(
        &**host,
        v.vm,
        "Hashing the saved disk and state",
        &format!(
            "b3sum --no-names {disk} {state} && stat -c %s {state}",
            disk = quote_path(&disk),
            state = quote_path(state_file)
        ),
    )?;
    let [disk_hash, state_hash, state_bytes] = words(&hashes, v.vm)?;
    let info = instance::check(
        &**host,
        v.vm,
        "Reading what the overlay backs onto",
        &format!("qemu-img info -U --output=json {}", quote_path(&disk)),
    )?;
    let backing = serde_json::from_str::<serde_json::Value>(&info)
        .ok()
        .and_then(|info| info["backing-filename"].as_str().map(PathBuf::from));
    let parent = disk_parent(v.vm, backing.as_deref()).map_err(SnapshotError::Failed)?;
    let derivation = entry_derivation(
        v.snapshot, v.vm, &parent, disk_hash, state_hash, v.topology, v.qemu,
    );
    let key = entry_key(&derivation);
    let label = entry_name(v.vm);
    let dir_name = crate::store::entry_dir_name(&key, &label);
    let dir = entry_dir(store, &dir_name);
    let staging = store.root.join("tmp").join(format!("{dir_name}.partial"));
    let backing = Path::new("..").join(&parent).join(crate::store::DISK_FILE);
    let copied = instance::check(
        &**host,
        v.vm,
        "Staging the snapshot in the host's store",
        &format!(
            "set -e; rm -rf {s}; mkdir -p {s}
             cp --sparse=always {disk} {s}/disk.qcow2
             {rebase}
             mv {state} {s}/{STATE_FILE}
             mkdir -p {s}/{VMS_DIR}/{vm}
             for f in {dir}/*; do
               case ${{f##*/}} in disk.qcow2|qemu.pid|qmp.sock|qemu.stderr|serial.log) ;;
                 *) if [ -f \"$f\" ]; then cp -p \"$f\" {s}/{VMS_DIR}/{vm}/; fi ;; esac
             done
             b3sum --no-names {s}/disk.qcow2; stat -c %s {s}/disk.qcow2",
            s = quote_path(&staging),
            disk = quote_path(&disk),
            rebase = QemuImg::RebaseUnsafe {
                disk: &staging.join(crate::store::DISK_FILE),
                backing: &backing
            }
            .script(),
            state = quote_path(state_file),
            vm = shell_quote(v.vm),
            dir = quote_path(&spec.paths.dir),
        ),
    )?;
    let [output, size] = words(&copied, v.vm)?;
    let output = output
        .parse::<ContentHash>()
        .map_err(|e| SnapshotError::Failed(format!("VM `{}`: {e}", v.vm)))?;
    let size = size.parse().unwrap_or_default();
    let meta = entry_meta(label, key, derivation, (output, size), &parent, started);
    let json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
    host.put(&json, &staging.join(crate::store::META_FILE), 0o644)?;
    Ok(RemoteStaged {
        saved: SavedVm {
            name: v.vm.to_string(),
            entry: dir_name,
            disk_bytes: meta.size,
            state_bytes: state_bytes.parse().unwrap_or_default(),
            host: Some(host.name().to_string()),
            host_qemu: Some(v.qemu.to_string()),
        },
        host: host.clone(),
        staging,
        dir,
    })
}

/// The first `N` whitespace-separated words of a command's output.
fn words<'a, const N: usize>(text: &'a str, vm: &str) -> Result<[&'a str; N], SnapshotError> {
    let found: Vec<&str> = text.split_whitespace().take(N).collect();
    found.try_into().map_err(|_| {
        SnapshotError::Failed(format!(
            "Cannot read the saved disk and state of VM `{vm}` on its host: `{}`",
            text.trim()
        ))
    })
}

impl RemoteStaged {
    /// Writes the manifest into the entry and renames it into the host's store. The overlay
    /// its disk copies stays until the VM has quit (`save`): a save that fails after this
    /// resumes the VM on it.
    pub(super) fn commit(self, manifest: &[u8]) -> Result<(), SnapshotError> {
        self.host
            .put(manifest, &self.staging.join(MANIFEST_FILE), 0o644)?;
        instance::check(
            &*self.host,
            &self.saved.name,
            "Committing the snapshot to the host's store",
            &format!(
                "set -e; mkdir -p {store}
                 if [ -e {dir}/meta.json ]; then rm -rf {s}; else rm -rf {dir}; mv {s} {dir}; fi",
                store = quote_path(self.dir.parent().unwrap_or(Path::new("/"))),
                dir = quote_path(&self.dir),
                s = quote_path(&self.staging),
            ),
        )?;
        Ok(())
    }
}

/// Why the entry of `saved` cannot be restored from its host, if it cannot.
pub(super) fn missing(
    host: &dyn Host,
    store: &HostStore,
    saved: &SavedVm,
) -> Result<Option<String>, SnapshotError> {
    let dir = entry_dir(store, &saved.entry);
    let script = format!(
        "test -f {d}/meta.json && test -f {d}/disk.qcow2 && test -f {d}/{STATE_FILE}",
        d = quote_path(&dir)
    );
    if host.run(&script)?.success() {
        return Ok(None);
    }
    Ok(Some(format!(
        "Snapshot needs `{}` on host `{}` (VM `{}`), which is not there\nhint: save the snapshot again",
        dir.display(),
        host.name(),
        saved.name
    )))
}

/// Whether a running VM's overlay on the host backs onto `saved`'s entry.
pub(super) fn in_use(
    host: &dyn Host,
    saved: &SavedVm,
    spec: &InstanceSpec,
) -> Result<bool, SnapshotError> {
    if !instance::is_running(host, &spec.paths, &saved.name)? {
        return Ok(false);
    }
    let script = format!(
        "{info} 2>/dev/null | grep -qF {entry}",
        info = QemuImg::Info {
            disk: &spec.paths.disk()
        }
        .script(),
        entry = shell_quote(&saved.entry)
    );
    Ok(host.run(&script)?.success())
}

/// Removes `saved`'s entry from its host's store.
pub(super) fn remove(
    host: &dyn Host,
    store: &HostStore,
    saved: &SavedVm,
) -> Result<(), SnapshotError> {
    let dir = entry_dir(store, &saved.entry);
    instance::check(
        host,
        &saved.name,
        "Removing the snapshot from the host's store",
        &format!("rm -rf {}", quote_path(&dir)),
    )?;
    Ok(())
}
