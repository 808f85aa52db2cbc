//! `farm store export` / `farm store import`: real entries, real archives, damage done to
//! the archive's bytes, and a lab brought up from an imported store inside a network
//! namespace with no route out.

use crate::support::entries;
use crate::support::project;
use crate::support::skip::require_vm;
use crate::support::test_home::shared_store;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use entries::{commit, commit_with_data};
use farm::store::{Entry, Store};
use farm::sys::qemu_img;

use project::{Project, text};

fn farm_store(store: &Path, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_farm"))
        .current_dir(dir.path())
        .arg("store")
        .args(args)
        .env("FARM_STORE", store)
        .output()
        .unwrap()
}

struct Exported {
    _dir: tempfile::TempDir,
    source: Store,
    entries: Vec<Entry>,
    archive: PathBuf,
}

/// A store with `base` ← `child` and a `kern` entry with a kernel, exported whole.
fn exported() -> Exported {
    let dir = tempfile::tempdir().unwrap();
    let source = Store::open(&dir.path().join("source")).unwrap();
    let base = commit(&source, "base", None, None);
    let child = commit(&source, "child", Some(&base), None);
    let kernel: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let kern = commit(&source, "kern", None, Some(&kernel));
    let archive = dir.path().join("lab.farm.tar.zst");
    let out = farm_store(
        source.root(),
        &[
            "export",
            child.dir_name(),
            "kern",
            "-o",
            archive.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("exported 3 entries"),
        "the child's parent comes along: {}",
        text(&out)
    );
    Exported {
        _dir: dir,
        source,
        entries: vec![base, child, kern],
        archive,
    }
}

fn empty_store_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn store_entries(root: &Path) -> Vec<String> {
    match fs_err::read_dir(root.join("store")) {
        Ok(listing) => {
            let mut names: Vec<String> = listing
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
        Err(_) => Vec::new(),
    }
}

#[test]
fn an_archive_starts_with_its_manifest_and_imports_into_an_empty_store_byte_for_byte() {
    let ex = exported();
    // Anyone can read it with tar; the manifest comes first.
    let listing = Command::new("tar")
        .args(["--zstd", "-tf"])
        .arg(&ex.archive)
        .output()
        .unwrap();
    assert!(listing.status.success(), "{}", text(&listing));
    let names = String::from_utf8_lossy(&listing.stdout);
    assert_eq!(names.lines().next(), Some("farm-export.json"), "{names}");
    assert_eq!(names.lines().count(), 1 + 2 + 2 + 4, "{names}");

    let target = empty_store_dir();
    let root = target.path().join("cache");
    let out = farm_store(&root, &["import", ex.archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("imported 3 entries added, 0 already present"),
        "{}",
        text(&out)
    );
    let imported = Store::open(&root).unwrap();
    for entry in &ex.entries {
        let copy = imported
            .lookup(&entry.meta.drv_hash, &entry.meta.name)
            .unwrap()
            .expect("imported");
        assert_eq!(copy.meta, entry.meta);
        for file in ["disk.qcow2", "meta.json"] {
            assert_eq!(
                fs_err::read(copy.dir.join(file)).unwrap(),
                fs_err::read(entry.dir.join(file)).unwrap(),
                "{file} of {}",
                entry.dir_name()
            );
        }
    }
    let verify = farm_store(&root, &["verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    // The chain resolves in its new home.
    let child = imported
        .lookup(&ex.entries[1].meta.drv_hash, "child")
        .unwrap()
        .unwrap();
    assert_eq!(
        qemu_img::backing_chain(&child.disk_path()).unwrap().len(),
        2
    );

    // A second import adds nothing and says so.
    let again = farm_store(&root, &["import", ex.archive.to_str().unwrap()]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("0 entries added, 3 already present"),
        "{}",
        text(&again)
    );
    drop(ex.source);
}

/// Decompresses, lets `edit` change the tar bytes, and compresses again: an archive whose
/// zstd frame is sound but whose content was altered.
fn altered(archive: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut tar = Vec::new();
    zstd::stream::read::Decoder::new(fs_err::File::open(archive).unwrap())
        .unwrap()
        .read_to_end(&mut tar)
        .unwrap();
    edit(&mut tar);
    let out = archive.with_extension("altered");
    let mut encoder =
        zstd::stream::write::Encoder::new(fs_err::File::create(&out).unwrap(), 3).unwrap();
    encoder.write_all(&tar).unwrap();
    encoder.finish().unwrap();
    out
}

fn assert_imports_nothing(archive: &Path, expect: &str) {
    let target = empty_store_dir();
    let root = target.path().join("cache");
    let out = farm_store(&root, &["import", archive.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(expect), "{}", text(&out));
    assert!(text(&out).contains("nothing was added"), "{}", text(&out));
    assert_eq!(store_entries(&root), Vec::<String>::new(), "nothing stored");
    assert_eq!(
        fs_err::read_dir(root.join("tmp")).unwrap().count(),
        0,
        "no scratch left behind"
    );
}

#[test]
fn a_tampered_or_truncated_archive_imports_nothing() {
    let ex = exported();

    // A byte of the child's disk changed inside the tar, the zstd frame rebuilt around it.
    let child_dir = ex.entries[1].dir_name().to_string();
    let tampered = altered(&ex.archive, |tar| {
        let member = format!("{child_dir}/disk.qcow2");
        let at = tar
            .windows(member.len())
            .position(|w| w == member.as_bytes())
            .expect("member header");
        // The header is 512 bytes; the data follows. Flip a byte of the qcow2 header's
        // padding, well inside the data.
        let header_start = at - at % 512;
        tar[header_start + 512 + 200] ^= 0x01;
    });
    assert_imports_nothing(
        &tampered,
        &format!("`{child_dir}/disk.qcow2` is not what its manifest says"),
    );

    // Cut in half: zstd or tar notices the end comes early.
    let bytes = fs_err::read(&ex.archive).unwrap();
    let truncated = ex.archive.with_extension("half");
    fs_err::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_imports_nothing(&truncated, "it ends");

    // One compressed byte flipped: zstd's checksum or the hashes catch it.
    let mut flipped_bytes = bytes.clone();
    let middle = flipped_bytes.len() / 2;
    flipped_bytes[middle] ^= 0x40;
    let flipped = ex.archive.with_extension("flipped");
    fs_err::write(&flipped, &flipped_bytes).unwrap();
    let target = empty_store_dir();
    let root = target.path().join("cache");
    let out = farm_store(&root, &["import", flipped.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(store_entries(&root), Vec::<String>::new(), "{}", text(&out));

    // A member the manifest does not list.
    let extra = altered(&ex.archive, |tar| {
        let member = format!("{child_dir}/meta.json");
        let at = tar
            .windows(member.len())
            .position(|w| w == member.as_bytes())
            .expect("member header");
        tar[at + member.len() - 4..at + member.len()]
            .copy_from_slice(b"json".map(|b| b.to_ascii_uppercase()).as_slice());
        // The header checksum must match for tar to read on.
        let header_start = at - at % 512;
        fix_tar_checksum(&mut tar[header_start..header_start + 512]);
    });
    assert_imports_nothing(&extra, "which its manifest does not list");
}

/// Recomputes a tar header's checksum after an edit.
fn fix_tar_checksum(header: &mut [u8]) {
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| b as u32).sum();
    let field = format!("{sum:06o}\0 ");
    header[148..156].copy_from_slice(field.as_bytes());
}

const LAB: &str = r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.plain]
from = "tiny"
memory = "256M"

[vms.offline]
platform = "plain"
"#;

/// Kills the lab's qemu if the test fails half way (it lives in a network namespace that
/// `farm down` from outside cannot reach).
struct KillLab(PathBuf);

impl Drop for KillLab {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(self.0.display().to_string())
            .status();
    }
}

#[test]
fn an_exported_lab_comes_up_from_an_imported_store_with_no_network() {
    if !require_vm("offline_lab", &[]) {
        return;
    }
    // The source machine: the lab built in the shared store, exported.
    let source = Project::with_store(LAB, &shared_store());
    source.ok(&["build"]);
    let archive = source.path().join("lab.tar.zst");
    let out = source.ok(&["store", "export", "-o", archive.to_str().unwrap()]);
    assert!(text(&out).contains("exported 2 entries"), "{}", text(&out));

    // The offline machine: an empty store, the archive, farm.toml — and no network.
    let offline = Project::new(LAB);
    let out = offline.ok(&["store", "import", archive.to_str().unwrap()]);
    assert!(text(&out).contains("2 entries added"), "{}", text(&out));
    let entries = offline.entries();
    let _kill = KillLab(offline.path().to_path_buf());
    let farm = env!("CARGO_BIN_EXE_farm");
    let script = format!(
        "set -e\n\
         ip link set lo up\n\
         if ip route get 1.1.1.1 >/dev/null 2>&1; then echo 'namespace has a route out'; exit 9; fi\n\
         {farm} up --boot-timeout 300\n\
         {farm} ssh offline -- cat /etc/hostname\n\
         {farm} down\n"
    );
    let out = Command::new("unshare")
        .args(["--net", "sh", "-c", &script])
        .current_dir(offline.path())
        .env("FARM_STORE", &offline.store)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("offline"),
        "ssh answered with the hostname: {said}"
    );
    for word in ["fetched", "built ", "debootstrap"] {
        assert!(!said.contains(word), "nothing is {word} offline: {said}");
    }
    assert_eq!(offline.entries(), entries, "the store is what was imported");
}

#[test]
fn a_layer_is_not_imported_onto_a_parent_this_store_holds_with_other_bytes() {
    let ex = exported();
    // This store built `base` itself: the same derivation, other bytes.
    let target = empty_store_dir();
    let root = target.path().join("cache");
    let here = Store::open(&root).unwrap();
    let own_base = commit_with_data(&here, "base", None, None, 0x62);
    assert_eq!(own_base.dir_name(), ex.entries[0].dir_name());
    assert_ne!(
        own_base.meta.output_blake3,
        ex.entries[0].meta.output_blake3
    );

    let out = farm_store(&root, &["import", ex.archive.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "entry `{}` is built on other bytes of `{}` than this store holds",
            ex.entries[1].dir_name(),
            own_base.dir_name()
        )),
        "{}",
        text(&out)
    );
    assert_eq!(store_entries(&root), vec![own_base.dir_name().to_string()]);
}

/// A lab's export takes the appliance of its chroot builds along when the store has it, so
/// the offline machine can rebuild such a platform after a change to its steps.
#[test]
fn a_labs_export_takes_the_appliance_of_its_chroot_builds_along() {
    let dir = empty_store_dir();
    let store_dir = dir.path().join("store");
    let lab = |builder: &str| {
        format!(
            "[images.blank]\npath = \"blank.qcow2\"\n[targets.amd64]\narch = \"x86_64\"\n\
             [platforms.p]\nfrom = \"blank\"\n{builder}\n"
        )
    };
    let p = Project::with_store(&lab("builder = \"chroot\""), &store_dir);
    qemu_img::create(&p.path().join("blank.qcow2"), 8 << 20).unwrap();
    p.ok(&["build"]);
    entries::commit_appliance(&Store::open(&store_dir).unwrap());
    let members = |name: &str| {
        let archive = p.path().join(name);
        p.ok(&["store", "export", "-o", archive.to_str().unwrap()]);
        let out = Command::new("tar")
            .args(["--zstd", "-tf"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let with = members("with.tar.zst");
    assert!(with.contains("-farm-appliance-amd64/disk.qcow2"), "{with}");
    assert!(with.contains("-p_amd64/disk.qcow2"), "{with}");
    p.write("farm.toml", &lab(""));
    p.ok(&["build"]);
    let without = members("without.tar.zst");
    assert!(!without.contains("farm-appliance"), "{without}");
}
