//! Where VMs run. Starting, stopping and inspecting a VM is the same code on every host;
//! only running a command and reading or writing a file differ, and that is this trait.
//! `LocalHost` is this machine; an ssh host (a hypervisor VM, a remote server) implements
//! the same three operations over the jump chain.

use crate::model::shell::quote_path;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub use crate::sys::ssh::Output;

pub mod remote;

pub use crate::sys::ssh::STREAM_CHUNK;

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
    /// The last `lines` lines of a log here, or why there are none, for error messages.
    fn tail(&self, path: &Path, lines: usize) -> String {
        match self.get(path) {
            Ok(Some(bytes)) => crate::model::text::last_lines_of_bytes(&bytes, lines),
            Ok(None) => format!("(no `{}` on {})", path.display(), self.name()),
            Err(e) => format!("(cannot read `{}`: {e})", path.display()),
        }
    }
    /// Runs `script` with `input` streamed to its stdin a chunk at a time, each chunk shown
    /// to `on_chunk` first (progress): large transfers are read once and never held in
    /// memory. For scripts that print little (`tar -x`, a checksum report).
    fn run_with_input(
        &self,
        script: &str,
        input: &mut dyn std::io::Read,
        on_chunk: &mut dyn FnMut(&[u8]),
    ) -> Result<Output, HostError>;
    /// Sends a QMP command to the qemu listening on `socket` (best effort: a qemu that
    /// is going away may not answer).
    fn qmp(&self, socket: &Path, command: &str) -> Result<(), HostError> {
        qmp_with_socat(self, socket, command)
    }
    /// Whether an ssh server answers at `address` as seen from the host (its banner).
    fn ssh_answers(&self, address: SocketAddr, timeout: Duration) -> bool;
    /// Whether this is the machine farm runs on (its sockets are reached directly).
    fn is_local(&self) -> bool {
        false
    }
    /// Runs `use_socket` with a path on this machine that reaches the Unix socket `remote`
    /// on the host (itself on this machine; forwarded by the ssh connection elsewhere), so
    /// a client library here talks to a daemon there (libvirtd).
    fn with_socket(
        &self,
        remote: &Path,
        use_socket: &mut dyn FnMut(&Path),
    ) -> Result<(), HostError>;
}

/// Everything a child's output pipe still has.
fn drain(pipe: Option<impl std::io::Read>) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Some(mut pipe) = pipe {
        let _ = pipe.read_to_end(&mut bytes);
    }
    bytes
}

/// QMP through `socat` on the host: for hosts whose ssh server cannot forward a socket.
pub fn qmp_with_socat<H: Host + ?Sized>(
    host: &H,
    socket: &Path,
    command: &str,
) -> Result<(), HostError> {
    host.run(&socat_qmp_script(socket, command)).map(|_| ())
}

