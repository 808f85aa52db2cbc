//! `farm image export` (issue 32): a built platform as one standalone disk, its chain
//! flattened, with its checksum and the derivation it came from beside it; the same bytes
//! every time for qcow2 and raw; nothing written over an existing file without `--force`,
//! and a clear refusal for what is not built. farm's tiny image, which farm boots by direct
//! kernel, exported bootable: qemu alone boots the qcow2 and the raw disk, and a real Vagrant
//! (Debian's, with vagrant-libvirt, on the tests' libvirtd) brings the box up. As a KubeVirt
//! containerDisk, pushed to a real registry (Debian's `docker-registry`) and read back with
//! `skopeo`.

use crate::support::libvirtd::{Libvirtd, URI, virsh};
use crate::support::project::{Project, nonce, text};
use crate::support::registry::{REGISTRY, Registry};
use crate::support::skip::{Part, require_vm};
use crate::support::test_home::shared_store;

use crate::support::guest::{Key, kept_key};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LAB: &str = r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

# A key and a step: what the exported disk must show when plain qemu boots it. Fixed
# inputs, so every test and run shares one build.
[platforms.stamped]
from = "tiny"
memory = "256M"
authorized_keys = ["keys/export.pub"]
run = ["echo exported-by-farm > /stamp"]

[platforms.unbuilt]
from = "tiny"
run = ["echo NONCE > /nonce"]
"#;

/// The lab, with the kept key its platform takes, built.
fn built_lab() -> (Project, Key) {
    let key = kept_key("image-export");
    let p = Project::with_store(&LAB.replace("NONCE", &nonce()), &shared_store());
    fs_err::create_dir_all(p.path().join("keys")).unwrap();
    fs_err::write(
        p.path().join("keys/export.pub"),
        format!("{}\n", key.public),
    )
    .unwrap();
    p.ok(&["build", "stamped"]);
    (p, key)
}

