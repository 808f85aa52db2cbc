//! Fixtures that are files in the test home (a cloud image as users download it), and the
//! turns that keep two test processes from building one fixture or using one lab at once.
//!
//! A file fixture is named by its kind and the key of its recipe, so a changed recipe is
//! another file and is built anew; it is built under its kind's lock, so of two processes
//! that want it at once one builds it and the other waits and finds it; and it is used only
//! if its bytes are still the ones built (their SHA-512 is recorded beside it), since the
//! test home outlives runs. `tests/it/fixtures.rs` tests all three with two real processes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::test_home::fixtures_dir;

/// An exclusive file lock, `<dir>/<name>.lock`, held until the value is dropped: the one
/// turn-taking of the tests (fixtures, labs). It is a lock on an open file, so it goes with
/// the process that held it, however that process ends.
pub fn take_turn(dir: &Path, name: &str) -> fs_err::File {
    fs_err::create_dir_all(dir).unwrap();
    let turn = fs_err::File::create(dir.join(format!("{name}.lock"))).unwrap();
    turn.lock().unwrap();
    turn
}

/// A file fixture on disk and its SHA-512, as a user copies both from a download page.
pub struct FileFixture {
    pub path: PathBuf,
    pub sha512: String,
}

/// The fixture of `kind` whose recipe has `key`, at `<fixtures>/<kind>-<key>.<extension>`:
/// the kept one when its bytes are the ones recorded, else built by `build` (given the path
/// to write and a log file it may append to).
pub fn file_fixture(
    kind: &str,
    key: &str,
    extension: &str,
    build: impl FnOnce(&Path, &Path),
) -> FileFixture {
    let dir = fixtures_dir();
    let _turn = take_turn(&dir, kind);
    let path = dir.join(format!("{kind}-{key}.{extension}"));
    let digest_file = path.with_extension("sha512");
    if path.exists() {
        let recorded = fs_err::read_to_string(&digest_file).unwrap_or_default();
        if recorded.trim() != sha512_of(&path) {
            eprintln!(
                "the {kind} fixture `{}` is not what was built; building it again",
                path.display()
            );
            fs_err::remove_file(&path).unwrap();
        }
    }
    if !path.exists() {
        let log = path.with_extension("log");
        fs_err::write(&log, "").unwrap();
        let started = Instant::now();
        build(&path, &log);
        assert!(
            path.exists(),
            "building the {kind} fixture made no `{}`; last lines of `{}`:\n{}",
            path.display(),
            log.display(),
            farm::sys::hostinfo::tail(&log, 30)
        );
        eprintln!(
            "built the {kind} fixture in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        fs_err::write(&digest_file, sha512_of(&path)).unwrap();
    }
    let sha512 = fs_err::read_to_string(&digest_file)
        .unwrap()
        .trim()
        .to_string();
    FileFixture { path, sha512 }
}

fn sha512_of(path: &Path) -> String {
    let out = Command::new("sha512sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha512sum `{}`", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}
