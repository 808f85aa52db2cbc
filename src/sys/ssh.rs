//! A blocking ssh session to a VM, on the openssh crate (OpenSSH's own client with a
//! ControlMaster, so each command after the first costs one multiplexed channel, not a
//! handshake). Connections are described by an ssh_config file — the same one users get —
//! because openssh's builder options do not reach jump hosts.

use std::path::Path;
use std::time::{Duration, Instant};

use openssh::{KnownHosts, Session, SessionBuilder, Stdio};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("Cannot connect to `{alias}` over ssh: {source}")]
    Connect {
        alias: String,
        #[source]
        source: openssh::Error,
    },
    #[error("Running `{command}` on `{alias}` failed: {source}")]
    Command {
        alias: String,
        command: String,
        #[source]
        source: openssh::Error,
    },
    #[error("Cannot forward a local socket to `{}` on `{alias}`: {source}", remote.display())]
    Forward {
        alias: String,
        remote: std::path::PathBuf,
        #[source]
        source: openssh::Error,
    },
    #[error("Cannot make a directory for a forwarded socket: {0}")]
    ForwardDir(std::io::Error),
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
}

pub struct Ssh {
    runtime: tokio::runtime::Runtime,
    session: Option<Session>,
    alias: String,
}

impl Ssh {
    /// Connects to `alias` as described in `config_file` (with its pinned known_hosts).
    pub fn connect(config_file: &Path, alias: &str, timeout: Duration) -> Result<Ssh, SshError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(SshError::Runtime)?;
        let session = runtime
            .block_on(
                SessionBuilder::default()
                    .config_file(config_file)
                    .known_hosts_check(KnownHosts::Strict)
                    .connect_timeout(timeout)
                    .server_alive_interval(Duration::from_secs(15))
                    .connect(alias),
            )
            .map_err(|source| SshError::Connect {
                alias: alias.to_string(),
                source,
            })?;
        Ok(Ssh {
            runtime,
            session: Some(session),
            alias: alias.to_string(),
        })
    }

    /// Keeps trying to connect until `deadline`; `still_alive` is asked between attempts so
    /// a VM that died fails at once instead of at the deadline.
    pub fn wait_for(
        config_file: &Path,
        alias: &str,
        deadline: Instant,
        mut still_alive: impl FnMut() -> Result<(), String>,
    ) -> Result<Ssh, WaitError> {
        loop {
            still_alive().map_err(WaitError::Died)?;
            let last_error = match Ssh::connect(config_file, alias, Duration::from_secs(5)) {
                Ok(ssh) => match ssh.run("true", None) {
                    Ok(out) if out.success() => return Ok(ssh),
                    Ok(out) => out.text(),
                    Err(e) => error_chain(&e),
                },
                Err(e) => error_chain(&e),
            };
            if Instant::now() >= deadline {
                return Err(WaitError::Timeout { last_error });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn session(&self) -> &Session {
        self.session.as_ref().expect("the session lives until drop")
    }

    /// Runs `script` with the remote user's shell, optionally feeding `stdin`.
    pub fn run(&self, script: &str, stdin: Option<&[u8]>) -> Result<Output, SshError> {
        let command_error = |source| SshError::Command {
            alias: self.alias.clone(),
            command: script.to_string(),
            source,
        };
        self.runtime.block_on(async {
            let mut command = self.session().shell(script);
            command
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = command.spawn().await.map_err(command_error)?;
            if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin().take()) {
                pipe.write_all(bytes)
                    .await
                    .map_err(|source| SshError::Stdin {
                        alias: self.alias.clone(),
                        command: script.to_string(),
                        source,
                    })?;
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
        let dir = tempfile::Builder::new()
            .prefix("farm-fwd")
            .tempdir()
            .map_err(SshError::ForwardDir)?;
        let local = dir.path().join("s");
        let forward_error = |source| SshError::Forward {
            alias: self.alias.clone(),
            remote: remote_socket.to_path_buf(),
            source,
        };
        self.runtime
            .block_on(self.session().request_port_forward(
                openssh::ForwardType::Local,
                local.as_path(),
                remote_socket,
            ))
            .map_err(forward_error)?;
        let result = use_socket(&local);
        let _ = self.runtime.block_on(self.session().close_port_forward(
            openssh::ForwardType::Local,
            local.as_path(),
            remote_socket,
        ));
        Ok(result)
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }
}

impl Drop for Ssh {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = self.runtime.block_on(session.close());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("The VM stopped before ssh answered: {0}")]
    Died(String),
    #[error("ssh did not answer before the deadline; last error: {last_error}")]
    Timeout { last_error: String },
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Single-quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quotes_for_posix_shells() {
        assert_eq!(shell_quote("/etc/motd"), "'/etc/motd'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
