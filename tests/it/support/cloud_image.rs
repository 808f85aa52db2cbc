//! The cloud-image fixture: a Debian 12 disk shaped like Debian's `genericcloud` qcow2 (GPT,
//! grub for BIOS and UEFI, cloud-init, no farm agent, compressed), built offline from the
//! mirror by `tests/fixtures/cloud-image.sh`. Its variants (no cloud-init; a cloud-init that
//! fails) are assembled from it by the same script (`--from`), so the mirror is read and the
//! root filesystem made once. Each is keyed by the script's hash and kept in the test home's
//! fixtures, so every test and every later run reuses it, verified against the SHA-512
//! recorded when it was built; a lock keeps two tests from building one at once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::test_home::fixtures_dir;

/// The fixture on disk and its SHA-512, as a user copies both from a download page.
pub struct CloudImage {
    pub path: PathBuf,
    pub sha512: String,
}

/// The fixture, built first if this version of the script has not built it yet.
pub fn cloud_image() -> CloudImage {
    fixture("cloud", &[])
}

/// The same disk with neither cloud-init nor farm's agent: nothing in it reads a seed.
pub fn image_without_agent() -> CloudImage {
    variant("no-agent", "--without-cloud-init")
}

/// The same disk whose cloud-init ends in `status: error` on first boot (a `bootcmd` that
/// fails).
pub fn image_with_failing_cloud_init() -> CloudImage {
    variant("failing-cloud-init", "--failing-cloud-init")
}

/// [`cloud_image`] changed by the script's `option`.
fn variant(kind: &str, option: &str) -> CloudImage {
    let base = cloud_image();
    let from = base.path.display().to_string();
    fixture(kind, &["--from", &from, option])
}

fn fixture(kind: &str, args: &[&str]) -> CloudImage {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cloud-image.sh");
    let version = blake3::hash(&fs_err::read(&script).unwrap()).to_hex();
    let dir = fixtures_dir();
    fs_err::create_dir_all(&dir).unwrap();
    let image = dir.join(format!("{kind}-{}.qcow2", &version[..16]));
    let lock = fs_err::File::create(dir.join(format!("{kind}.lock"))).unwrap();
    lock.lock().unwrap();
    let digest_file = image.with_extension("sha512");
    // Kept from an earlier run: used only if its bytes are still the ones built.
    if image.exists() {
        let recorded = fs_err::read_to_string(&digest_file).unwrap_or_default();
        if recorded.trim() != sha512_of(&image) {
            eprintln!(
                "the {kind} image fixture `{}` is not what was built; building it again",
                image.display()
            );
            fs_err::remove_file(&image).unwrap();
        }
    }
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
        assert!(
            status.success() && image.exists(),
            "building the {kind} image fixture failed ({status}); last lines of `{}`:\n{}",
            log.display(),
            farm::sys::hostinfo::tail(&log, 30)
        );
        eprintln!(
            "built the {kind} image fixture in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        fs_err::write(&digest_file, sha512_of(&image)).unwrap();
    }
    let sha512 = fs_err::read_to_string(&digest_file)
        .unwrap()
        .trim()
        .to_string();
    drop(lock);
    CloudImage {
        path: image,
        sha512,
    }
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
