//! Store entries made directly through the library, for tests of what reads the store
//! (verify, export, import): real qcow2 disks and chains from qemu-img, and boot files.

use std::process::Command;

use farm::model::build::derivation::hash_of_json;
use farm::model::hash::DrvHash;
use farm::store::{Entry, EntryMeta, LAYOUT_VERSION, Staging, Store, relative_backing};
use farm::sys::qemu_img;

const MIB: u64 = 1 << 20;

/// Commits an entry `name` whose derivation is a JSON object (so its key is a real
/// derivation hash): a 32 MiB disk holding 2 MiB of data, or an overlay on `parent` with a
/// relative backing file; with `boot/vmlinuz` and `boot/cmdline` when `kernel` is given.
pub fn commit(store: &Store, name: &str, parent: Option<&Entry>, kernel: Option<&[u8]>) -> Entry {
    commit_with_data(store, name, parent, kernel, 0x61)
}

/// As `commit`, with the base disk's 2 MiB of data made of byte `pattern`: the same
/// derivation with other bytes, as a non-reproducible build elsewhere gives.
pub fn commit_with_data(
    store: &Store,
    name: &str,
    parent: Option<&Entry>,
    kernel: Option<&[u8]>,
    pattern: u8,
) -> Entry {
    let derivation = serde_json::json!({ "test": name, "parent": parent.map(|p| p.dir_name()) });
    let key = hash_of_json(&derivation);
    let lock = store.lock(&key).unwrap();
    let staging = store.stage(&lock, name).unwrap();
    match parent {
        Some(parent) => {
            qemu_img::create_overlay(&staging.disk_path(), &parent.disk_path(), None).unwrap();
            qemu_img::rebase_unsafe(&staging.disk_path(), &relative_backing(parent)).unwrap();
        }
        None => {
            qemu_img::create(&staging.disk_path(), 32 * MIB).unwrap();
            let out = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", &format!("write -P {pattern} 1M 2M")])
                .arg(staging.disk_path())
                .output()
                .unwrap();
            assert!(out.status.success(), "qemu-io: {out:?}");
        }
    }
    if let Some(kernel) = kernel {
        fs_err::create_dir(staging.boot_dir()).unwrap();
        fs_err::write(staging.boot_dir().join("vmlinuz"), kernel).unwrap();
        fs_err::write(staging.boot_dir().join("cmdline"), "console=ttyS0\n").unwrap();
    }
    commit_staged(store, staging, name, key, derivation, parent)
}

/// Commits what `staging` holds as the entry `name` of derivation `key`.
fn commit_staged(
    store: &Store,
    staging: Staging,
    name: &str,
    key: DrvHash,
    derivation: serde_json::Value,
    parent: Option<&Entry>,
) -> Entry {
    let (output_blake3, size) = staging.hash_disk().unwrap();
    let meta = EntryMeta {
        layout: LAYOUT_VERSION,
        name: name.to_string(),
        drv_hash: key,
        derivation,
        output_blake3,
        size,
        parent: parent.map(|p| p.dir_name().to_string()),
        built_at_unix: 1,
        build_seconds: 0.5,
        disk_mtime_ns: None,
        files: Default::default(),
        meta_blake3: None,
    };
    store.commit(staging, meta).unwrap()
}

/// Commits farm's appliance for x86_64 under its real derivation and name, as a chroot
/// build leaves it, with a small blank disk instead of the tiny image (no mirror needed).
pub fn commit_appliance(store: &Store) -> Entry {
    let node = farm::model::build::derivation::appliance_node(farm::model::values::Arch::X86_64);
    let lock = store.lock(&node.hash).unwrap();
    let staging = store.stage(&lock, &node.name).unwrap();
    qemu_img::create(&staging.disk_path(), 8 * MIB).unwrap();
    let derivation = serde_json::to_value(&node.derivation).unwrap();
    commit_staged(store, staging, &node.name, node.hash, derivation, None)
}
