//! Where VMs run. Starting, stopping and inspecting a VM is the same code on every host;
//! only running a command and reading or writing a file differ, and that is this trait.
//! `LocalHost` is this machine; an ssh host (a hypervisor VM, a remote server) implements
//! the same three operations over the jump chain.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use crate::ssh::Output;

/// How much of a streamed file is read and sent at a time.
pub const STREAM_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("Cannot run a command on host `{host}`: {source}")]
    Spawn {
        host: String,
        source: std::io::Error,
    },
    #[error("Cannot write `{}` on host `{host}`: {source}", path.display())]
    Write {
        host: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Cannot read `{}` on host `{host}`: {source}", path.display())]
    Read {
        host: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub trait Host: Send + Sync {
    /// The host's name in the topology.
    fn name(&self) -> &str;
    /// Runs `script` with `sh -c`; the caller judges the exit status.
    fn run(&self, script: &str) -> Result<Output, HostError>;
    /// Writes `bytes` to `path` with `mode`, creating parent directories.
    fn put(&self, bytes: &[u8], path: &Path, mode: u32) -> Result<(), HostError>;
    /// Reads a file; `Ok(None)` when it does not exist.
    fn get(&self, path: &Path) -> Result<Option<Vec<u8>>, HostError>;
    /// Streams `input` into `path` (parent directories created, replaced if present),
    /// showing each chunk to `on_chunk` as it goes (hashing, progress): large files are read
    /// once and never held in memory.
    fn put_stream(
        &self,
        input: &mut dyn std::io::Read,
        path: &Path,
        on_chunk: &mut dyn FnMut(&[u8]),
    ) -> Result<(), HostError>;
    /// blake3 of a file as the host reads it back; `Ok(None)` when it does not exist.
    fn blake3(&self, path: &Path) -> Result<Option<crate::model::hash::ContentHash>, HostError>;
    /// Sends a QMP command to the qemu listening on `socket` (best effort: a qemu that
    /// is going away may not answer).
    fn qmp(&self, socket: &Path, command: &str) -> Result<(), HostError> {
        qmp_with_socat(self, socket, command)
    }
}

/// QMP through `socat` on the host: for hosts whose ssh server cannot forward a socket.
pub fn qmp_with_socat<H: Host + ?Sized>(
    host: &H,
    socket: &Path,
    command: &str,
) -> Result<(), HostError> {
    let script = format!(
        "printf '%s\\n' '{{\"execute\":\"qmp_capabilities\"}}' '{{\"execute\":\"{command}\"}}' | \
         timeout 5 socat - UNIX-CONNECT:{} >/dev/null 2>&1 || true",
        crate::ssh::shell_quote(&socket.display().to_string())
    );
    host.run(&script).map(|_| ())
}

/// A shell test, true when `pidfile` names a live process that has `argument` as one of
/// its command-line arguments (pids are reused, so a live pid alone proves nothing). It
/// leaves the pid in `$pid` for the script that follows.
pub fn process_alive_test(pidfile: &Path, argument: &str) -> String {
    format!(
        "{{ pid=$(cat {pidfile} 2>/dev/null) && [ -n \"$pid\" ] && tr '\\0' '\\n' < /proc/$pid/cmdline 2>/dev/null | grep -qxF {argument}; }}",
        pidfile = crate::ssh::shell_quote(&pidfile.display().to_string()),
        argument = crate::ssh::shell_quote(argument),
    )
}

/// This machine.
pub struct LocalHost {
    pub name: String,
}

impl Host for LocalHost {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(&self, script: &str) -> Result<Output, HostError> {
        let out = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| HostError::Spawn {
                host: self.name.clone(),
                source,
            })?;
        Ok(Output {
            status: out.status.code(),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    fn put(&self, bytes: &[u8], path: &Path, mode: u32) -> Result<(), HostError> {
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                fs_err::create_dir_all(dir)?;
            }
            // Written beside and renamed: a reader never sees half a file.
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            let mut file = fs_err::File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs_err::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            fs_err::rename(&tmp, path)
        };
        write().map_err(|source| HostError::Write {
            host: self.name.clone(),
            path: path.to_path_buf(),
            source,
        })
    }

    fn qmp(&self, socket: &Path, command: &str) -> Result<(), HostError> {
        // Best effort by design: the caller checks the process afterwards.
        let _ = crate::qmp::execute(socket, command);
        Ok(())
    }

    fn put_stream(
        &self,
        input: &mut dyn std::io::Read,
        path: &Path,
        on_chunk: &mut dyn FnMut(&[u8]),
    ) -> Result<(), HostError> {
        let mut write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                fs_err::create_dir_all(dir)?;
            }
            let mut file = fs_err::File::create(path)?;
            let mut buf = vec![0u8; STREAM_CHUNK];
            loop {
                let n = input.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                on_chunk(&buf[..n]);
                file.write_all(&buf[..n])?;
            }
            file.sync_all()
        };
        write().map_err(|source| HostError::Write {
            host: self.name.clone(),
            path: path.to_path_buf(),
            source,
        })
    }

    fn blake3(&self, path: &Path) -> Result<Option<crate::model::hash::ContentHash>, HostError> {
        let read = || -> std::io::Result<crate::model::hash::ContentHash> {
            let mut hasher = blake3::Hasher::new();
            hasher.update_reader(fs_err::File::open(path)?)?;
            Ok(crate::model::hash::ContentHash::from_blake3(
                hasher.finalize(),
            ))
        };
        match read() {
            Ok(hash) => Ok(Some(hash)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HostError::Read {
                host: self.name.clone(),
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn get(&self, path: &Path) -> Result<Option<Vec<u8>>, HostError> {
        match fs_err::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HostError::Read {
                host: self.name.clone(),
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}
