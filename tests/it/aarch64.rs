//! aarch64 guests under TCG on this x86_64 host: farm's tiny image built for arm64 (kernel,
//! busybox and dropbear from the mirror's arm64 packages), a platform on it whose `run` step
//! executes in an arm64 build VM, and an instance of it reached over ssh.

use crate::support::project;
use crate::support::skip::require_vm;
use crate::support::test_home::shared_store;

use farm::build::layer::BootFiles;

use project::Project;

const ARM_LAB: &str = r#"
[images.tiny]
tiny = true

[targets.arm64]
arch = "aarch64"

[platforms.armed]
from = "tiny"
memory = "256M"
run = ["uname -m > /etc/built-on", "cat /proc/cpuinfo | grep -c ^processor > /etc/cpus"]

[vms.arm]
platform = "armed"
hostname = "arm-host"
"#;

fn ssh(p: &Project, vm: &str, script: &str) -> String {
    let out = p.ok(&["ssh", vm, "--", script]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn an_arm64_tiny_vm_and_platform_build_and_boot_under_tcg() {
    if !require_vm("aarch64", &[]) {
        return;
    }
    if farm::sys::programs::find_program("qemu-system-aarch64").is_none() {
        panic!("qemu-system-aarch64 is missing; run ./scripts/setup.sh");
    }
    let p = Project::with_store(ARM_LAB, &shared_store());
    p.ok(&["build"]);

    // The image boots on the arm `virt` board's PL011 console, with arm64's kernel.
    let image = p.entry("tiny-arm64");
    let boot = BootFiles::in_dir(&image.join("boot")).expect("the arm64 tiny image has boot files");
    assert!(boot.cmdline.contains("console=ttyAMA0"), "{}", boot.cmdline);
    // An arm64 kernel Image: its header carries the magic `ARM\x64` at byte 56.
    let kernel = fs_err::read(&boot.kernel).unwrap();
    assert_eq!(
        &kernel[56..60],
        b"ARM\x64",
        "`{}` is no arm64 Image",
        boot.kernel.display()
    );

    p.ok(&["up"]);
    // The instance, and the build VM that ran the platform's step, are both aarch64.
    assert_eq!(ssh(&p, "arm", "uname -m"), "aarch64");
    assert_eq!(ssh(&p, "arm", "cat /etc/built-on"), "aarch64");
    assert_eq!(ssh(&p, "arm", "hostname"), "arm-host");
    let status = p.status_of("arm");
    assert_eq!(status["state"], "running", "{status}");
    p.ok(&["down"]);
}