/// Boots `disk` with qemu alone (no farm, no seed: the key and the step are in the disk),
/// waits for ssh on a forwarded port and returns what `cat /stamp` says. The wait has a
/// timeout that fails with the serial console attached.
fn boot_and_read_stamp(disk: &Path, format: &str, key: &Key) -> String {
    let work = tempfile::tempdir().unwrap();
    let serial = work.path().join("serial.log");
    let port = farm::sys::hostinfo::free_local_port().unwrap();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35,accel=tcg", "-m", "256", "-display", "none"])
        .arg("-drive")
        .arg(format!(
            "file={},format={format},if=virtio,snapshot=on",
            disk.display()
        ))
        .args([
            "-nic",
            &format!("user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22"),
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    let said = loop {
        let ssh = Command::new("ssh")
            .args(["-F", "/dev/null", "-i"])
            .arg(&key.private)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
                "-p",
                &port.to_string(),
                "root@127.0.0.1",
                "cat /stamp",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if ssh.status.success() {
            break String::from_utf8_lossy(&ssh.stdout).trim().to_string();
        }
        if Instant::now() > deadline || qemu.try_wait().unwrap().is_some() {
            let _ = qemu.kill();
            panic!(
                "the exported {format} disk did not answer ssh in time; serial console:\n{}",
                farm::sys::hostinfo::tail(&serial, 40)
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    said
}

#[test]
fn a_platform_is_exported_flat_with_its_checksum_the_same_bytes_each_time() {
    if !require_vm("image_export", &[]) {
        return;
    }
    let (p, key) = built_lab();
    let out = p.path().join("out");
    fs_err::create_dir_all(&out).unwrap();
    // `farm image export NAME out/FILE ARGS…`.
    let run = |name: &str, file: &str, args: &[&str]| {
        let file = out.join(file).display().to_string();
        let mut all = vec!["image", "export", name, &file];
        all.extend(args);
        p.run(&all)
    };
    let export = |file: &str, format: &str| {
        let done = run("stamped", file, &["--format", format]);
        assert!(done.status.success(), "{}", text(&done));
    };

    export("a.qcow2", "qcow2");
    // Standalone: no backing file.
    let info = farm::sys::qemu_img::info(&out.join("a.qcow2")).unwrap();
    assert_eq!(info.format, "qcow2");
    assert!(info.backing_filename.is_none(), "{info:?}");
    // farm laid the qcow2 out itself: qemu-img finds nothing wrong in it.
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(out.join("a.qcow2"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    // Its checksum file is `b3sum -c`'s (blake3, the default), and its sidecar names the
    // derivation and says the same checksum.
    let check = Command::new("b3sum")
        .args(["-c", "a.qcow2.blake3"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    let sidecar: serde_json::Value =
        serde_json::from_slice(&fs_err::read(out.join("a.qcow2.farm.json")).unwrap()).unwrap();
    let line = fs_err::read_to_string(out.join("a.qcow2.blake3")).unwrap();
    assert_eq!(
        Some(line.split_whitespace().next().unwrap()),
        sidecar["blake3"].as_str()
    );
    let shown: serde_json::Value =
        serde_json::from_slice(&p.ok(&["show", "--json", "stamped"]).stdout).unwrap();
    assert_eq!(sidecar["derivation"], shown[0]["hash"]);
    assert_eq!(sidecar["format"], "qcow2");

    // farm's tiny image boots by direct kernel; exported, it has GRUB in front of it, and
    // qemu alone boots it: the key and the step's file are there.
    assert_eq!(
        sidecar["boot"], "grub (BIOS), root on /dev/vda1",
        "{sidecar}"
    );
    assert_eq!(Some(info.virtual_size), sidecar["virtual_size"].as_u64());

    // The same derivation, exported again: the same bytes, in qcow2 and in raw.
    export("b.qcow2", "qcow2");
    assert!(
        fs_err::read(out.join("a.qcow2")).unwrap() == fs_err::read(out.join("b.qcow2")).unwrap()
    );
    export("a.raw", "raw");
    export("b.raw", "raw");
    assert!(fs_err::read(out.join("a.raw")).unwrap() == fs_err::read(out.join("b.raw")).unwrap());
    // The same guest bytes in both.
    let same = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(out.join("a.qcow2"))
        .arg(out.join("a.raw"))
        .output()
        .unwrap();
    assert!(same.status.success(), "{}", text(&same));
    // A SHA-256 instead, for a consumer that wants one: `sha256sum -c` reads it.
    let sha = run("stamped", "c.qcow2", &["--checksum", "sha256"]);
    assert!(sha.status.success(), "{}", text(&sha));
    let check = Command::new("sha256sum")
        .args(["-c", "c.qcow2.sha256"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert_eq!(
        fs_err::read(out.join("a.qcow2")).unwrap(),
        fs_err::read(out.join("c.qcow2")).unwrap()
    );
    for (file, format) in [("a.qcow2", "qcow2"), ("a.raw", "raw")] {
        assert_eq!(
            boot_and_read_stamp(&out.join(file), format, &key),
            "exported-by-farm"
        );
    }
    // VMware's and Hyper-V's formats: standalone too, the same virtual disk as the qcow2
    // (qemu-img compares the guest-visible bytes; the files themselves carry fresh ids).
    for (file, format) in [("a.vmdk", "vmdk"), ("a.vhdx", "vhdx")] {
        export(file, format);
        let info = farm::sys::qemu_img::info(&out.join(file)).unwrap();
        assert_eq!(info.format, format, "{info:?}");
        assert!(info.backing_filename.is_none(), "{info:?}");
        let same = Command::new("qemu-img")
            .args(["compare", "-f", format, "-F", "qcow2"])
            .arg(out.join(file))
            .arg(out.join("a.qcow2"))
            .output()
            .unwrap();
        assert!(same.status.success(), "{file}: {}", text(&same));
    }

    // An existing file is kept unless `--force`; nothing half-written is left beside it.
    let before = fs_err::read(out.join("a.raw")).unwrap();
    let refused = run("stamped", "a.raw", &["--format", "qcow2"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("exists") && text(&refused).contains("--force"),
        "{}",
        text(&refused)
    );
    assert_eq!(fs_err::read(out.join("a.raw")).unwrap(), before);
    let forced = run("stamped", "a.raw", &["--format", "qcow2", "--force"]);
    assert!(forced.status.success(), "{}", text(&forced));
    let names = crate::support::project::list(&out);
    assert!(!names.iter().any(|n| n.contains("partial")), "{names:?}");

    // A disk that does not fit where it goes: refused before anything is written, naming
    // the filesystem (an 8 MiB tmpfs, in a mount namespace of the export's own).
    if crate::support::mount_ns::available("image_export") {
        let small = out.join("small");
        fs_err::create_dir_all(&small).unwrap();
        let target = small.join("x.qcow2").display().to_string();
        let full = Command::new("unshare")
            .args(["--mount", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs -o size=8m tmpfs '{dir}' || exit 9; \"$@\"; rc=$?; \
                 echo \"left:$(ls -A '{dir}' | tr '\\n' ' ')\"; exit $rc",
                dir = small.display()
            ))
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_farm"))
            .args(["image", "export", "stamped", &target])
            .current_dir(p.path())
            .env("FARM_STORE", &p.store)
            .output()
            .unwrap();
        assert!(!full.status.success());
        assert!(
            text(&full).contains("tmpfs") && text(&full).contains("write it to a larger disk"),
            "{}",
            text(&full)
        );
        // Nothing was left in the tmpfs, not even the hidden partial file.
        assert!(
            String::from_utf8_lossy(&full.stdout).contains("left:\n"),
            "{}",
            text(&full)
        );
    }

    // What is not built, and what does not exist, are refused by name.
    let unbuilt = run("unbuilt", "u.qcow2", &[]);
    assert!(
        text(&unbuilt).contains("is not built") && text(&unbuilt).contains("--build"),
        "{}",
        text(&unbuilt)
    );
    assert!(!out.join("u.qcow2").exists());
    // `--build` builds it first.
    let built = run("unbuilt", "u.qcow2", &["--build"]);
    assert!(built.status.success(), "{}", text(&built));
    assert!(out.join("u.qcow2").is_file() && out.join("u.qcow2.blake3").is_file());
    let unknown = run("nosuch", "n.qcow2", &[]);
    assert!(
        !unknown.status.success() && text(&unknown).contains("nosuch"),
        "{}",
        text(&unknown)
    );
}

/// sha256 of a file, as `sha256sum` prints it.
fn sha256_of(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn a_container_disk_goes_to_a_real_registry_with_one_layer_holding_the_disk_for_qemu() {
    if !require_vm(
        "container_disk",
        &[Part::Program("skopeo"), Part::File(REGISTRY)],
    ) {
        return;
    }
    let (p, _) = built_lab();
    let out = p.path().join("out");
    fs_err::create_dir_all(&out).unwrap();
    let path = |file: &str| out.join(file).display().to_string();
    let registry = Registry::start();
    let target = format!("{}/farm/stamped:v1", registry.address());

    let disk = path("stamped.qcow2");
    p.ok(&["image", "export", "stamped", &disk, "--compress"]);
    let archive = path("stamped.oci");
    let pushed = p.run(&[
        "image",
        "export",
        "stamped",
        &archive,
        "--format",
        "containerdisk",
        "--compress",
        "--checksum",
        "sha256",
        "--push",
        &target,
    ]);
    assert!(pushed.status.success(), "{}", text(&pushed));
    let sidecar: serde_json::Value =
        serde_json::from_slice(&fs_err::read(out.join("stamped.oci.farm.json")).unwrap()).unwrap();

    // What the registry holds: one layer, the image's digest the archive's, amd64 linux.
    let skopeo = |args: &[&str]| {
        let done = Command::new("skopeo").args(args).output().unwrap();
        assert!(done.status.success(), "skopeo {args:?}: {}", text(&done));
        serde_json::from_slice::<serde_json::Value>(&done.stdout).unwrap()
    };
    let remote = format!("docker://{target}");
    let inspected = skopeo(&["inspect", "--tls-verify=false", &remote]);
    assert_eq!(
        inspected["Layers"].as_array().unwrap().len(),
        1,
        "{inspected}"
    );
    assert_eq!(inspected["Digest"], sidecar["image_digest"], "{inspected}");
    assert_eq!(inspected["Architecture"], "amd64");
    assert_eq!(inspected["Os"], "linux");
    let local = skopeo(&["inspect", &format!("oci-archive:{archive}")]);
    assert_eq!(local["Layers"], inspected["Layers"]);

    // The layer, pulled back and unpacked: `disk/stamped_amd64.qcow2`, owned by qemu (107), read
    // only, the same bytes as the plain qcow2 export of the same derivation.
    let pulled = out.join("pulled");
    let copy = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", &remote])
        .arg(format!("dir:{}", pulled.display()))
        .output()
        .unwrap();
    assert!(copy.status.success(), "{}", text(&copy));
    let layer_digest = inspected["Layers"][0].as_str().unwrap();
    let layer = pulled.join(layer_digest.trim_start_matches("sha256:"));
    let listing = Command::new("tar")
        .args(["--numeric-owner", "-tvf"])
        .arg(&layer)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).to_string();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 2, "{listing}");
    assert!(lines[0].starts_with("dr-xr-xr-x 107/107") && lines[0].ends_with("disk/"));
    assert!(
        lines[1].starts_with("-r--r--r-- 107/107")
            && lines[1].ends_with("disk/stamped_amd64.qcow2"),
        "{listing}"
    );
    let unpacked = out.join("unpacked");
    fs_err::create_dir_all(&unpacked).unwrap();
    let untar = Command::new("tar")
        .arg("-xf")
        .arg(&layer)
        .arg("-C")
        .arg(&unpacked)
        .output()
        .unwrap();
    assert!(untar.status.success(), "{}", text(&untar));
    assert_eq!(
        sha256_of(&unpacked.join("disk/stamped_amd64.qcow2")),
        sha256_of(std::path::Path::new(&disk))
    );

    // The archive is the same bytes when exported again.
    p.ok(&[
        "image",
        "export",
        "stamped",
        &path("again.oci"),
        "--format",
        "containerdisk",
        "--compress",
    ]);
    assert_eq!(
        sha256_of(out.join("again.oci").as_path()),
        sidecar["sha256"]
    );

    // A registry that is not there: a clear refusal naming it, and nothing at the target.
    drop(registry);
    let refused = p.run(&[
        "image",
        "export",
        "stamped",
        &path("gone.oci"),
        "--format",
        "containerdisk",
        "--push",
        &target,
    ]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("refused the containerDisk") && text(&refused).contains(&target),
        "{}",
        text(&refused)
    );
    let names = crate::support::project::list(&out);
    assert!(
        !names
            .iter()
            .any(|n| n.contains("gone") || n.contains("partial")),
        "{names:?}"
    );
}

/// What a Vagrant test leaves on this machine's libvirtd, removed however it ends.
struct VagrantRun {
    dir: tempfile::TempDir,
    pool: String,
    network: String,
}

impl VagrantRun {
    fn vagrant(&self, args: &[&str]) -> std::process::Output {
        Command::new("timeout")
            .arg("600")
            .arg("vagrant")
            .args(args)
            .env("VAGRANT_HOME", self.dir.path().join("home"))
            .env("VAGRANT_CHECKPOINT_DISABLE", "1")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for VagrantRun {
    fn drop(&mut self) {
        let _ = self.vagrant(&["destroy", "-f"]);
        for args in [
            ["net-destroy", &self.network],
            ["net-undefine", &self.network],
            ["pool-destroy", &self.pool],
            ["pool-undefine", &self.pool],
        ] {
            let _ = virsh(&args);
        }
    }
}

#[test]
fn a_vagrant_box_comes_up_under_a_real_vagrant_and_shows_the_step() {
    if !require_vm(
        "vagrant_box",
        &[Part::Program("vagrant"), Part::Program("virsh")],
    ) {
        return;
    }
    let _daemon = Libvirtd::ensure();
    let (p, key) = built_lab();
    let out = p.path().join("out");
    fs_err::create_dir_all(&out).unwrap();
    let box_file = out.join("stamped.box");
    let box_arg = box_file.display().to_string();
    p.ok(&[
        "image",
        "export",
        "stamped",
        &box_arg,
        "--format",
        "vagrant-libvirt",
        "--compress",
    ]);
    let listing = Command::new("tar")
        .arg("-tf")
        .arg(&box_file)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&listing.stdout),
        "metadata.json\nVagrantfile\nbox.img\n"
    );

    let tag = nonce();
    let run = VagrantRun {
        dir: tempfile::tempdir().unwrap(),
        pool: format!("farm-vagrant-{tag}"),
        network: format!("farm-vagrant-{tag}"),
    };
    let pool_dir = run.dir.path().join("pool");
    fs_err::create_dir_all(&pool_dir).unwrap();
    let pool_target = pool_dir.display().to_string();
    for args in [
        vec!["pool-define-as", &run.pool, "dir", "--target", &pool_target],
        vec!["pool-start", &run.pool],
    ] {
        let done = virsh(&args);
        assert!(done.status.success(), "virsh {args:?}: {}", text(&done));
    }
    let serial = run.dir.path().join("serial.log");
    // Only what this machine needs (TCG, a pool and a management network of the test's
    // own, a serial log); login, shell and sudo come from the box's own Vagrantfile.
    fs_err::write(
        run.dir.path().join("Vagrantfile"),
        format!(
            r#"Vagrant.configure("2") do |config|
  config.vm.box = "farm-test/stamped"
  config.ssh.private_key_path = "{key}"
  config.vm.boot_timeout = 300
  config.vm.provider :libvirt do |libvirt|
    libvirt.uri = "{URI}"
    libvirt.driver = "qemu"
    libvirt.cpu_mode = "custom"
    libvirt.cpu_model = "qemu64"
    libvirt.memory = 256
    libvirt.storage_pool_name = "{pool}"
    libvirt.management_network_name = "{network}"
    libvirt.management_network_address = "192.168.214.0/24"
    libvirt.graphics_type = "none"
    libvirt.video_type = "none"
    libvirt.serial :type => "file", :source => {{:path => "{serial}"}}
  end
end
"#,
            key = key.private.display(),
            pool = run.pool,
            network = run.network,
            serial = serial.display(),
        ),
    )
    .unwrap();
    let added = run.vagrant(&["box", "add", "--name", "farm-test/stamped", &box_arg]);
    assert!(added.status.success(), "vagrant box add: {}", text(&added));
    let up = run.vagrant(&["up", "--provider=libvirt"]);
    assert!(
        up.status.success(),
        "vagrant up: {}\nserial console:\n{}",
        text(&up),
        farm::sys::hostinfo::tail(&serial, 40)
    );
    let said = run.vagrant(&["ssh", "-c", "cat /stamp"]);
    assert!(said.status.success(), "vagrant ssh: {}", text(&said));
    assert_eq!(
        String::from_utf8_lossy(&said.stdout).trim(),
        "exported-by-farm"
    );
}
