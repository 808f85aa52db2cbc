//! libvirtd for tests and benchmarks: the running one, or one started here (no systemd on
//! these machines: `virtlogd -d`, `libvirtd -d`, as ENVIRONMENT.md describes) and stopped
//! when the last user in this process is done.

use std::process::Command;
use std::time::{Duration, Instant};

pub const URI: &str = "qemu:///system";

pub fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .output()
        .expect("virsh (libvirt-clients; run ./scripts/setup.sh)")
}

/// A use of libvirtd; the daemon this process started goes with the last one.
pub struct Libvirtd;

/// (tests using libvirtd now, whether this process started it)
static DAEMON: std::sync::Mutex<(usize, bool)> = std::sync::Mutex::new((0, false));

impl Libvirtd {
    pub fn ensure() -> Libvirtd {
        let mut daemon = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
        daemon.0 += 1;
        if virsh(&["version"]).status.success() {
            return Libvirtd;
        }
        // What systemd's units and a long-used machine have: libvirtd's network driver
        // writes a network's dnsmasq files into `dnsmasq/` and does not make it.
        for dir in [
            "/var/log/libvirt",
            "/var/run/libvirt",
            "/var/lib/libvirt/dnsmasq",
        ] {
            fs_err::create_dir_all(dir).unwrap();
        }
        for program in ["virtlogd", "libvirtd"] {
            let status = Command::new(program)
                .arg("-d")
                .status()
                .unwrap_or_else(|e| panic!("cannot run {program} ({e}); run ./scripts/setup.sh"));
            assert!(status.success(), "{program} -d failed");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !virsh(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "libvirtd did not answer at {URI} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        daemon.1 = true;
        Libvirtd
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let mut daemon = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
        daemon.0 -= 1;
        if daemon.0 > 0 || !daemon.1 {
            return;
        }
        for pidfile in ["/var/run/libvirtd.pid", "/var/run/virtlogd.pid"] {
            if let Ok(pid) = fs_err::read_to_string(pidfile) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
        daemon.1 = false;
    }
}
