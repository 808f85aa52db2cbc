//! `farm store verify [--repair]` against real entries: real qcow2 chains made by qemu-img,
//! boot files, damage done by flipping bytes on disk, and the real `farm` binary.

use crate::support::entries;
use crate::support::project;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use entries::commit;
use farm::store::{Entry, Store};
use farm::sys::qemu_img;
use project::{Project, text};

/// Flips one byte of `path` (root ignores the read-only mode the store gives it).
fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = fs_err::read(path).unwrap();
    bytes[offset] ^= 0x01;
    fs_err::write(path, &bytes).unwrap();
}

fn verify(store: &Path, extra: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_farm"))
        .current_dir(dir.path())
        .args(["store", "verify"])
        .args(extra)
        .env("FARM_STORE", store)
        .output()
        .unwrap()
}

struct Lab {
    _dir: tempfile::TempDir,
    store: Store,
    base: Entry,
    kernel: Entry,
    child: Entry,
}

/// `base` ← `child`, and a separate `kernel` entry with boot files.
fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("cache")).unwrap();
    let base = commit(&store, "base", None, None);
    let child = commit(&store, "child", Some(&base), None);
    let kernel_bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let kernel = commit(&store, "kern", None, Some(&kernel_bytes));
    Lab {
        _dir: dir,
        store,
        base,
        kernel,
        child,
    }
}

