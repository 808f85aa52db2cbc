//! The cloud-image fixture: a Debian 12 disk shaped like Debian's `genericcloud` qcow2 (GPT,
//! grub for BIOS and UEFI, cloud-init, no farm agent, compressed), built offline from the
//! mirror by `tests/fixtures/cloud-image.sh`. It is built once per version of the script
//! and kept beside the shared test store, so every test and every later run reuses it; a
//! lock keeps two test binaries from building it at once.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The fixture on disk and its SHA-512, as a user copies both from a download page.
pub struct CloudImage {
    pub path: PathBuf,
    pub sha512: String,
}

/// Where fixtures live: beside the shared store, not in it (a store holds only entries).
fn fixtures_dir() -> PathBuf {
    std::env::var_os("FARM_TEST_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("farm-test-fixtures"))
}

/// The fixture, built first if this version of the script has not built it yet.
pub fn cloud_image() -> CloudImage {
    fixture("cloud", &[])
}

/// The same disk with neither cloud-init nor farm's agent: nothing in it reads a seed.
pub fn image_without_agent() -> CloudImage {
    fixture("no-agent", &["--without-cloud-init"])
}

/// The same disk whose cloud-init ends in `status: error` on first boot (a `bootcmd` that
/// fails).
pub fn image_with_failing_cloud_init() -> CloudImage {
    fixture("failing-cloud-init", &["--failing-cloud-init"])
}

fn fixture(kind: &str, args: &[&str]) -> CloudImage {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cloud-image.sh");
    let version = blake3::hash(&fs_err::read(&script).unwrap()).to_hex();
    let dir = fixtures_dir();
    fs_err::create_dir_all(&dir).unwrap();
    let image = dir.join(format!("{kind}-{}.qcow2", &version[..16]));
    let lock = fs_err::File::create(dir.join(format!("{kind}.lock"))).unwrap();
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) },
        0,
        "locking the fixture"
    );
    if !image.exists() {
        let log = image.with_extension("log");
        let started = Instant::now();
        let status = Command::new(&script)
            .args(args)
            .arg(&image)
            .stdout(fs_err::File::create(&log).unwrap().into_parts().0)
            .stderr(
                fs_err::File::options()
                    .append(true)
                    .open(&log)
                    .unwrap()
                    .into_parts()
                    .0,
            )
            .status()
            .unwrap();
        let said = fs_err::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = said.lines().rev().take(30).collect();
        assert!(
            status.success() && image.exists(),
            "building the {kind} image fixture failed ({status}); last lines of `{}`:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        eprintln!(
            "built the {kind} image fixture in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    let digest_file = image.with_extension("sha512");
    let sha512 = match fs_err::read_to_string(&digest_file) {
        Ok(digest) => digest.trim().to_string(),
        Err(_) => {
            let out = Command::new("sha512sum").arg(&image).output().unwrap();
            assert!(out.status.success());
            let digest = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
            fs_err::write(&digest_file, &digest).unwrap();
            digest
        }
    };
    drop(lock);
    CloudImage {
        path: image,
        sha512,
    }
}
