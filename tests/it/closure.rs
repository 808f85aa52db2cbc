//! Closure push into a host's store: incremental, verified on arrival, retried when a
//! transfer is corrupted, and never committing a corrupted entry. The "host" here is this
//! machine (a directory standing in for a hypervisor's store) behind a wrapper that can
//! damage transfers the way a bad link or disk would; the ssh transport itself is exercised
//! by the nested VM test.

use crate::support::project;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use farm::model::hash::ContentHash;
use farm::progress::Reporter;
use farm::run::closure::{HostStore, PushCompression, PushError, push_closure};
use farm::run::host::{Host, HostError, LocalHost, Output};
use farm::store::{Entry, Store};
use project::Project;

/// A local host whose first `corrupt` streams arrive with one byte flipped: a byte of the
/// first file's data (after the 512-byte tar header), as a bad link or disk would do it.
struct FlakyHost {
    inner: LocalHost,
    corrupt: AtomicU32,
}

/// Where in a stream the flipped byte goes.
const FLIPPED_AT: usize = 512 + 100;

impl Host for FlakyHost {
    fn name(&self) -> &str {
        "flaky"
    }
    fn run(&self, script: &str) -> Result<Output, HostError> {
        self.inner.run(script)
    }
    fn put(&self, bytes: &[u8], path: &Path, mode: u32) -> Result<(), HostError> {
        self.inner.put(bytes, path, mode)
    }
    fn get(&self, path: &Path) -> Result<Option<Vec<u8>>, HostError> {
        self.inner.get(path)
    }
    fn ssh_answers(&self, address: std::net::SocketAddr, timeout: std::time::Duration) -> bool {
        self.inner.ssh_answers(address, timeout)
    }
    fn with_socket(
        &self,
        remote: &Path,
        use_socket: &mut dyn FnMut(&Path),
    ) -> Result<(), HostError> {
        self.inner.with_socket(remote, use_socket)
    }
    fn run_with_input(
        &self,
        script: &str,
        input: &mut dyn std::io::Read,
        on_chunk: &mut dyn FnMut(&[u8]),
    ) -> Result<Output, HostError> {
        let damage = self
            .corrupt
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let mut stream = Vec::new();
        input.read_to_end(&mut stream).unwrap();
        if damage {
            stream[FLIPPED_AT] ^= 0xff;
        }
        self.inner
            .run_with_input(script, &mut stream.as_slice(), on_chunk)
    }
}

fn flaky(corrupt: u32) -> FlakyHost {
    FlakyHost {
        inner: LocalHost {
            name: "flaky".into(),
        },
        corrupt: AtomicU32::new(corrupt),
    }
}

/// A base image and a layer on it, built by the real binary into a project store.
fn built_chain() -> (Project, Vec<Entry>) {
    let p = Project::new(
        "[images.base]\npath = \"base.qcow2\"\n[targets.amd64]\narch = \"x86_64\"\n\
         [platforms.child]\nfrom = \"base\"\n",
    );
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(p.path().join("base.qcow2"))
        .arg("64M")
        .status()
        .unwrap();
    assert!(status.success());
    p.ok(&["build"]);
    let store = Store::open(&p.store).unwrap();
    let mut entries = store.entries().unwrap();
    // Parents first.
    entries.sort_by_key(|e| e.meta.parent.is_some());
    assert_eq!(entries.len(), 2);
    (p, entries)
}

#[test]
fn push_is_incremental_and_keeps_backing_chains() {
    for compression in [PushCompression::Off, PushCompression::Zstd] {
        incremental_push(compression);
    }
}

