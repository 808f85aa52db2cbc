//! The store against a real filesystem, real `qemu-img`, real threads and real processes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use farm::model::hash::DrvHash;
use farm::store::{Entry, EntryMeta, LAYOUT_VERSION, Staging, Store, StoreError, relative_backing};
use farm::sys::qemu_img;

const MIB: u64 = 1 << 20;

/// A temporary directory that can be removed even though the store sealed parts of it
/// read-only (which matters when the tests do not run as root).
struct TestDir(tempfile::TempDir);

impl TestDir {
    fn new() -> Self {
        TestDir(tempfile::tempdir().expect("temp dir"))
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(self.0.path())
            .status();
    }
}

fn key(byte: u8) -> DrvHash {
    DrvHash([byte; 32])
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn meta_for(staging: &Staging, parent: Option<&Entry>) -> EntryMeta {
    let (output_blake3, size) = staging.hash_disk().expect("hash staged disk");
    EntryMeta {
        layout: LAYOUT_VERSION,
        name: staging.name().to_string(),
        drv_hash: *staging.key(),
        derivation: serde_json::json!({ "test": staging.name() }),
        output_blake3,
        size,
        parent: parent.map(|p| p.dir_name().to_string()),
        built_at_unix: now_unix(),
        build_seconds: 0.25,
        disk_mtime_ns: None,
        files: Default::default(),
        meta_blake3: None,
    }
}

/// What every farm process does to realise a key: look up, lock, look up again, build, commit.
/// Returns the entry and whether this call built it.
fn realise(store: &Store, key: &DrvHash, name: &str, hold: Duration) -> (Entry, bool) {
    if let Some(entry) = store.lookup(key, name).unwrap() {
        return (entry, false);
    }
    let lock = store.lock(key).unwrap();
    if let Some(entry) = store.lookup(key, name).unwrap() {
        return (entry, false);
    }
    let staging = store.stage(&lock, name).unwrap();
    qemu_img::create(&staging.disk_path(), 64 * MIB).unwrap();
    // Hold the lock long enough that a competitor certainly arrives while we build.
    std::thread::sleep(hold);
    let meta = meta_for(&staging, None);
    (store.commit(staging, meta).unwrap(), true)
}

fn mode(path: &Path) -> u32 {
    fs_err::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs_err::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn commit_then_lookup_round_trips_and_seals_the_entry() {
    let tmp = TestDir::new();
    let store = Store::open(&tmp.path().join("cache")).unwrap();
    let k = key(1);
    assert_eq!(store.lookup(&k, "base").unwrap(), None);

    let lock = store.lock(&k).unwrap();
    let staging = store.stage(&lock, "base").unwrap();
    assert!(staging.dir().starts_with(store.root().join("tmp")));
    qemu_img::create(&staging.disk_path(), 64 * MIB).unwrap();
    fs_err::create_dir(staging.boot_dir()).unwrap();
    fs_err::write(staging.boot_dir().join("cmdline"), "console=ttyS0\n").unwrap();
    let meta = meta_for(&staging, None);
    let committed = store.commit(staging, meta.clone()).unwrap();
    drop(lock);

    let dir_name = format!("{}-base", k.store_key());
    assert_eq!(committed.dir, store.root().join("store").join(&dir_name));
    assert_eq!(committed.dir_name(), dir_name);
    assert_eq!(
        committed.meta,
        EntryMeta {
            disk_mtime_ns: committed.meta.disk_mtime_ns,
            files: committed.meta.files.clone(),
            meta_blake3: committed.meta.meta_blake3,
            ..meta
        },
        "commit adds the disk's mtime, the other files' hashes and its own hash, nothing else"
    );
    assert_eq!(
        committed.meta.files.keys().collect::<Vec<_>>(),
        ["boot/cmdline"],
        "every file but the disk and meta.json is recorded"
    );
    assert_eq!(committed.meta.files["boot/cmdline"].size, 14);
    assert!(committed.meta.disk_mtime_ns.is_some());
    let found = store.lookup(&k, "base").unwrap().expect("committed entry");
    assert_eq!(found, committed);
    // Names are labels: the same derivation under another name is the same entry.
    assert_eq!(store.lookup(&k, "other").unwrap().as_ref(), Some(&found));
    assert_eq!(store.lookup(&key(2), "base").unwrap(), None);
    assert_eq!(dir_names(&store.root().join("tmp")), Vec::<String>::new());

    // Read-only, all the way down.
    assert_eq!(mode(&found.dir), 0o555);
    assert_eq!(mode(&found.disk_path()), 0o444);
    assert_eq!(mode(&found.dir.join("meta.json")), 0o444);
    let boot = found.boot_dir().expect("boot dir");
    assert_eq!(mode(&boot), 0o555);
    assert_eq!(mode(&boot.join("cmdline")), 0o444);

    // meta.json as other tools see it.
    let json: serde_json::Value =
        serde_json::from_slice(&fs_err::read(found.dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(json["layout"], 1);
    assert_eq!(json["name"], "base");
    assert_eq!(json["drv_hash"], k.to_string());
    assert_eq!(json["derivation"], serde_json::json!({ "test": "base" }));
    assert_eq!(json["output_blake3"], meta.output_blake3.to_string());
    assert_eq!(
        json["size"],
        fs_err::metadata(found.disk_path()).unwrap().len()
    );
    assert_eq!(json["parent"], serde_json::Value::Null);
    assert_eq!(json["build_seconds"], 0.25);
    assert!(json["built_at_unix"].as_u64().unwrap() > 1_700_000_000);

    assert_eq!(store.entries().unwrap(), vec![found.clone()]);
    store.verify(&found).unwrap();
    assert_eq!(
        qemu_img::info(&found.disk_path()).unwrap().virtual_size,
        64 * MIB
    );
}

#[test]
fn verify_detects_a_changed_disk() {
    let tmp = TestDir::new();
    let store = Store::open(tmp.path()).unwrap();
    let (entry, _) = realise(&store, &key(3), "base", Duration::ZERO);
    let disk = entry.disk_path();
    fs_err::set_permissions(&disk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs_err::read(&disk).unwrap();
    bytes[1000] ^= 1;
    fs_err::write(&disk, &bytes).unwrap();
    let err = store.verify(&entry).unwrap_err();
    assert!(matches!(err, StoreError::Modified { .. }), "{err}");
    assert!(
        err.to_string().contains("hint: `farm store verify`"),
        "{err}"
    );
    // A build must not take it for cached.
    let looked_up = store.lookup_intact(&key(3), "base").unwrap_err();
    assert!(
        matches!(looked_up, StoreError::Modified { .. }),
        "{looked_up}"
    );
}

#[test]
fn dropped_staging_leaves_nothing() {
    let tmp = TestDir::new();
    let store = Store::open(tmp.path()).unwrap();
    let k = key(4);
    let lock = store.lock(&k).unwrap();
    {
        let staging = store.stage(&lock, "base").unwrap();
        qemu_img::create(&staging.disk_path(), MIB).unwrap();
        fs_err::create_dir(staging.boot_dir()).unwrap();
        fs_err::write(staging.boot_dir().join("vmlinuz"), b"kernel").unwrap();
        fs_err::set_permissions(staging.boot_dir(), std::fs::Permissions::from_mode(0o555))
            .unwrap();
        assert_eq!(dir_names(&store.root().join("tmp")).len(), 1);
    }
    assert_eq!(dir_names(&store.root().join("tmp")), Vec::<String>::new());
    assert_eq!(dir_names(&store.root().join("store")), Vec::<String>::new());

    // A refused commit is an error path too: it must not leave its staging dir behind.
    let staging = store.stage(&lock, "base").unwrap();
    qemu_img::create(&staging.disk_path(), MIB).unwrap();
    let mut meta = meta_for(&staging, None);
    meta.size += 1;
    let err = store.commit(staging, meta).unwrap_err();
    assert!(matches!(err, StoreError::InvalidCommit { .. }), "{err}");
    assert!(err.to_string().contains("hint: "), "{err}");
    assert_eq!(dir_names(&store.root().join("tmp")), Vec::<String>::new());
    assert_eq!(dir_names(&store.root().join("store")), Vec::<String>::new());
    assert_eq!(store.lookup(&k, "base").unwrap(), None);
}

#[test]
fn stale_staging_dirs_are_swept() {
    let tmp = TestDir::new();
    let store = Store::open(tmp.path()).unwrap();
    let k = key(5);
    let tmp_dir = store.root().join("tmp");

    // What a farm killed mid-commit leaves: read-only files, a sealed subdirectory.
    let make_stale = |dir: &Path| {
        fs_err::create_dir_all(dir.join("boot")).unwrap();
        fs_err::write(dir.join("disk.qcow2"), b"half").unwrap();
        fs_err::write(dir.join("boot/vmlinuz"), b"k").unwrap();
        for file in ["disk.qcow2", "boot/vmlinuz"] {
            fs_err::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o444))
                .unwrap();
        }
        fs_err::set_permissions(dir.join("boot"), std::fs::Permissions::from_mode(0o555)).unwrap();
    };
    let stale_same_key = tmp_dir.join(format!("{}-base.999999.deadbeef", k.store_key()));
    let stale_other_name = tmp_dir.join(format!("{}-renamed.999998.cafe", k.store_key()));
    let stale_other_key = tmp_dir.join(format!("{}-base.999997.f00d", key(6).store_key()));
    for dir in [&stale_same_key, &stale_other_name, &stale_other_key] {
        make_stale(dir);
    }

    let lock = store.lock(&k).unwrap();
    let staging = store.stage(&lock, "base").unwrap();
    let mut left = dir_names(&tmp_dir);
    left.retain(|n| !staging.dir().ends_with(n));
    assert_eq!(
        left,
        vec![stale_other_key.file_name().unwrap().to_string_lossy()]
    );

    // The sweep for gc: the other key is free, so its leftover goes; ours is locked, so the
    // live staging dir stays.
    assert_eq!(store.sweep_tmp(false).unwrap().items, 1);
    assert_eq!(
        dir_names(&tmp_dir),
        vec![staging.dir().file_name().unwrap().to_string_lossy()]
    );
    drop(staging);
    assert_eq!(dir_names(&tmp_dir), Vec::<String>::new());
}

#[test]
fn committing_an_existing_entry_returns_it_and_discards_the_staging() {
    let tmp = TestDir::new();
    let store = Store::open(tmp.path()).unwrap();
    let k = key(7);
    let lock = store.lock(&k).unwrap();
    let first = store.stage(&lock, "base").unwrap();
    qemu_img::create(&first.disk_path(), 64 * MIB).unwrap();
    let meta = meta_for(&first, None);
    let first = store.commit(first, meta).unwrap();

    let second = store.stage(&lock, "base").unwrap();
    qemu_img::create(&second.disk_path(), 128 * MIB).unwrap();
    let meta = meta_for(&second, None);
    assert_eq!(store.commit(second, meta).unwrap(), first);
    assert_eq!(dir_names(&store.root().join("tmp")), Vec::<String>::new());
    assert_eq!(store.entries().unwrap(), vec![first]);
}

#[test]
fn two_threads_realising_one_key_make_one_entry() {
    let tmp = TestDir::new();
    let store = Store::open(tmp.path()).unwrap();
    let k = key(8);
    let barrier = Arc::new(Barrier::new(2));
    let builds = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (store, barrier, builds) = (store.clone(), barrier.clone(), builds.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let (entry, built) = realise(&store, &k, "base", Duration::from_millis(300));
                builds.fetch_add(usize::from(built), Ordering::SeqCst);
                entry
            })
        })
        .collect();
    let entries: Vec<Entry> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(builds.load(Ordering::SeqCst), 1);
    assert_eq!(entries[0], entries[1]);
    assert_eq!(store.entries().unwrap(), vec![entries[0].clone()]);
    assert_eq!(dir_names(&store.root().join("tmp")), Vec::<String>::new());
    store.verify(&entries[0]).unwrap();
}

