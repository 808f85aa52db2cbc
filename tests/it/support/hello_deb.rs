//! farm's test package, `farm-test-hello` 1.0: a `.deb` with one program that says hello,
//! for tests that install a package without asking the mirror (Ansible's `apt` module with
//! `deb:`, from a file or a URL). Its bytes are the same in every run (fixed times), so
//! where it is an input of a layer, the layer's key is too.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use super::project::text;

/// The file name it is served or copied as.
pub const FILE: &str = "farm-test-hello.deb";

/// What `farm-test-hello` prints.
pub const SAYS: &str = "hello from farm's test package";

/// `farm-test-hello_1.0_all.deb`, built with dpkg-deb.
pub fn package() -> Vec<u8> {
    package_called("farm-test-hello")
}

/// A package like [`package`] named `name`, whose program `/usr/bin/NAME` prints [`SAYS`]:
/// for a test that installs one that its lab's provisioning did not.
pub fn package_called(name: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pkg");
    fs_err::create_dir_all(root.join("DEBIAN")).unwrap();
    fs_err::create_dir_all(root.join("usr/bin")).unwrap();
    fs_err::write(
        root.join("DEBIAN/control"),
        format!("Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: farm <farm@localhost>\nDescription: farm's test package\n"),
    )
    .unwrap();
    let program = root.join("usr/bin").join(name);
    fs_err::write(&program, format!("#!/bin/sh\necho \"{SAYS}\"\n")).unwrap();
    fs_err::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let touched = Command::new("find")
        .arg(&root)
        .args(["-exec", "touch", "-h", "-d", "@1700000000", "{}", "+"])
        .status()
        .unwrap();
    assert!(touched.success());
    let deb = dir.path().join(FILE);
    let built = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(&root)
        .arg(&deb)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built));
    fs_err::read(deb).unwrap()
}
