//! Facts about the machine farm runs on, for choices the model makes (which accelerator).

use crate::model::build::qemu::KvmFacts;
use crate::model::values::Arch;

/// Probes `/dev/kvm` and the hardware KVM modules. A PVM `/dev/kvm` opens but has neither
/// `kvm_intel` nor `kvm_amd` loaded, and hangs stock kernels: it does not count.
pub fn kvm_facts() -> KvmFacts {
    let device_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let hardware_module = ["/sys/module/kvm_intel", "/sys/module/kvm_amd"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    KvmFacts {
        device_usable,
        hardware_module,
    }
}

pub fn host_arch() -> Option<Arch> {
    match std::env::consts::ARCH {
        "x86_64" => Some(Arch::X86_64),
        "aarch64" => Some(Arch::Aarch64),
        _ => None,
    }
}

/// A free TCP port on 127.0.0.1, chosen by the kernel. Another process may take it before
/// qemu binds it; qemu then fails to start and the caller retries with a new port.
pub fn free_local_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Memory the kernel says is available for new work (`MemAvailable`), in bytes.
pub fn memory_available() -> Option<u64> {
    let text = fs_err::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// Bytes an unprivileged writer may still put on the filesystem holding `path`.
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` is written by statvfs
    // before it is read (only when it returns 0).
    let stat = unsafe {
        if libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// The last `lines` lines of a text file (a serial console log), for error messages.
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    match fs_err::read(path) {
        Ok(bytes) => crate::model::text::last_lines_of_bytes(&bytes, lines),
        Err(e) => format!("(no log: {e})"),
    }
}