const CHILD_ROOT_ENV: &str = "FARM_STORE_TEST_CHILD_ROOT";
const CHILD_START_ENV: &str = "FARM_STORE_TEST_CHILD_START_MS";
const CHILD_RESULT: &str = "FARM_STORE_TEST_CHILD_RESULT";

/// The child half of `two_processes_realising_one_key_make_one_entry`: does nothing in a normal
/// test run, realises the key when started by that test with the env vars set.
#[test]
fn child_process_helper() {
    let Ok(root) = std::env::var(CHILD_ROOT_ENV) else {
        return;
    };
    let start_ms: u128 = std::env::var(CHILD_START_ENV).unwrap().parse().unwrap();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    // Both children start at the same instant, whatever their spawn latency.
    if let Some(wait) = start_ms.checked_sub(now_ms) {
        std::thread::sleep(Duration::from_millis(wait as u64));
    }
    let store = Store::open(Path::new(&root)).unwrap();
    let (entry, built) = realise(&store, &key(9), "base", Duration::from_millis(500));
    println!("\n{CHILD_RESULT} built={built} dir={}", entry.dir.display());
}

#[test]
fn two_processes_realising_one_key_make_one_entry() {
    let tmp = TestDir::new();
    let root = tmp.path().join("cache");
    let store = Store::open(&root).unwrap();
    let start_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 1500;
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "store::child_process_helper",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ROOT_ENV, &root)
                .env(CHILD_START_ENV, start_ms.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut results = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.split_once(CHILD_RESULT).map(|(_, rest)| rest))
            .unwrap_or_else(|| panic!("no result line in child output: {stdout}"));
        let (built, dir) = line
            .trim()
            .strip_prefix("built=")
            .and_then(|l| l.split_once(" dir="))
            .unwrap();
        results.push((built == "true", PathBuf::from(dir)));
    }
    assert_eq!(
        results.iter().filter(|(built, _)| *built).count(),
        1,
        "{results:?}"
    );
    assert_eq!(results[0].1, results[1].1);
    let entries = store.entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].dir, results[0].1);
    assert_eq!(dir_names(&store.root().join("tmp")), Vec::<String>::new());
}

