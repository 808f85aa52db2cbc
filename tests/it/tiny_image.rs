//! farm's tiny image (Debian cloud kernel + busybox + dropbear), built by `farm build` from
//! the host's apt sources into the shared test store, then booted under TCG with a seed that
//! names a host key, a client key, a hostname, one DHCP NIC and one static NIC: everything
//! its init promises to honour. Other VM tests build on this image, so it is built once.

use crate::support::guest;
use crate::support::project;
use crate::support::skip::require_vm;
use crate::support::test_home::shared_store;

use std::time::Duration;

use farm::build::layer::BootFiles;
use farm::model::build::seed::SeedNic;
use farm::model::values::mac_for;
use guest::{Guest, keygen};
use project::Project;

const TINY: &str = r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"
"#;

#[test]
fn tiny_image_boots_and_honours_the_seed() {
    if !require_vm("tiny_image", &[]) {
        return;
    }
    let p = Project::with_store(TINY, &shared_store());
    p.ok(&["build"]);
    let entry = p.entry("tiny-amd64");
    let boot = BootFiles::in_dir(&entry.join("boot")).expect("the tiny image has boot files");
    assert!(boot.cmdline.contains("console=ttyS0"), "{}", boot.cmdline);
    let disk_bytes = fs_err::metadata(entry.join("disk.qcow2")).unwrap().len();
    assert!(disk_bytes < 32 << 20, "the tiny disk is {disk_bytes} bytes");

    // A second build changes nothing.
    let again = p.ok(&["build"]);
    assert!(
        !String::from_utf8_lossy(&again.stderr).contains("built"),
        "{}",
        project::text(&again)
    );

    let keys = tempfile::tempdir().unwrap();
    let client = keygen(keys.path(), "client");
    let static_nic = SeedNic {
        mac: mac_for("tiny-test", 1),
        address: Some("192.168.76.9/24".parse().unwrap()),
        gateway: None,
    };
    let mut guest = Guest::boot_with(&entry, Some(boot), &client, true, 256, vec![static_nic]);

    // The seed's hostname, and dropbear answering with the pinned host key (Guest's ssh
    // config has StrictHostKeyChecking on, so the login itself proves the key).
    assert_eq!(guest.sh("hostname"), "test-guest");
    // NICs renamed in seed order: nic0 by DHCP from slirp, nic1 with its static address.
    let nic0 = guest.sh("ip -4 -o addr show dev nic0");
    assert!(nic0.contains("10.0.2.15/24"), "{nic0}");
    let nic1 = guest.sh("ip -4 -o addr show dev nic1");
    assert!(nic1.contains("192.168.76.9/24"), "{nic1}");
    // The seeded key sits in farm's marked block; the account itself has no password.
    let keys_file = guest.sh("cat /root/.ssh/authorized_keys");
    assert!(keys_file.contains(&client.public), "{keys_file}");
    assert!(keys_file.contains("# farm-seed: keys from the seed volume"));
    // The builder's steps need a shell with these.
    guest.sh("command -v sh tar gzip sha256sum poweroff");

    // poweroff goes through busybox init and ends qemu.
    let _ = guest.ssh.run("(sleep 1; poweroff) >/dev/null 2>&1 &", None);
    assert!(
        guest.process.wait_exit(Duration::from_secs(60)),
        "the tiny guest did not power off; serial console:\n{}",
        farm::sys::hostinfo::tail(&guest.work.path().join("serial.log"), 30)
    );
}
