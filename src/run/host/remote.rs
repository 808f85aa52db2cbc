//! A host reached over ssh: a hypervisor VM (through its whole jump chain) or a remote
//! server. It implements the same `Host` operations as this machine, so starting,
//! inspecting and stopping a VM is one piece of code wherever the VM runs.
//!
//! One openssh session (a ControlMaster) per host; its commands are serialised by a mutex,
//! which costs nothing that matters (each is a short shell script) and keeps the session's
//! single-threaded runtime simple.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::model::shell::{quote_path, shell_quote};
use crate::run::host::{Host, HostError, Output};
use crate::sys::ssh::{Ssh, SshError};

pub struct RemoteHost {
    name: String,
    ssh: Mutex<Ssh>,
    /// How to connect again when the master is found dead between commands.
    config: PathBuf,
    alias: String,
    timeout: Duration,
}

/// Exit status `get` uses for "no such file", told apart from a failing `cat`.
const ABSENT: i32 = 3;

impl RemoteHost {
    /// Connects to `alias` as the generated ssh_config describes it (jumps included).
    pub fn connect(
        name: &str,
        ssh_config: &Path,
        alias: &str,
        timeout: Duration,
    ) -> Result<RemoteHost, SshError> {
        Ok(RemoteHost {
            name: name.to_string(),
            ssh: Mutex::new(Ssh::connect(ssh_config, alias, timeout)?),
            config: ssh_config.to_path_buf(),
            alias: alias.to_string(),
            timeout,
        })
    }

    /// The session, connected again first if its master has died since the last command
    /// (a guest under TCG can stall long enough for ssh's keepalive to give up on it).
    /// A command that was running when the master died is not repeated: it fails.
    fn live_session(&self) -> Result<std::sync::MutexGuard<'_, Ssh>, HostError> {
        let mut session = self.session();
        if !session.is_alive() {
            *session = Ssh::connect(&self.config, &self.alias, self.timeout)
                .map_err(|e| self.spawn_error(e))?;
        }
        Ok(session)
    }

    /// Whether its ssh connection still stands (it drops when the host reboots).
    pub fn is_alive(&self) -> bool {
        self.session().is_alive()
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Ssh> {
        self.ssh.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn_error(&self, e: SshError) -> HostError {
        HostError::Spawn {
            host: self.name.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    }

    fn failed(&self, path: &Path, out: &Output, write: bool) -> HostError {
        let source = std::io::Error::other(format!(
            "exit status {:?}: {}",
            out.status,
            out.said().trim()
        ));
        if write {
            HostError::Write {
                host: self.name.clone(),
                path: path.to_path_buf(),
                source,
            }
        } else {
            HostError::Read {
                host: self.name.clone(),
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

impl Host for RemoteHost {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(&self, script: &str) -> Result<Output, HostError> {
        self.live_session()?
            .run(script, None)
            .map_err(|e| self.spawn_error(e))
    }

    fn put(&self, bytes: &[u8], path: &Path, mode: u32) -> Result<(), HostError> {
        let target = quote_path(path);
        let tmp = shell_quote(&format!("{}.tmp.farm", path.display()));
        // Written beside and renamed, as on this machine: no reader sees half a file.
        let script = format!(
            "mkdir -p \"$(dirname {target})\" && cat > {tmp} && chmod {mode:o} {tmp} && mv -f {tmp} {target}"
        );
        let out = self
            .live_session()?
            .run(&script, Some(bytes))
            .map_err(|e| self.spawn_error(e))?;
        if !out.success() {
            return Err(self.failed(path, &out, true));
        }
        Ok(())
    }

    fn get(&self, path: &Path) -> Result<Option<Vec<u8>>, HostError> {
        let p = quote_path(path);
        let out = self
            .live_session()?
            .run(&format!("[ -e {p} ] || exit {ABSENT}; cat {p}"), None)
            .map_err(|e| self.spawn_error(e))?;
        match out.status {
            Some(0) => Ok(Some(out.stdout)),
            Some(ABSENT) => Ok(None),
            _ => Err(self.failed(path, &out, false)),
        }
    }

    fn run_with_input(
        &self,
        script: &str,
        input: &mut dyn std::io::Read,
        on_chunk: &mut dyn FnMut(&[u8]),
    ) -> Result<Output, HostError> {
        self.live_session()?
            .run_streamed(script, input, on_chunk)
            .map_err(|e| self.spawn_error(e))
    }

    /// Through a socket the ssh connection forwards, so the host needs no QMP client;
    /// `socat` there when the server refuses to forward (dropbear).
    fn qmp(&self, socket: &Path, command: &str) -> Result<(), HostError> {
        crate::run::host::qmp_over_ssh(&*self.live_session()?, socket, command)
            .map_err(|e| self.spawn_error(e))
    }

    /// Through the session's master: the session is held while `use_socket` runs.
    fn with_socket(
        &self,
        remote: &Path,
        use_socket: &mut dyn FnMut(&Path),
    ) -> Result<(), HostError> {
        self.live_session()?
            .with_forwarded_socket(remote, |local| use_socket(local))
            .map_err(|e| self.spawn_error(e))
    }

    /// Through the session's master, without holding the session: banners of several VMs
    /// are awaited at once.
    fn ssh_answers(&self, address: std::net::SocketAddr, timeout: Duration) -> bool {
        let control = self.session().control_socket();
        crate::sys::ssh::banner_through(&control, address, timeout)
    }
}