/// Commits a base layer and a child overlay on it, as the builder does.
fn base_and_child(store: &Store) -> (Entry, Entry) {
    let (base, _) = realise(store, &key(10), "base", Duration::ZERO);
    let k = key(11);
    let lock = store.lock(&k).unwrap();
    let staging = store.stage(&lock, "child").unwrap();
    // Built against the absolute path (the relative one only resolves from store/), then
    // rebased to the relative path the store keeps.
    qemu_img::create_overlay(&staging.disk_path(), &base.disk_path(), None).unwrap();
    qemu_img::rebase_unsafe(&staging.disk_path(), &relative_backing(&base)).unwrap();
    let meta = meta_for(&staging, Some(&base));
    let child = store.commit(staging, meta).unwrap();
    (base, child)
}

#[test]
fn a_moved_store_keeps_its_backing_chains() {
    let tmp = TestDir::new();
    let root = tmp.path().join("cache");
    let store = Store::open(&root).unwrap();
    let (base, child) = base_and_child(&store);
    assert_eq!(child.meta.parent.as_deref(), Some(base.dir_name()));
    drop(store);

    let moved_parent = tmp.path().join("elsewhere");
    fs_err::create_dir(&moved_parent).unwrap();
    let status = Command::new("mv")
        .arg(&root)
        .arg(&moved_parent)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!root.exists());

    let store = Store::open(&moved_parent.join("cache")).unwrap();
    let child = store
        .lookup(&key(11), "child")
        .unwrap()
        .expect("moved child");
    let chain = qemu_img::backing_chain(&child.disk_path()).unwrap();
    assert_eq!(chain.len(), 2, "{chain:?}");
    let expected_backing = format!("../{}/disk.qcow2", base.dir_name());
    assert_eq!(
        chain[0].backing_filename.as_deref(),
        Some(expected_backing.as_str())
    );
    assert_eq!(chain[0].backing_filename_format.as_deref(), Some("qcow2"));
    assert_eq!(chain[1].backing_filename, None);
    assert_eq!(chain[1].virtual_size, 64 * MIB);
    let base_disk = fs_err::canonicalize(&chain[1].filename).unwrap();
    assert_eq!(
        base_disk,
        store.lookup(&key(10), "base").unwrap().unwrap().disk_path()
    );
    qemu_img::check(&child.disk_path()).unwrap();
    for entry in store.entries().unwrap() {
        store.verify(&entry).unwrap();
    }
}

