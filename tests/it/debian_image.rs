//! farm's Debian image (mmdebstrap from the mirror, ext4 on the whole disk, direct kernel
//! boot), booted under TCG with a seed from `farm::model::build::seed` and reached with ssh, host-key
//! checking on and pinned to the seeded host key: the whole path from packages to a
//! reachable, identified VM, and what farm's agent in the image does with the seed.
//!
//! The image is the shared `bookworm` entry every Debian test starts from (built once per
//! store by `farm build`), not a build of its own.

use std::time::{Duration, Instant};

use farm::build::layer::BootFiles;
use farm::model::build::seed::SeedNic;

use crate::support::guest::{Guest, keygen, test_guest_mac};
use crate::support::labs::BOOKWORM;
use crate::support::project::Project;
use crate::support::skip::require_vm;
use crate::support::test_home::shared_store;

/// A second NIC with a static address and gateway from the seed.
const STATIC_MAC: &str = "52:54:00:fa:12:02";

#[test]
fn a_debian_image_boots_reachable_by_pinned_ssh_and_its_agent_applies_the_seed() {
    if !require_vm("debian_image", &[]) {
        return;
    }
    let p = Project::with_store(BOOKWORM, &shared_store());
    p.ok(&["build"]);
    let entry = p.entry("bookworm");
    // What the build left: the disk, direct-boot files and metadata, no scratch.
    let mut files = crate::support::project::list(&entry);
    files.retain(|f| f != "meta.json");
    assert_eq!(files, ["boot", "disk.qcow2"], "scratch left in {entry:?}");
    for file in ["vmlinuz", "initrd.img", "cmdline"] {
        assert!(
            fs_err::metadata(entry.join("boot").join(file))
                .unwrap()
                .len()
                > 0,
            "{file}"
        );
    }
    let boot = BootFiles::in_dir(&entry.join("boot")).unwrap();
    assert_eq!(boot.cmdline, "root=/dev/vda rw console=ttyS0");

    // Booted on an overlay with a seed: the client's key, the pinned host key, a DHCP NIC
    // and a second one with a static address and gateway.
    let keys = tempfile::tempdir().unwrap();
    let client = keygen(keys.path(), "client");
    let started = Instant::now();
    let guest = Guest::boot_with(
        &entry,
        Some(boot),
        &client,
        true,
        1024,
        vec![SeedNic {
            mac: STATIC_MAC.parse().unwrap(),
            address: Some("10.0.3.15/24".parse().unwrap()),
            gateway: Some("10.0.3.2".parse().unwrap()),
        }],
    );
    eprintln!("boot to ssh: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(
        guest.sh("hostname"),
        "test-guest",
        "the guest took the seed's hostname"
    );

    // What the agent did, checked from inside.
    assert_eq!(guest.sh("systemctl is-active farm-seed.service"), "active");
    assert_eq!(
        guest.sh("ls /etc/ssh/ | grep '^ssh_host_'"),
        "ssh_host_ed25519_key\nssh_host_ed25519_key.pub",
        "only the pinned host key is present"
    );
    // networkd may still be configuring the second NIC when sshd already answers.
    let links =
        || guest.sh("networkctl list --no-legend --no-pager | awk '$2!=\"lo\" {print $2, $5}'");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut state = links();
    while state != "nic0 configured\nnic1 configured" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        state = links();
    }
    assert_eq!(
        state, "nic0 configured\nnic1 configured",
        "the seed's NICs are named in order and configured by systemd-networkd"
    );
    assert_eq!(
        guest.sh("cat /sys/class/net/nic0/address"),
        test_guest_mac().to_string()
    );
    assert_eq!(guest.sh("cat /sys/class/net/nic1/address"), STATIC_MAC);
    assert_eq!(
        guest.sh("ip -4 -o addr show dev nic1 | awk '{print $4}'"),
        "10.0.3.15/24"
    );
    assert!(
        guest
            .sh("ip route show default")
            .contains("via 10.0.3.2 dev nic1"),
        "the static NIC's gateway is a default route"
    );
    // The agent is idempotent: a second run leaves one block of seeded keys and ssh working.
    assert_eq!(
        guest.sh("systemctl restart farm-seed.service && \
             grep -c '^# farm-seed: keys' /root/.ssh/authorized_keys"),
        "1"
    );
    assert_eq!(guest.sh("hostname"), "test-guest");
}
