//! A cloud image as users download it (the fixture: GPT, grub, cloud-init, no farm agent),
//! served over HTTP with its SHA-512: a platform built on it and instances booted from it,
//! checked over ssh for everything cloud-init and farm promise; the same image booted
//! through UEFI firmware; the platform built in a chroot from farm's appliance; and one
//! with no cloud-init refused as soon as it has booted.

use crate::support::cloud_image;
use crate::support::guest;
use crate::support::hello_deb;
use crate::support::nginx;
use crate::support::project;
use crate::support::skip::{ANSIBLE, Part, require_vm};
use crate::support::test_home::shared_store;

use cloud_image::{CloudImage, cloud_image, image_with_failing_cloud_init, image_without_agent};
use guest::{kept_key, keygen};
use nginx::{NGINX, Nginx};
use project::{ANSIBLE_BIN, Project, text};

/// A project on the shared store whose image `[images.NAME]` is `image` served by nginx
/// (`url` + `sha512`, then `image_lines`), with an amd64 target and `rest`. The server
/// lives as long as the returned value.
struct CloudLab {
    project: Project,
    server: Nginx,
    /// What the server serves: the image, and anything a test puts beside it.
    www: tempfile::TempDir,
}

fn cloud_lab(image: &CloudImage, name: &str, image_lines: &str, rest: &str) -> CloudLab {
    let www = tempfile::tempdir().unwrap();
    let file = "debian-12-genericcloud-amd64.qcow2";
    std::os::unix::fs::symlink(&image.path, www.path().join(file)).unwrap();
    let server = Nginx::start(www.path());
    let toml = format!(
        "[images.{name}]\nurl = \"{}/{file}\"\nsha512 = \"{}\"\n{image_lines}\n\
         [targets.amd64]\narch = \"x86_64\"\n{rest}",
        server.url(),
        image.sha512
    );
    CloudLab {
        project: Project::with_store(&toml, &shared_store()),
        server,
        www,
    }
}

/// Ansible from the venv `scripts/setup.sh` makes, run in the project with host keys checked.
fn ansible_tool(p: &Project, tool: &str, args: &[&str]) -> String {
    let program = std::path::Path::new(ANSIBLE_BIN).join(tool);
    let out = std::process::Command::new(program)
        .current_dir(p.path())
        .args(args)
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        .env("ANSIBLE_NOCOLOR", "1")
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{tool} {args:?}:\n{said}");
    said
}

fn ansible(p: &Project, args: &[&str]) -> String {
    ansible_tool(p, "ansible", args)
}

fn ansible_playbook(p: &Project, args: &[&str]) -> String {
    ansible_tool(p, "ansible-playbook", args)
}