#[test]
fn commit_refuses_a_layer_whose_backing_would_break_on_move() {
    let tmp = TestDir::new();
    let store = Store::open(tmp.path()).unwrap();
    let (base, _) = realise(&store, &key(12), "base", Duration::ZERO);
    let k = key(13);
    let lock = store.lock(&k).unwrap();

    // Absolute backing path, never rebased.
    let staging = store.stage(&lock, "child").unwrap();
    qemu_img::create_overlay(&staging.disk_path(), &base.disk_path(), None).unwrap();
    let meta = meta_for(&staging, Some(&base));
    let err = store.commit(staging, meta).unwrap_err().to_string();
    assert!(err.contains("so the store can move"), "{err}");
    assert!(err.contains("hint: run `qemu-img rebase -u"), "{err}");

    // A backing file but no declared parent.
    let staging = store.stage(&lock, "child").unwrap();
    qemu_img::create_overlay(&staging.disk_path(), &base.disk_path(), None).unwrap();
    qemu_img::rebase_unsafe(&staging.disk_path(), &relative_backing(&base)).unwrap();
    let meta = meta_for(&staging, None);
    let err = store.commit(staging, meta).unwrap_err().to_string();
    assert!(err.contains("names no parent"), "{err}");

    // Not qcow2 at all.
    let staging = store.stage(&lock, "child").unwrap();
    fs_err::write(staging.disk_path(), b"raw bytes").unwrap();
    let meta = meta_for(&staging, None);
    let err = store.commit(staging, meta).unwrap_err().to_string();
    assert!(err.contains("is not a qcow2 image"), "{err}");

    assert_eq!(store.lookup(&k, "child").unwrap(), None);
    assert_eq!(dir_names(&store.root().join("tmp")), Vec::<String>::new());
}

