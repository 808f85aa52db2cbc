//! A blocking ssh session to a VM, on the openssh crate (OpenSSH's own client with a
//! ControlMaster, so each command after the first costs one multiplexed channel, not a
//! handshake). Connections are described by an ssh_config file — the same one users get —
//! because openssh's builder options do not reach jump hosts.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::model::shell::{quote_path, shell_quote};
use openssh::{Session, Stdio};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("Cannot connect to `{alias}` over ssh: {source}")]
    Connect {
        alias: String,
        #[source]
        source: openssh::Error,
    },
    #[error("Running `{command}` on `{alias}` failed: {source}{master_log}")]
    Command {
        alias: String,
        command: String,
        #[source]
        source: openssh::Error,
        /// When the connection itself failed: the last lines of the ControlMaster's own log
        /// (why ssh gave up on the host), else empty.
        master_log: String,
    },
    #[error("Cannot forward a local socket to `{remote}` on `{alias}`: {source}")]
    Forward {
        alias: String,
        remote: String,
        #[source]
        source: openssh::Error,
    },
    #[error("`{command}` on `{alias}` did not finish within {} s", limit.as_secs())]
    TimedOut {
        alias: String,
        command: String,
        limit: Duration,
    },
    #[error("Cannot make a directory for a forwarded socket: {0}")]
    ForwardDir(std::io::Error),
    #[error("Cannot make a directory for ssh's control socket: {0}")]
    ControlDir(std::io::Error),
    #[error("Cannot start the async runtime for ssh: {0}")]
    Runtime(std::io::Error),
    #[error("Writing to `{command}` on `{alias}` failed: {source}")]
    Stdin {
        alias: String,
        command: String,
        #[source]
        source: std::io::Error,
    },
}

/// How much of a streamed input is read and sent at a time.
pub const STREAM_CHUNK: usize = 1 << 20;

/// What a remote command did.
#[derive(Clone, Debug)]
pub struct Output {
    pub status: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// stdout and stderr together, lossily decoded: what goes to build logs.
    pub fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&self.stderr));
        s
    }

    /// [`Output::text`] for a message on the user's terminal: the other machine wrote it, so
    /// it is made printable and its end kept (`model::text::printable`).
    pub fn said(&self) -> String {
        crate::model::text::printable(&self.text())
    }
}

pub struct Ssh {
    runtime: tokio::runtime::Runtime,
    session: Option<Session>,
    alias: String,
    master: Option<Master>,
}

/// farm's own ControlMaster: a child of farm (see `sys::process`), so no master outlives it.
struct Master {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

/// How long a master may take beyond ssh's own connect timeout (authentication, a jump
/// through a hypervisor VM under TCG).
const MASTER_GRACE: Duration = Duration::from_secs(20);

impl Ssh {
    /// Connects to `alias` as described in `config_file` (with its pinned known_hosts),
    /// through a ControlMaster farm runs as its own child.
    pub fn connect(config_file: &Path, alias: &str, timeout: Duration) -> Result<Ssh, SshError> {
        Ssh::connect_through(config_file, alias, timeout, None)
    }

    /// Like `connect`, but reaching `alias` through `jump`, the control socket of a
    /// connection farm already holds to the VM `alias` runs on, instead of the config's
    /// `ProxyJump` (a new ssh login into every hop: most of a second under TCG).
    pub fn connect_through(
        config_file: &Path,
        alias: &str,
        timeout: Duration,
        jump: Option<&Path>,
    ) -> Result<Ssh, SshError> {
        let connect_error = |message: String| SshError::Connect {
            alias: alias.to_string(),
            source: openssh::Error::Connect(std::io::Error::other(message)),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(SshError::Runtime)?;
        // Unix socket paths are short (108 bytes): a directory of its own under /tmp.
        let dir = tempfile::Builder::new()
            .prefix("farm-ssh")
            .tempdir_in(std::env::temp_dir())
            .map_err(SshError::ControlDir)?;
        let ctl = dir.path().join("m");
        let log = dir.path().join("log");
        let mut command = std::process::Command::new("ssh");
        command
            .arg("-F")
            .arg(config_file)
            .args(["-M", "-N", "-S"])
            .arg(&ctl)
            .arg("-E")
            .arg(&log)
            .args(["-o", "ControlPersist=no", "-o", "BatchMode=yes"])
            // Its log (`-E`) then says when and why the connection ended, which a command
            // that fails with it can only guess (`master_log_for`).
            .args(["-o", "LogLevel=VERBOSE"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("ConnectTimeout={}", timeout.as_secs().max(1)))
            // Two minutes of silence before giving up: a guest under (nested) TCG on a
            // busy machine can stall for most of one.
            .args([
                "-o",
                "ServerAliveInterval=15",
                "-o",
                "ServerAliveCountMax=8",
            ]);
        if let Some(jump) = jump {
            // A command-line option comes first, so it wins over the config's ProxyJump.
            command.arg("-o").arg(format!(
                "ProxyCommand=ssh -S {} -o BatchMode=yes -W %h:%p none",
                quote_path(jump).replace('%', "%%")
            ));
        }
        command
            .args(["--", alias])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = crate::sys::process::spawn_helper(command, Some(dir.path().to_path_buf()))
            .map_err(|e| connect_error(format!("cannot run ssh: {e}")))?;
        let mut master = Master { child, dir };
        // The master makes its control socket once it is logged in.
        let deadline = Instant::now() + timeout + MASTER_GRACE;
        while !ctl.exists() {
            let exited = master.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let why = fs_err::read_to_string(&log)
                    .map(|t| t.trim().to_string())
                    .ok()
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| match exited {
                        Some(status) => format!("ssh exited ({status})"),
                        None => "timed out".into(),
                    });
                master.stop();
                return Err(connect_error(why));
            }
            std::thread::sleep(Duration::from_millis(15));
        }
        let session = Session::resume(ctl.into_boxed_path(), Some(log.into_boxed_path()));
        Ok(Ssh {
            runtime,
            session: Some(session),
            alias: alias.to_string(),
            master: Some(master),
        })
    }

