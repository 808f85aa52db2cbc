//! A platform on a cloud image as users download it (the tests' fixture: Debian 12, GPT,
//! grub, cloud-init): farm's cold build of an ssh key, one package and one command, next to
//! `virt-customize` (libguestfs, forced to TCG as everything here) doing the same to a copy
//! of the same image; then farm's rebuild after only the command changed, next to the same
//! virt-customize run (targets: cold <= 1.0x, rebuild <= 0.5x of virt-customize).
//!
//! farm builds it as virt-customize does, in a chroot from its appliance
//! (`builder = "chroot"`); the same platform built by booting the image (`builder =
//! "boot"`, the default) is printed beside it. The appliance, like libguestfs's, is made
//! once per store and timed on its own line.

#[path = "../tests/it/support/cloud_image.rs"]
#[allow(dead_code)]
mod cloud_image;
#[path = "../tests/it/support/fixture.rs"]
#[allow(dead_code)]
mod fixture;
#[path = "support/manual_vm.rs"]
#[allow(dead_code)]
mod manual_vm;
#[path = "../tests/it/support/nginx.rs"]
mod nginx;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use manual_vm::farm;
// `cloud_image` (through `fixture`) finds the fixtures' directory as `super::test_home`.
use manual_vm::test_home;

fn lab(source: &str, builder: &str, command: &str) -> String {
    format!(
        r#"
[images.cloud]
{source}
[images.appliance]
tiny = true
[targets.amd64]
arch = "x86_64"

[platforms.web]
from = "cloud"
builder = "{builder}"
authorized_keys = {{ root = ["key.pub"] }}
packages = ["tree"]
run = ["{command}"]
"#
    )
}

fn virt_customize(image: &Path, scratch: &Path, key: &Path, command: &str) -> Duration {
    let copy = scratch.join("virt-customize.qcow2");
    fs_err::copy(image, &copy).unwrap();
    let started = Instant::now();
    let out = Command::new("virt-customize")
        .env("LIBGUESTFS_BACKEND", "direct")
        .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
        .args(["-q", "--network", "-a"])
        .arg(&copy)
        .arg("--ssh-inject")
        .arg(format!("root:file:{}", key.display()))
        .args(["--install", "tree", "--run-command", command])
        .output()
        .expect("virt-customize (apt-get install libguestfs-tools)");
    assert!(
        out.status.success(),
        "virt-customize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = started.elapsed();
    fs_err::remove_file(&copy).unwrap();
    took
}

fn main() {
    let image = cloud_image::cloud_image();
    let scratch = tempfile::tempdir().unwrap();
    let www = scratch.path().join("www");
    fs_err::create_dir_all(&www).unwrap();
    std::os::unix::fs::symlink(&image.path, www.join("cloud.qcow2")).unwrap();
    let server = nginx::Nginx::start(&www);
    let source = format!(
        "url = \"{}/cloud.qcow2\"\nsha512 = \"{}\"\n",
        server.url(),
        image.sha512
    );
    let project = scratch.path().join("project");
    fs_err::create_dir_all(&project).unwrap();
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(project.join("key"))
        .status()
        .unwrap();
    assert!(status.success());
    let key = project.join("key.pub");
    let store = scratch.path().join("store");

    // The image is fetched once first (virt-customize starts from a local file too), and
    // the appliance made (libguestfs keeps its own in /var/tmp between runs).
    let write = |builder: &str, command: &str| {
        fs_err::write(project.join("farm.toml"), lab(&source, builder, command)).unwrap();
    };
    write("chroot", "echo one > /etc/stamp");
    farm(&project, &store, &["build", "-q", "cloud"]);
    let appliance = farm(&project, &store, &["build", "-q", "appliance"]);
    let farm_cold = farm(&project, &store, &["build", "-q"]);
    let virt_cold = virt_customize(&image.path, scratch.path(), &key, "echo one > /etc/stamp");

    write("chroot", "echo two > /etc/stamp");
    let farm_rebuild = farm(&project, &store, &["build", "-q"]);
    let virt_again = virt_customize(&image.path, scratch.path(), &key, "echo two > /etc/stamp");

    write("boot", "echo one > /etc/stamp");
    let farm_booted = farm(&project, &store, &["build", "-q"]);

    println!(
        "farm's appliance (made once per store): {:.0} s",
        appliance.as_secs_f64()
    );
    println!(
        "cold build (key, package, command) on the cloud image: farm {:.0} s, virt-customize {:.0} s: ratio {:.2} (target <= 1.0)",
        farm_cold.as_secs_f64(),
        virt_cold.as_secs_f64(),
        farm_cold.as_secs_f64() / virt_cold.as_secs_f64()
    );
    println!(
        "rebuild after changing only the command: farm {:.0} s, virt-customize {:.0} s: ratio {:.2} (target <= 0.5)",
        farm_rebuild.as_secs_f64(),
        virt_again.as_secs_f64(),
        farm_rebuild.as_secs_f64() / virt_again.as_secs_f64()
    );
    println!(
        "the same cold build with the image booted (builder = \"boot\"): farm {:.0} s: ratio {:.2} to virt-customize",
        farm_booted.as_secs_f64(),
        farm_booted.as_secs_f64() / virt_cold.as_secs_f64()
    );
}