#[test]
fn a_store_with_a_newer_layout_is_refused() {
    let tmp = TestDir::new();
    let root = tmp.path().join("cache");
    fs_err::create_dir(&root).unwrap();
    fs_err::write(root.join("farm-store.json"), r#"{"layout": 2}"#).unwrap();
    let err = Store::open(&root).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NewerLayout {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.starts_with("The store at `"), "{msg}");
    assert!(msg.contains("has layout 2"), "{msg}");
    assert!(msg.contains("hint: upgrade farm"), "{msg}");
    // Nothing was written into a store this farm does not understand.
    assert_eq!(dir_names(&root), vec!["farm-store.json".to_string()]);
}

#[test]
fn a_damaged_entry_is_reported_not_ignored() {
    let tmp = TestDir::new();
    let store = Store::open(tmp.path()).unwrap();
    let k = key(14);
    fs_err::create_dir(
        store
            .root()
            .join("store")
            .join(format!("{}-base", k.store_key())),
    )
    .unwrap();
    let err = store.lookup(&k, "base").unwrap_err();
    assert!(matches!(err, StoreError::CorruptEntry { .. }), "{err}");
    assert!(err.to_string().contains("has no `meta.json`"), "{err}");
}

fn write_pattern(disk: &Path, offset_mib: u64, byte: u8) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P {byte} {offset_mib}M 1M"))
        .arg(disk)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn checkpoint_meta(key: u8, previous: Option<u8>) -> farm::store::CheckpointMeta {
    farm::store::CheckpointMeta {
        key: farm::model::hash::ContentHash([key; 32]),
        previous: previous.map(|p| farm::model::hash::ContentHash([p; 32])),
        label: format!("step {key}"),
        created_unix: now_unix(),
    }
}

/// Two steps' checkpoints committed as a build does (frozen in a work directory, backing
/// paths made relative, moved in in order): a resume finds the longest prefix, the chain
/// reads what each step wrote, a key committed twice keeps the first, and gc's sweep drops
/// the group with its parent.
#[test]
fn step_checkpoints_chain_resume_and_go_with_their_parent() {
    let dir = TestDir::new();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let (parent, _) = realise(&store, &key(1), "base", Duration::ZERO);
    let work = dir.path().join("work");
    fs_err::create_dir_all(&work).unwrap();
    let (ck0, ck1) = (work.join("ck-0.qcow2"), work.join("ck-1.qcow2"));
    qemu_img::create_overlay(&ck0, &parent.disk_path(), None).unwrap();
    write_pattern(&ck0, 1, 0xa1);
    qemu_img::create_overlay(&ck1, &ck0, None).unwrap();
    write_pattern(&ck1, 2, 0xb2);

    let (first, second) = (checkpoint_meta(10, None), checkpoint_meta(11, Some(10)));
    for (disk, meta) in [(&ck0, &first), (&ck1, &second)] {
        let backing = store.checkpoint_backing(&parent, meta.previous.as_ref());
        qemu_img::rebase_unsafe(disk, &backing).unwrap();
        assert!(
            store
                .commit_checkpoint(&parent, meta, disk, None, None)
                .unwrap()
        );
    }
    let keys = [
        first.key,
        second.key,
        farm::model::hash::ContentHash([12; 32]),
    ];
    let (skipped, resume) = store.resume_point(&parent, &keys).unwrap();
    assert_eq!(skipped, 2);
    assert_eq!(resume.meta, second);
    // The committed chain resolves inside the store and reads both steps' writes.
    let chain = qemu_img::backing_chain(&resume.disk_path()).unwrap();
    assert_eq!(chain.len(), 3, "{chain:?}");
    for (offset, byte) in [(1, 0xa1), (2, 0xb2)] {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-r", "-c"])
            .arg(format!("read -P {byte} {offset}M 1M"))
            .arg(resume.disk_path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("Pattern verification failed"), "{text}");
    }
    assert_eq!(
        mode(&resume.disk_path()) & 0o222,
        0,
        "checkpoints are sealed"
    );

    // Another build's copy of the same key is not taken: its successors would not match.
    let again = work.join("again.qcow2");
    qemu_img::create_overlay(&again, &parent.disk_path(), None).unwrap();
    assert!(
        !store
            .commit_checkpoint(&parent, &first, &again, None, None)
            .unwrap()
    );
    // A changed first step resumes nothing.
    assert!(store.resume_point(&parent, &keys[2..]).is_none());

    let live: std::collections::BTreeSet<String> = ["other".to_string()].into();
    let swept = store.sweep_checkpoints(&live, false).unwrap();
    assert_eq!(swept.items, 1);
    assert!(!store.checkpoints_dir(&parent).exists());
}