#[test]
fn an_intact_store_verifies_and_records_every_file() {
    let lab = lab();
    assert_eq!(
        lab.kernel.meta.files.keys().collect::<Vec<_>>(),
        ["boot/cmdline", "boot/vmlinuz"]
    );
    let out = verify(lab.store.root(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert_eq!(said.matches("          ok ").count(), 3, "{said}");
    assert!(
        said.contains("verified 3 entries, every file and backing chain intact"),
        "{said}"
    );
}

#[test]
fn a_flipped_byte_in_a_disk_and_in_a_kernel_is_named_by_entry_and_file() {
    let lab = lab();
    flip_byte(&lab.base.disk_path(), 70_000);
    flip_byte(&lab.kernel.dir.join("boot/vmlinuz"), 123_456);

    let out = verify(lab.store.root(), &["--no-qemu-check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "error: `disk.qcow2` of entry `{}`: its content changed",
            lab.base.dir_name()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "error: `boot/vmlinuz` of entry `{}`: its content changed",
            lab.kernel.dir_name()
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&format!("entry `{}`", lab.child.dir_name())),
        "the child's own files are intact: {stderr}"
    );
    assert!(
        stderr.contains("2 of 3 entries are damaged")
            && stderr.contains("hint: `farm store verify --repair`"),
        "{stderr}"
    );
}

/// The first user-visible case of issue 31: byte 23 of a disk set to 0 (`cluster_bits` 0)
/// made `farm store verify`, whose job is to report damage, panic in its qcow2 reader.
#[test]
fn a_disk_whose_qcow2_header_is_damaged_is_reported_not_a_panic() {
    let lab = lab();
    let disk = lab.child.disk_path();
    let mut bytes = fs_err::read(&disk).unwrap();
    bytes[23] = 0;
    fs_err::write(&disk, &bytes).unwrap();

    let out = verify(lab.store.root(), &["--no-qemu-check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(!said.contains("panicked"), "{said}");
    assert!(
        said.contains(&format!("`disk.qcow2` of entry `{}`", lab.child.dir_name())),
        "{said}"
    );
}

#[test]
fn a_changed_metadata_value_and_an_unrecorded_file_are_found() {
    let lab = lab();
    let meta_path = lab.kernel.dir.join("meta.json");
    let edited = fs_err::read_to_string(&meta_path)
        .unwrap()
        .replace("\"build_seconds\": 0.5", "\"build_seconds\": 0.6");
    fs_err::write(&meta_path, edited).unwrap();
    fs_err::write(lab.base.dir.join("boot.txt"), "dropped here\n").unwrap();

    let out = verify(lab.store.root(), &["--no-qemu-check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "`meta.json` of entry `{}`: its contents changed since it was committed",
            lab.kernel.dir_name()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "`boot.txt` of entry `{}`: not recorded when the entry was committed",
            lab.base.dir_name()
        )),
        "{stderr}"
    );
}

#[test]
fn a_broken_backing_chain_is_found() {
    let lab = lab();
    // The child is pointed at another disk: its header (and so its hash) changes too, but
    // the chain finding says what is wrong.
    let wrong = PathBuf::from("..")
        .join(lab.kernel.dir_name())
        .join("disk.qcow2");
    qemu_img::rebase_unsafe(&lab.child.disk_path(), &wrong).unwrap();
    let out = verify(lab.store.root(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "`disk.qcow2` of entry `{}`: it is backed by `{}`, not its parent's disk `../{}/disk.qcow2`",
            lab.child.dir_name(),
            wrong.display(),
            lab.base.dir_name()
        )),
        "{stderr}"
    );

    // A parent that left the store breaks the chain without changing a byte of the child.
    let lab = self::lab();
    let outside = lab.store.root().join("elsewhere");
    fs_err::rename(&lab.base.dir, &outside).unwrap();
    let out = verify(lab.store.root(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "`disk.qcow2` of entry `{}`: its parent `{}` is not in the store",
            lab.child.dir_name(),
            lab.base.dir_name()
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains("content changed"),
        "no byte of the child changed: {stderr}"
    );
}

#[test]
fn qemu_img_check_finds_damaged_qcow2_metadata() {
    let lab = lab();
    // Write a 64 KiB cluster so the image has an L2 table, then point that table's first
    // entry past the end of the file: a corruption only qemu-img's check sees.
    let disk = lab.base.disk_path();
    fs_err::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let status = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", text(&status));
    let info = qemu_img::info(&disk).unwrap();
    assert_eq!(info.format, "qcow2");
    let bytes = fs_err::read(&disk).unwrap();
    let l1_offset = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2_offset = (u64::from_be_bytes(bytes[l1_offset..l1_offset + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00) as usize;
    let mut damaged = bytes.clone();
    damaged[l2_offset..l2_offset + 8]
        .copy_from_slice(&(0x8000_0000_0000_0000u64 | (1 << 40)).to_be_bytes());
    fs_err::write(&disk, &damaged).unwrap();

    let out = verify(lab.store.root(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "`disk.qcow2` of entry `{}`: `qemu-img check` finds it damaged",
            lab.base.dir_name()
        )),
        "{stderr}"
    );
}

/// A project whose image `local` is the parent of its platform's layer, both built, then a
/// byte of the image's disk flipped; with the image's and the layer's entry directories.
fn built_with_a_damaged_image() -> (Project, String, String) {
    let project = Project::new(
        "[images.local]\npath = \"base.qcow2\"\n\n[targets.amd64]\narch = \"x86_64\"\n\n\
         [platforms.p]\nfrom = \"local\"\n",
    );
    project.blank_disk("base.qcow2");
    project.ok(&["build"]);
    let image = project.entry("local");
    let layer = project.entry("p_amd64");
    flip_byte(&image.join("disk.qcow2"), 1000);
    let name = |dir: &Path| dir.file_name().unwrap().to_string_lossy().into_owned();
    (project, name(&image), name(&layer))
}

#[test]
fn repair_sets_aside_the_damaged_entry_and_what_it_backs_then_builds_both_again() {
    let (project, image_name, layer_name) = built_with_a_damaged_image();

    let out = project.run(&["store", "verify", "--repair"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!(
            "setting aside {layer_name} too: it backs onto `{image_name}`"
        )),
        "{said}"
    );
    assert!(
        said.contains("repaired 2 entries set aside, 2 built again"),
        "{said}"
    );
    let aside: Vec<String> = fs_err::read_dir(project.store.join("damaged"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(aside.len(), 2, "{aside:?}");
    assert!(
        aside.iter().any(|a| a.starts_with(&image_name)),
        "{aside:?}"
    );

    let again = project.ok(&["store", "verify"]);
    assert!(
        text(&again).contains("verified 2 entries"),
        "{}",
        text(&again)
    );
    assert!(project.entry("local").join("disk.qcow2").is_file());
}

/// blake3 of every file under `dir`, by path relative to it.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(current) = dirs.pop() {
        for entry in fs_err::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let hash = blake3::hash(&fs_err::read(&path).unwrap());
                files.push((
                    path.strip_prefix(dir).unwrap().to_path_buf(),
                    hash.to_hex().to_string(),
                ));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn a_repair_dry_run_lists_what_it_would_set_aside_and_build_and_changes_nothing() {
    let (project, image_name, layer_name) = built_with_a_damaged_image();
    let entries = project.store.join("store");
    let before = fingerprint(&entries);

    let out = project.run(&["store", "verify", "--repair", "--dry-run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The damage, as verify names it, then the plan: parents first.
    assert!(
        said.contains(&format!(
            "error: `disk.qcow2` of entry `{image_name}`: its content changed"
        )),
        "{said}"
    );
    let aside_image = format!("set aside {image_name} (damaged: `disk.qcow2`)");
    let aside_layer = format!("set aside {layer_name} (it backs onto `{image_name}`)");
    for line in [
        &aside_image,
        &aside_layer,
        "build again local",
        "build again p_amd64",
    ] {
        assert!(stdout.contains(line), "{line:?} not in:\n{stdout}");
    }
    assert!(
        stdout.find(&aside_image) < stdout.find(&aside_layer),
        "{stdout}"
    );
    assert!(
        said.contains("1 of 2 entries are damaged")
            && said.contains("without `--dry-run` does what is listed above"),
        "{said}"
    );
    assert!(!said.contains("moved"), "{said}");

    // Nothing moved, nothing built: every file of every entry is as it was.
    assert_eq!(fingerprint(&entries), before);
    assert!(!project.store.join("damaged").exists());
    let again = project.run(&["store", "verify", "--no-qemu-check"]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));

    // `--dry-run` is `--repair`'s.
    let alone = project.run(&["store", "verify", "--dry-run"]);
    assert_eq!(alone.status.code(), Some(2), "{}", text(&alone));
}

#[test]
fn repair_without_a_farm_toml_sets_aside_and_says_what_it_could_not_build() {
    let lab = lab();
    flip_byte(&lab.base.disk_path(), 70_000);
    let out = verify(lab.store.root(), &["--repair"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("2 entries were set aside but not built again (not in this farm.toml)"),
        "{said}"
    );
    assert!(!lab.base.dir.exists() && !lab.child.dir.exists());
    assert!(lab.kernel.dir.exists(), "intact entries stay");
    assert_eq!(
        fs_err::read_dir(lab.store.root().join("damaged"))
            .unwrap()
            .count(),
        2
    );
    // What is left verifies clean.
    let again = verify(lab.store.root(), &[]);
    assert!(again.status.success(), "{}", text(&again));
}
