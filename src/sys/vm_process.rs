//! A qemu process that farm waits on (a build VM). It dies with farm: the kernel sends it
//! SIGKILL when farm exits for any reason (`PR_SET_PDEATHSIG`), and dropping the handle
//! kills it, so an error path or a killed farm never leaves a build VM running.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::model::build::qemu::QemuVm;

pub struct VmProcess {
    child: Child,
    pub serial_log: PathBuf,
    binary: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum VmProcessError {
    #[error("Cannot start `{binary}`: {source}\nhint: apt-get install qemu-system-x86 qemu-utils")]
    Spawn {
        binary: &'static str,
        source: std::io::Error,
    },
}

impl VmProcess {
    /// Starts `vm` as a child; qemu's own stderr goes to `stderr_log`.
    pub fn start(vm: &QemuVm, stderr_log: &Path) -> Result<VmProcess, VmProcessError> {
        let binary = vm.binary();
        let spawn_error = |source| VmProcessError::Spawn { binary, source };
        let stderr = fs_err::File::create(stderr_log).map_err(spawn_error)?;
        let mut command = Command::new(binary);
        command
            .args(vm.argv())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr.into_parts().0));
        // SAFETY: prctl is async-signal-safe and touches only this (forked) process.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(spawn_error)?;
        Ok(VmProcess {
            child,
            serial_log: vm.serial_log.clone(),
            binary,
        })
    }

    /// `Ok` while running; the exit status once it has stopped.
    pub fn check_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("{} exited ({status})", self.binary)),
            Err(e) => Err(format!("cannot wait for {}: {e}", self.binary)),
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}