fn incremental_push(compression: PushCompression) {
    let (_p, entries) = built_chain();
    let remote = tempfile::tempdir().unwrap();
    let host_store = HostStore::new(remote.path());
    let refs: Vec<&Entry> = entries.iter().collect();
    let host = flaky(0);

    let first = push_closure(&host, &host_store, &refs, compression, &Reporter::hidden()).unwrap();
    assert_eq!(first.pushed.len(), 2);
    assert_eq!(first.present, 0);
    assert!(first.bytes > 0);

    // The copy's chain resolves in its new place through the relative backing path.
    let child = host_store.entry_dir(&entries[1]).join("disk.qcow2");
    let info = Command::new("qemu-img")
        .args(["info", "--backing-chain"])
        .arg(&child)
        .output()
        .unwrap();
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains(entries[0].dir_name()), "{text}");
    // Entries arrive read-only, as in the local store.
    let mode = fs_err::metadata(&child).unwrap().permissions();
    assert!(mode.readonly());

    // Everything is there: nothing moves.
    let second = push_closure(&host, &host_store, &refs, compression, &Reporter::hidden()).unwrap();
    assert!(second.pushed.is_empty());
    assert_eq!(second.present, 2);
    assert_eq!(second.bytes, 0);
}

#[test]
fn a_corrupted_transfer_is_detected_and_sent_again() {
    // Compressed, the flipped byte breaks the zstd stream rather than one file: the whole
    // stream goes again.
    for compression in [PushCompression::Off, PushCompression::Zstd] {
        corrupted_once(compression);
    }
}

fn corrupted_once(compression: PushCompression) {
    let (_p, entries) = built_chain();
    let remote = tempfile::tempdir().unwrap();
    let host_store = HostStore::new(remote.path());
    let refs: Vec<&Entry> = entries.iter().collect();
    let report = push_closure(
        &flaky(1),
        &host_store,
        &refs,
        compression,
        &Reporter::hidden(),
    )
    .unwrap();
    let sent_again = match compression {
        PushCompression::Off => 1,
        PushCompression::Zstd => entries.len() as u32,
    };
    assert_eq!(report.retries, sent_again);
    assert_eq!(report.pushed.len(), 2);
    let disk = host_store.entry_dir(&entries[0]).join("disk.qcow2");
    let mut hasher = blake3::Hasher::new();
    hasher.update(&fs_err::read(disk).unwrap());
    assert_eq!(
        ContentHash::from_blake3(hasher.finalize()),
        entries[0].meta.output_blake3
    );
}

#[test]
fn a_transfer_that_keeps_failing_commits_nothing() {
    let (_p, entries) = built_chain();
    let remote = tempfile::tempdir().unwrap();
    let host_store = HostStore::new(remote.path());
    let refs: Vec<&Entry> = entries.iter().collect();
    let err = push_closure(
        &flaky(u32::MAX),
        &host_store,
        &refs,
        PushCompression::Off,
        &Reporter::hidden(),
    )
    .expect_err("every copy arrives corrupted");
    assert!(
        matches!(err, PushError::Corrupted { attempts: 3, .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("arrived on host `flaky` corrupted 3 times")
            && message.contains("disk.qcow2: FAILED"),
        "{message}"
    );
    assert!(project::list(&remote.path().join("store")).is_empty());
}

#[test]
fn a_damaged_local_entry_is_reported_as_such_and_not_sent_again() {
    let (_p, entries) = built_chain();
    let disk = entries[0].disk_path();
    let mut perms = fs_err::metadata(&disk).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs_err::set_permissions(&disk, perms).unwrap();
    let mut bytes = fs_err::read(&disk).unwrap();
    bytes[100] ^= 0xff;
    fs_err::write(&disk, bytes).unwrap();

    let remote = tempfile::tempdir().unwrap();
    let host_store = HostStore::new(remote.path());
    let refs: Vec<&Entry> = entries.iter().collect();
    let err = push_closure(
        &flaky(0),
        &host_store,
        &refs,
        PushCompression::Off,
        &Reporter::hidden(),
    )
    .expect_err("the local disk no longer matches its metadata");
    assert!(matches!(err, PushError::LocalCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("hint: run `farm store verify`"));
    assert!(project::list(&remote.path().join("store")).is_empty());
}