/// Runs `work` on a QMP session with the qemu listening on `socket` on `host` (through a
/// socket farm's ssh connection forwards when the host is remote or a hypervisor VM),
/// connecting until `connect_for` has passed (a qemu just started makes its socket a
/// moment later). `unreachable` makes the error of a session that could not be had.
pub fn with_qmp<T, E: From<HostError>>(
    host: &dyn Host,
    socket: &Path,
    connect_for: Duration,
    work: impl FnOnce(&mut crate::sys::qmp::Qmp) -> Result<T, E>,
    unreachable: impl Fn(String) -> E,
) -> Result<T, E> {
    use crate::sys::qmp::Qmp;
    let mut work = Some(work);
    let mut result = None;
    host.with_socket(socket, &mut |local| {
        let deadline = std::time::Instant::now() + connect_for;
        let session = loop {
            match Qmp::connect(local, Duration::from_secs(60)) {
                Ok(qmp) => break Ok(qmp),
                Err(e) if std::time::Instant::now() >= deadline => break Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        if let Some(work) = work.take() {
            result = Some(
                session
                    .map_err(|e| unreachable(e.to_string()))
                    .and_then(|mut qmp| work(&mut qmp)),
            );
        }
    })?;
    result.unwrap_or_else(|| {
        Err(unreachable(format!(
            "Cannot reach QMP socket `{}` on host `{}`",
            socket.display(),
            host.name()
        )))
    })
}

/// A shell script sending QMP `command` to `socket` with `socat` (best effort).
fn socat_qmp_script(socket: &Path, command: &str) -> String {
    format!(
        "printf '%s\\n' '{{\"execute\":\"qmp_capabilities\"}}' '{{\"execute\":\"{command}\"}}' | \
         timeout 5 socat - UNIX-CONNECT:{} >/dev/null 2>&1 || true",
        quote_path(socket)
    )
}

/// QMP `command` to `socket` on the machine `ssh` is logged into: through a socket the
/// connection forwards, so that machine needs no QMP client; `socat` there when its
/// server refuses to forward (dropbear). Best effort, as on this machine: the caller
/// checks the process afterwards.
pub fn qmp_over_ssh(
    ssh: &crate::sys::ssh::Ssh,
    socket: &Path,
    command: &str,
) -> Result<(), crate::sys::ssh::SshError> {
    match ssh.with_forwarded_socket(socket, |local| crate::sys::qmp::execute(local, command)) {
        Ok(_) => Ok(()),
        Err(_) => ssh
            .run(&socat_qmp_script(socket, command), None)
            .map(|_| ()),
    }
}

/// A shell test, true when `pidfile` names a live process that has `argument` as one of
/// its command-line arguments; it leaves the pid in `$pid`.
pub fn process_alive_test(pidfile: &Path, argument: &str) -> String {
    crate::model::lab::observation::alive_test(
        &quote_path(pidfile),
        &crate::model::shell::shell_quote(argument),
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
        // Replaced whole: a reader never sees half a file.
        crate::sys::files::replace_file(path, bytes, mode).map_err(|source| HostError::Write {
            host: self.name.clone(),
            path: path.to_path_buf(),
            source,
        })
    }

    fn qmp(&self, socket: &Path, command: &str) -> Result<(), HostError> {
        // Best effort by design: the caller checks the process afterwards.
        let _ = crate::sys::qmp::execute(socket, command);
        Ok(())
    }

    fn ssh_answers(&self, address: SocketAddr, timeout: Duration) -> bool {
        crate::sys::ssh::tcp_banner(address, timeout)
    }

    fn is_local(&self) -> bool {
        true
    }

    fn with_socket(
        &self,
        remote: &Path,
        use_socket: &mut dyn FnMut(&Path),
    ) -> Result<(), HostError> {
        use_socket(remote);
        Ok(())
    }

    fn run_with_input(
        &self,
        script: &str,
        input: &mut dyn std::io::Read,
        on_chunk: &mut dyn FnMut(&[u8]),
    ) -> Result<Output, HostError> {
        let spawn_error = |source| HostError::Spawn {
            host: self.name.clone(),
            source,
        };
        let mut child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let mut stdin = child.stdin.take();
        // Output is drained beside the writer, so a chatty script cannot stall the stream.
        let (out, err) = std::thread::scope(|scope| {
            let out = scope.spawn(move || drain(stdout));
            let err = scope.spawn(move || drain(stderr));
            if let Some(pipe) = stdin.as_mut() {
                let mut buf = vec![0u8; STREAM_CHUNK];
                // A script that stops reading early (it failed) closes the pipe: its exit
                // status says why, so write errors end the stream quietly.
                while let Ok(n) = input.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    on_chunk(&buf[..n]);
                    if pipe.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
            drop(stdin.take());
            (
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
            )
        });
        let status = child.wait().map_err(spawn_error)?;
        Ok(Output {
            status: status.code(),
            stdout: out,
            stderr: err,
        })
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