fn ssh(p: &Project, vm: &str, script: &str) -> String {
    let out = p.ok(&["ssh", vm, "--", script]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_platform_on_a_cloud_image_and_two_instances_of_it() {
    if !require_vm("cloud_image", &[Part::File(NGINX), ANSIBLE]) {
        return;
    }
    let lab = cloud_lab(
        &cloud_image(),
        "cloud",
        "",
        r#"
[platforms.web]
from = "cloud"
authorized_keys = { root = ["keys/root.pub"], alice = ["keys/alice.pub"] }
upgrade = true
# python3-apt: Ansible's apt module needs it and otherwise installs it on each instance
# first, after an `apt update` (about 50 CPU-s per instance under TCG).
packages = ["tree", "python3-apt"]
files = { "/etc/farm-motd" = "motd.txt" }
run = ["echo made-by-run > /var/lib/farm-run-stamp"]

[networks.lab]
kind = "vde"
subnet = "10.78.0.0/24"

[vms.a]
platform = "web"
disk_size = "10G"
nics = [{ network = "lab", ip = "10.78.0.11/24" }]

[vms.b]
platform = "web"
disk_size = "10G"
nics = [{ network = "lab", ip = "10.78.0.12/24" }]
"#,
    );
    let p = &lab.project;
    // Kept keys: the layer is cached between runs like the image under it.
    let root_key = kept_key("cloud-root");
    let alice_key = kept_key("cloud-alice");
    p.write("keys/root.pub", &root_key.public);
    p.write("keys/alice.pub", &alice_key.public);
    p.write("motd.txt", "hello from a cloud image\n");

    p.ok(&["build"]);
    let up = p.ok(&["up"]);
    assert!(text(&up).contains("ready"), "{}", text(&up));

    for (vm, address, other) in [
        ("a", "10.78.0.11", "10.78.0.12"),
        ("b", "10.78.0.12", "10.78.0.11"),
    ] {
        // Ready means cloud-init is done, not merely that sshd answers.
        assert_eq!(
            ssh(p, vm, "cloud-init status | sed -n 's/^status: //p'"),
            "done"
        );
        assert_eq!(ssh(p, vm, "hostname"), vm);
        let root_keys = ssh(p, vm, "cat /root/.ssh/authorized_keys");
        assert!(root_keys.contains(&root_key.public), "{root_keys}");
        let alice_keys = ssh(p, vm, "cat /home/alice/.ssh/authorized_keys");
        assert!(alice_keys.contains(&alice_key.public), "{alice_keys}");
        assert_eq!(
            ssh(p, vm, "stat -c %U /home/alice/.ssh/authorized_keys"),
            "alice"
        );
        // No trace of the build: its key in no account, its hostname nowhere.
        let traces = ssh(
            p,
            vm,
            "grep -l farm-build /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys /etc/hostname /etc/hosts 2>/dev/null; true",
        );
        assert_eq!(traces, "", "the build left traces in {traces}");
        // The steps: package, file, command.
        assert!(ssh(p, vm, "dpkg-query -W -f='${Status}' tree").contains("install ok installed"));
        assert_eq!(ssh(p, vm, "cat /etc/farm-motd"), "hello from a cloud image");
        assert_eq!(ssh(p, vm, "cat /var/lib/farm-run-stamp"), "made-by-run");
        // The static NIC, found by its MAC, and the other VM behind it.
        let addresses = ssh(p, vm, "ip -4 -o addr show");
        assert!(addresses.contains(&format!("{address}/24")), "{addresses}");
        let ping = p.run(&["ssh", vm, "--", "ping", "-c", "2", "-W", "3", other]);
        assert!(
            ping.status.success(),
            "{vm} cannot reach {other}:\n{}",
            text(&ping)
        );
        // cloud-init's growpart grew the root partition and filesystem to the 10G disk (the layer is 8G).
        let size: u64 = ssh(p, vm, "df -B1 --output=size / | tail -n 1")
            .parse()
            .unwrap();
        assert!(size > 9 << 30, "{vm}'s root is {size} bytes");
    }
    // Each instance is itself: its own machine-id and host key.
    let identity = |vm: &str| {
        (
            ssh(p, vm, "cat /etc/machine-id"),
            ssh(
                p,
                vm,
                "cat /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2",
            ),
        )
    };
    let (a, b) = (identity("a"), identity("b"));
    assert!(!a.0.is_empty() && a.0 != b.0, "machine-ids {a:?} {b:?}");
    assert!(!a.1.is_empty() && a.1 != b.1, "host keys {a:?} {b:?}");

    // Ansible against the same VMs, through farm's inventory as a dynamic inventory script
    // (cloud images have the python3 Ansible's modules need), with host keys checked.
    let script = p.path().join("inventory.sh");
    fs_err::write(
        &script,
        format!(
            "#!/bin/sh\ncd '{}' && FARM_STORE='{}' exec '{}' inventory \"$@\"\n",
            p.path().display(),
            p.store.display(),
            env!("CARGO_BIN_EXE_farm")
        ),
    )
    .unwrap();
    fs_err::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ping = ansible(p, &["network_lab", "-i", "inventory.sh", "-m", "ping"]);
    assert_eq!(ping.matches("\"pong\"").count(), 2, "{ping}");
    // The package comes from the lab's web server (the host, as QEMU's user network shows it
    // to the guests), not the mirror: the same apt module without two `apt update`s under TCG.
    fs_err::write(lab.www.path().join(hello_deb::FILE), hello_deb::package()).unwrap();
    let deb_url = format!(
        "{}/{}",
        lab.server.url().replace("127.0.0.1", "10.0.2.2"),
        hello_deb::FILE
    );
    p.write(
        "site.yml",
        &format!(
            "- hosts: level_1\n  tasks:\n    - ansible.builtin.apt: {{ deb: \"{deb_url}\" }}\n    \
             - ansible.builtin.copy: {{ dest: /etc/from-ansible, content: \"{{{{ farm_addresses.lab }}}}\\n\" }}\n"
        ),
    );
    let play = ansible_playbook(p, &["-i", "inventory.sh", "site.yml"]);
    // Gathering facts, the package, the file: on both VMs, nothing failed.
    assert_eq!(play.matches("ok=3").count(), 2, "{play}");
    assert_eq!(play.matches("failed=0").count(), 2, "{play}");
    for (vm, address) in [("a", "10.78.0.11"), ("b", "10.78.0.12")] {
        assert_eq!(ssh(p, vm, "cat /etc/from-ansible"), address);
        assert_eq!(ssh(p, vm, "farm-test-hello"), hello_deb::SAYS);
    }
    p.ok(&["down"]);
}

/// `builder = "chroot"`: the steps run in a chroot of the image's root from farm's appliance,
/// as virt-customize does; the image's first boot happens in its instance, and nothing of
/// the chroot (its DNS, its policy-rc.d) stays in the layer.
#[test]
fn a_platform_built_in_a_chroot_from_the_appliance() {
    if !require_vm("cloud_image_chroot", &[Part::File(NGINX)]) {
        return;
    }
    let platform = |command: &str| {
        format!(
            r#"
[platforms.web]
from = "cloud"
builder = "chroot"
authorized_keys = {{ root = ["keys/root.pub"], alice = ["keys/alice.pub"] }}
packages = ["tree"]
files = {{ "/etc/farm-motd" = "motd.txt" }}
run = ["{command}"]

[vms.c]
platform = "web"
disk_size = "10G"
"#
        )
    };
    let lab = cloud_lab(
        &cloud_image(),
        "cloud",
        "",
        &platform("echo first > /var/lib/farm-run-stamp"),
    );
    let p = &lab.project;
    fs_err::create_dir_all(p.path().join("keys")).unwrap();
    let root_key = keygen(&p.path().join("keys"), "root");
    let alice_key = keygen(&p.path().join("keys"), "alice");
    p.write("motd.txt", "made in a chroot\n");
    p.ok(&["build"]);

    // Only the command changed: the appliance boots on the checkpoint before it.
    let toml = fs_err::read_to_string(p.path().join("farm.toml")).unwrap();
    p.write(
        "farm.toml",
        &toml.replace(
            "echo first > /var/lib/farm-run-stamp",
            "echo chroot-$(hostname) > /var/lib/farm-run-stamp",
        ),
    );
    let rebuilt = text(&p.ok(&["build"]));
    assert!(
        rebuilt.contains("5/6 build steps from checkpoints"),
        "{rebuilt}"
    );
    let log = fs_err::read_dir(p.store.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|path| path.to_string_lossy().ends_with("-web_amd64.log"))
        .map(|path| fs_err::read_to_string(path).unwrap())
        .find(|log| log.contains("chroot-$(hostname)"))
        .expect("the rebuild's log");
    assert!(
        log.contains("== mounting the image's root filesystem in the appliance"),
        "{log}"
    );
    assert!(!log.contains("cloud-init status"), "{log}");

    p.ok(&["up"]);
    assert_eq!(
        ssh(p, "c", "cloud-init status | sed -n 's/^status: //p'"),
        "done"
    );
    assert_eq!(ssh(p, "c", "hostname"), "c");
    assert!(ssh(p, "c", "cat /root/.ssh/authorized_keys").contains(&root_key.public));
    assert!(ssh(p, "c", "cat /home/alice/.ssh/authorized_keys").contains(&alice_key.public));
    assert_eq!(
        ssh(p, "c", "stat -c %U /home/alice/.ssh/authorized_keys"),
        "alice"
    );
    assert!(ssh(p, "c", "dpkg-query -W -f='${Status}' tree").contains("install ok installed"));
    assert_eq!(ssh(p, "c", "cat /etc/farm-motd"), "made in a chroot");
    // The command ran in the chroot: the appliance's hostname, not the instance's.
    assert_eq!(
        ssh(p, "c", "cat /var/lib/farm-run-stamp"),
        "chroot-farm-build"
    );
    // What the chroot needed is gone: the image's resolv.conf link is as it shipped, no
    // policy-rc.d, nothing set aside.
    assert_eq!(
        ssh(p, "c", "readlink /etc/resolv.conf"),
        "../run/systemd/resolve/stub-resolv.conf"
    );
    assert_eq!(
        ssh(
            p,
            "c",
            "ls -d /usr/sbin/policy-rc.d /var/lib/farm-chroot 2>/dev/null; grep -l farm-build /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys /etc/hostname /etc/hosts 2>/dev/null; true"
        ),
        ""
    );
    let size: u64 = ssh(p, "c", "df -B1 --output=size / | tail -n 1")
        .parse()
        .unwrap();
    assert!(size > 9 << 30, "c's root is {size} bytes");
    p.ok(&["down"]);
}

#[test]
fn a_cloud_image_boots_through_uefi() {
    if !require_vm("cloud_image_uefi", &[Part::File(NGINX)]) {
        return;
    }
    let lab = cloud_lab(
        &cloud_image(),
        "cloud",
        "firmware = \"uefi\"",
        "[platforms.plain]\nfrom = \"cloud\"\n[vms.efi]\nplatform = \"plain\"\n",
    );
    let p = &lab.project;
    p.ok(&["up"]);
    assert_eq!(
        ssh(
            p,
            "efi",
            "[ -d /sys/firmware/efi ] && echo uefi || echo bios"
        ),
        "uefi"
    );
    // The VM keeps its own variable store beside its disk.
    assert!(p.path().join(".farm/vms/efi/efivars.fd").is_file());
    p.ok(&["down"]);
}

#[test]
fn an_image_with_neither_cloud_init_nor_farms_agent_fails_fast_and_says_why() {
    if !require_vm("no_agent", &[Part::File(NGINX)]) {
        return;
    }
    let lab = cloud_lab(
        &image_without_agent(),
        "bare",
        "",
        "[platforms.p]\nfrom = \"bare\"\nrun = [\"true\"]\n",
    );
    let p = &lab.project;
    let started = std::time::Instant::now();
    let out = p.run(&["build"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(
            "booted to a login prompt, but its image has neither cloud-init nor farm's agent"
        ),
        "{said}"
    );
    assert!(
        said.contains("hint: use an image with cloud-init"),
        "{said}"
    );
    assert!(
        said.contains("login:"),
        "the console's tail is shown: {said}"
    );
    // Refused when the login prompt appears, not at the 300 s boot timeout.
    let waited = started.elapsed();
    assert!(waited.as_secs() < 300, "took {waited:?}");
    assert_eq!(p.in_store("p_amd64"), None);
}

#[test]
fn a_cloud_init_that_ends_in_error_fails_the_build_with_its_log() {
    if !require_vm("failing_cloud_init", &[Part::File(NGINX)]) {
        return;
    }
    let lab = cloud_lab(
        &image_with_failing_cloud_init(),
        "broken",
        "",
        "[platforms.p]\nfrom = \"broken\"\nrun = [\"touch /etc/ran\"]\n",
    );
    let p = &lab.project;
    let out = p.run(&["build"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("cloud-init in the build VM for `p_amd64` ended in `error`"),
        "{said}"
    );
    // cloud-init's own words: the failing module, and its log's tail.
    assert!(said.contains("bootcmd"), "{said}");
    assert!(
        said.contains("last lines of /var/log/cloud-init.log"),
        "{said}"
    );
    assert!(
        said.contains("hint: the image's own first boot failed"),
        "{said}"
    );
    assert_eq!(p.in_store("p_amd64"), None);
}
