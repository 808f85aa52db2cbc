//! The cloud-image fixture: a Debian 12 disk shaped like Debian's `genericcloud` qcow2 (GPT,
//! grub for BIOS and UEFI, cloud-init, no farm agent, compressed), built offline from the
//! mirror by `tests/fixtures/cloud-image.sh`. Its variants (no cloud-init; a cloud-init that
//! fails) are assembled from it by the same script (`--from`), so the mirror is read and the
//! root filesystem made once. Each is keyed by the script's hash and kept in the test home's
//! fixtures (`support::fixture`), so every test and every later run reuses it, verified
//! against the SHA-512 recorded when it was built, and built once when tests want it at once.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::fixture::file_fixture;

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
    let built = file_fixture(kind, &version[..16], "qcow2", |image, log| {
        let output = || {
            fs_err::File::options()
                .append(true)
                .open(log)
                .unwrap()
                .into_parts()
                .0
        };
        let status = Command::new(&script)
            .args(args)
            .arg(image)
            .stdout(output())
            .stderr(output())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "building the {kind} image fixture failed ({status}); last lines of `{}`:\n{}",
            log.display(),
            farm::sys::hostinfo::tail(log, 30)
        );
    });
    CloudImage {
        path: built.path,
        sha512: built.sha512,
    }
}