    /// For an error that may be the connection's own (openssh cannot tell a remote
    /// process killed by a signal from a master that went away: both are ssh's exit 255),
    /// the last lines of the master's log, which say why ssh gave up when it did.
    fn master_log_for(&self, error: &openssh::Error) -> String {
        if !matches!(
            error,
            openssh::Error::RemoteProcessTerminated | openssh::Error::Disconnected
        ) {
            return String::new();
        }
        let Some(master) = &self.master else {
            return String::new();
        };
        let log = crate::sys::hostinfo::tail(&master.dir.path().join("log"), 5);
        match log.trim() {
            "" => " (the ControlMaster's log is empty)".to_string(),
            said => format!(
                "\nthe ControlMaster's log ends:\n{}",
                crate::model::text::printable(said)
            ),
        }
    }

    fn session(&self) -> &Session {
        self.session.as_ref().expect("the session lives until drop")
    }

    /// Runs `script` with the remote user's shell, feeding it `stdin` (an empty stdin when
    /// `None`).
    pub fn run(&self, script: &str, stdin: Option<&[u8]>) -> Result<Output, SshError> {
        self.run_streamed(script, &mut stdin.unwrap_or_default(), &mut |_| {})
    }

    /// Runs `script` with `input` streamed to its stdin a chunk at a time, each chunk shown
    /// to `on_chunk` first. For scripts that read stdin and print little (`cat > FILE`).
    pub fn run_streamed(
        &self,
        script: &str,
        input: &mut dyn std::io::Read,
        on_chunk: &mut dyn FnMut(&[u8]),
    ) -> Result<Output, SshError> {
        let command_error = |source| SshError::Command {
            alias: self.alias.clone(),
            command: script.to_string(),
            master_log: self.master_log_for(&source),
            source,
        };
        let stdin_error = |source| SshError::Stdin {
            alias: self.alias.clone(),
            command: script.to_string(),
            source,
        };
        self.runtime.block_on(async {
            let mut command = self.session().shell(script);
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = command.spawn().await.map_err(command_error)?;
            if let Some(mut pipe) = child.stdin().take() {
                let mut buf = vec![0u8; STREAM_CHUNK];
                loop {
                    let n = input.read(&mut buf).map_err(stdin_error)?;
                    if n == 0 {
                        break;
                    }
                    on_chunk(&buf[..n]);
                    pipe.write_all(&buf[..n]).await.map_err(stdin_error)?;
                }
                pipe.shutdown().await.map_err(stdin_error)?;
                drop(pipe);
            }
            let out = child.wait_with_output().await.map_err(command_error)?;
            Ok(Output {
                status: out.status.code(),
                stdout: out.stdout,
                stderr: out.stderr,
            })
        })
    }

    /// [`Ssh::run`] without input, given up after `limit`: for a guest that may be frozen
    /// (qemu pauses a VM whose disk filled up), where waiting is waiting for ever.
    pub fn run_within(&self, script: &str, limit: Duration) -> Result<Output, SshError> {
        self.runtime.block_on(async {
            let mut command = self.session().shell(script);
            command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let command_error = |source| SshError::Command {
                alias: self.alias.clone(),
                command: script.to_string(),
                master_log: self.master_log_for(&source),
                source,
            };
            let child = command.spawn().await.map_err(command_error)?;
            let out = tokio::time::timeout(limit, child.wait_with_output())
                .await
                .map_err(|_| SshError::TimedOut {
                    alias: self.alias.clone(),
                    command: script.to_string(),
                    limit,
                })?
                .map_err(command_error)?;
            Ok(Output {
                status: out.status.code(),
                stdout: out.stdout,
                stderr: out.stderr,
            })
        })
    }

    /// Writes `bytes` to `remote_path` (parent directories created) with `mode`.
    pub fn upload(&self, bytes: &[u8], remote_path: &str, mode: u32) -> Result<Output, SshError> {
        let path = shell_quote(remote_path);
        let script =
            format!("mkdir -p \"$(dirname {path})\" && cat > {path} && chmod {mode:o} {path}");
        self.run(&script, Some(bytes))
    }

    /// Reads a remote file whole.
    pub fn download(&self, remote_path: &str) -> Result<Output, SshError> {
        self.run(&format!("cat {}", shell_quote(remote_path)), None)
    }

    /// Runs `use_socket` with a local Unix socket that the ControlMaster forwards to
    /// `remote_socket` on the host, so local clients (QMP) reach remote sockets without a
    /// relay program there. The forward is closed afterwards.
    pub fn with_forwarded_socket<T>(
        &self,
        remote_socket: &Path,
        use_socket: impl FnOnce(&Path) -> T,
    ) -> Result<T, SshError> {
        self.with_forward(
            openssh::Socket::UnixSocket {
                path: remote_socket.into(),
            },
            &remote_socket.display().to_string(),
            use_socket,
        )
    }

    /// The master's control socket: other ssh processes use the connection through it.
    pub fn control_socket(&self) -> std::path::PathBuf {
        self.session().control_socket().to_path_buf()
    }

    fn with_forward<T>(
        &self,
        remote: openssh::Socket<'_>,
        describe: &str,
        use_socket: impl FnOnce(&Path) -> T,
    ) -> Result<T, SshError> {
        let dir = tempfile::Builder::new()
            .prefix("farm-fwd")
            .tempdir()
            .map_err(SshError::ForwardDir)?;
        let local = dir.path().join("s");
        let forward_error = |source| SshError::Forward {
            alias: self.alias.clone(),
            remote: describe.into(),
            source,
        };
        self.runtime
            .block_on(self.session().request_port_forward(
                openssh::ForwardType::Local,
                local.as_path(),
                remote.clone(),
            ))
            .map_err(forward_error)?;
        let result = use_socket(&local);
        let _ = self.runtime.block_on(self.session().close_port_forward(
            openssh::ForwardType::Local,
            local.as_path(),
            remote,
        ));
        Ok(result)
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// Whether the master still has its connection (a hypervisor VM that restarted drops it).
    pub fn is_alive(&self) -> bool {
        self.runtime.block_on(self.session().check()).is_ok()
    }
}

impl Master {
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        crate::sys::process::release(self.child.id());
        let _ = fs_err::remove_dir_all(self.dir.path());
    }
}

impl Drop for Ssh {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = self.runtime.block_on(session.close());
        }
        if let Some(mut master) = self.master.take() {
            master.stop();
        }
    }
}

/// Whether an ssh server speaks on `stream` (within its read timeout): it sends its version line
/// (`SSH-2.0-…`) first, before any key exchange. QEMU's user networking accepts a
/// forwarded connection even when nothing listens in the guest, then closes it: only the
/// banner proves sshd is there.
fn banner_within(mut stream: impl std::io::Read) -> bool {
    let mut banner = [0u8; 4];
    stream.read_exact(&mut banner).is_ok() && &banner == b"SSH-"
}

/// [`banner_within`] for a TCP address reachable from here.
pub fn tcp_banner(address: std::net::SocketAddr, timeout: Duration) -> bool {
    match std::net::TcpStream::connect_timeout(&address, timeout) {
        Ok(stream) => {
            let _ = stream.set_read_timeout(Some(timeout));
            banner_within(stream)
        }
        Err(_) => false,
    }
}

/// [`banner_within`] for `address` as seen from a host, through the ControlMaster whose
/// control socket is `control`: `ssh -W` opens one channel to it (no listener to set up and
/// cancel), so several can be asked at once.
pub fn banner_through(control: &Path, address: std::net::SocketAddr, timeout: Duration) -> bool {
    let target = match address {
        std::net::SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        std::net::SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    let Ok(mut child) = std::process::Command::new("ssh")
        .arg("-S")
        .arg(control)
        .args(["-o", "BatchMode=yes", "-W", &target, "none"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return false;
    };
    let (sender, receiver) = std::sync::mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            let _ = sender.send(banner_within(stdout));
        });
    }
    let answered = receiver.recv_timeout(timeout).unwrap_or(false);
    let _ = child.kill();
    let _ = child.wait();
    answered
}

/// Asks the ControlMaster whose control socket is `control` to exit, and removes the socket.
/// Used for the users' shared connection to a VM farm stopped, replaced or restored: that
/// master still holds a connection to the VM's earlier self, and every `ssh`, scp or Ansible
/// task through it would get a channel over a connection that is dead (or dies once the new
/// VM resets it). Nothing happens when no socket is there.
pub fn stop_master(control: &Path) {
    if !control.exists() {
        return;
    }
    let _ = std::process::Command::new("ssh")
        .arg("-S")
        .arg(control)
        .args(["-O", "exit", "none"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let _ = fs_err::remove_file(control);
}
