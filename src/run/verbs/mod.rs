//! The verbs scripts call on a running lab: `farm exec` and `farm wait` here, `farm cp`
//! in `transfer`, and those that act on a VM's virtual hardware in `machine`.
//!
//! Each goes through the users' ssh_config (`.farm/ssh_config`): every level is reached
//! through its jump chain, and every call after the first to a VM opens a channel on the
//! connection that ssh_config shares, instead of logging in again (most of a second per hop
//! under TCG). A verb that cannot reach its VM fails naming it, with its console's tail.
//! When `FARM_VERB_LOG` names a file, each verb appends a JSON line with its time there
//! (`farm test` reads them).

mod machine;
mod transfer;

pub use machine::{Capture, Shaping};
pub use transfer::Transfer;

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::model::config::topology::Topology;
use crate::model::lab::instance::InstanceSpec;
use crate::model::lab::wait::{FAILED, TIMED_OUT, WaitFor};
use crate::run::site::Sites;
use crate::run::state::StatePaths;

/// ssh's own exit status when it could not connect or lost the connection.
const SSH_FAILED: i32 = 255;

/// How many lines of a VM's console a failure shows.
const CONSOLE_LINES: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum VerbError {
    #[error(
        "VM `{vm}` did not answer ssh\n{console}\nhint: `farm status` says whether it runs, `farm logs {vm}` shows its console"
    )]
    Unreachable { vm: String, console: String },
    #[error(
        "VM `{vm}`: no {what} after {} s\n{console}\nhint: `farm logs {vm}` shows its console; a longer `--timeout` waits longer",
        timeout.as_secs()
    )]
    TimedOut {
        vm: String,
        what: String,
        timeout: Duration,
        console: String,
    },
    #[error("VM `{vm}`: {what} cannot happen any more\n{said}")]
    CannotHappen {
        vm: String,
        what: String,
        said: String,
    },
    #[error("VM `{vm}`: the wait's script exited with {status} ({said})")]
    WaitFailed {
        vm: String,
        status: String,
        said: String,
    },
    #[error("VM `{vm}`: cannot {what}: {why}")]
    Qemu {
        vm: String,
        what: String,
        why: String,
    },
    #[error(transparent)]
    Host(#[from] crate::run::host::HostError),
    #[error("Cannot reach where VM `{vm}` runs: {why}")]
    Site { vm: String, why: String },
    #[error("VM `{vm}` is not up (no record of it)\nhint: `farm up {vm}` starts it")]
    NotUp { vm: String },
    #[error("VM `{vm}`: cannot copy {what}: {said}")]
    CopyFailed {
        vm: String,
        what: String,
        said: String,
    },
    #[error("Cannot run `{program}`: {source}\nhint: apt-get install openssh-client")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
}

/// A running lab's VMs, as the verbs reach them.
pub struct Lab<'a> {
    pub topology: &'a Topology,
    pub state: StatePaths,
}

impl Lab<'_> {
    fn ssh(&self, vm: &str) -> Command {
        let mut ssh = Command::new("ssh");
        ssh.arg("-F").arg(self.state.ssh_config()).arg(vm);
        ssh
    }

    /// Runs `command` as root in `vm` (one argument: a shell command line; several: a
    /// command and its arguments, each kept whole), its output streamed and its exit status
    /// returned.
    pub fn exec(&self, vm: &str, command: &[String]) -> Result<i32, VerbError> {
        let started = Instant::now();
        let line = crate::model::shell::remote_command(command);
        let mut ssh = self.ssh(vm);
        ssh.arg("--").arg(&line);
        let status = ssh.status().map_err(|source| VerbError::Spawn {
            program: "ssh",
            source,
        })?;
        let code = exit_code(status);
        log_verb("exec", vm, &line, started, code == 0);
        if code == SSH_FAILED {
            return Err(self.unreachable(vm));
        }
        Ok(code)
    }

    /// Runs `command` as root in `vm` and keeps what it printed: its exit status, stdout and
    /// stderr (for callers that read the output, as `farm::testing` does).
    pub fn exec_captured(
        &self,
        vm: &str,
        command: &str,
    ) -> Result<(i32, Vec<u8>, Vec<u8>), VerbError> {
        let started = Instant::now();
        let mut ssh = self.ssh(vm);
        ssh.arg("--").arg(command).stdin(Stdio::null());
        let out = ssh.output().map_err(|source| VerbError::Spawn {
            program: "ssh",
            source,
        })?;
        let code = exit_code(out.status);
        log_verb("exec", vm, command, started, code == 0);
        if code == SSH_FAILED {
            return Err(self.unreachable(vm));
        }
        Ok((code, out.stdout, out.stderr))
    }

    /// Waits up to `timeout` for `what` in `vm`; how long it took. A VM that does not
    /// answer ssh yet (booting, rebooting) is tried again until the deadline.
    pub fn wait(&self, vm: &str, what: &WaitFor, timeout: Duration) -> Result<Duration, VerbError> {
        if what.on_site() {
            return self.wait_on_site(vm, what, timeout);
        }
        let started = Instant::now();
        let deadline = started + timeout;
        let timed_out = |lab: &Self| VerbError::TimedOut {
            vm: vm.to_string(),
            what: what.describe(),
            timeout,
            console: lab.console_tail(vm),
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut ssh = self.ssh(vm);
            ssh.arg("--")
                .arg(what.guest_script(left.as_secs_f64().ceil() as u64))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let out = crate::sys::process::output_within(ssh, left + Duration::from_secs(10))
                .map_err(|source| VerbError::Spawn {
                    program: "ssh",
                    source,
                })?;
            let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let code = out.status.map_or(SSH_FAILED, exit_code);
            let done = |ok: bool| log_verb("wait", vm, &what.describe(), started, ok);
            match code {
                0 => {
                    done(true);
                    return Ok(started.elapsed());
                }
                FAILED => {
                    done(false);
                    return Err(VerbError::CannotHappen {
                        vm: vm.to_string(),
                        what: what.describe(),
                        said,
                    });
                }
                TIMED_OUT => {
                    done(false);
                    return Err(timed_out(self));
                }
                SSH_FAILED if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                SSH_FAILED => {
                    done(false);
                    return Err(timed_out(self));
                }
                other => {
                    done(false);
                    return Err(VerbError::WaitFailed {
                        vm: vm.to_string(),
                        status: other.to_string(),
                        said: format!("{said}{}", String::from_utf8_lossy(&out.stderr)),
                    });
                }
            }
        }
    }

    /// Waits where `vm` runs for what its console shows ([`WaitFor::on_site`]): one
    /// command on its site loops there until the console matches or the deadline passes.
    fn wait_on_site(
        &self,
        vm: &str,
        what: &WaitFor,
        timeout: Duration,
    ) -> Result<Duration, VerbError> {
        let started = Instant::now();
        let (spec, host) = self.site_of(vm)?;
        let script = what
            .site_script(
                &spec.paths.serial_log(),
                timeout.as_secs_f64().ceil() as u64,
            )
            .expect("a condition looked for on the site");
        let out = host.run(&script)?;
        let ok = out.success();
        log_verb("wait", vm, &what.describe(), started, ok);
        match out.status {
            Some(0) => Ok(started.elapsed()),
            Some(TIMED_OUT) => Err(VerbError::TimedOut {
                vm: vm.to_string(),
                what: what.describe(),
                timeout,
                console: self.console_tail(vm),
            }),
            other => Err(VerbError::WaitFailed {
                vm: vm.to_string(),
                status: other.map_or("a signal".into(), |c| c.to_string()),
                said: out.said(),
            }),
        }
    }

    fn unreachable(&self, vm: &str) -> VerbError {
        VerbError::Unreachable {
            vm: vm.to_string(),
            console: self.console_tail(vm),
        }
    }

    /// `vm`'s whole serial console, read where it runs.
    pub fn console(&self, vm: &str) -> String {
        self.read_console(vm, |host, path| match host.get(path) {
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Ok(None) => format!("(no `{}` on {})", path.display(), host.name()),
            Err(e) => format!("(cannot read `{}`: {e})", path.display()),
        })
    }

    /// The last lines of `vm`'s serial console, read where it runs.
    pub fn console_tail(&self, vm: &str) -> String {
        self.read_console(vm, |host, path| {
            format!(
                "last lines of its serial console:\n{}",
                host.tail(path, CONSOLE_LINES)
            )
        })
    }

    fn read_console(
        &self,
        vm: &str,
        read: impl FnOnce(&dyn crate::run::host::Host, &Path) -> String,
    ) -> String {
        match self.site_of(vm) {
            Ok((spec, host)) => read(&*host, &spec.paths.serial_log()),
            Err(e) => format!("(cannot read its console: {e})"),
        }
    }

    /// Where `vm` runs: how it was started (its record's spec) and its site's host.
    fn site_of(
        &self,
        vm: &str,
    ) -> Result<(InstanceSpec, std::sync::Arc<dyn crate::run::host::Host>), VerbError> {
        let records = self.state.records();
        let (Some(record), Some(node)) = (records.get(vm), self.topology.vms.get(vm)) else {
            return Err(VerbError::NotUp { vm: vm.to_string() });
        };
        let host = Sites::new(self.topology, &self.state.own_ssh_config())
            .connect(&node.placement)
            .map_err(|e| VerbError::Site {
                vm: vm.to_string(),
                why: e.to_string(),
            })?;
        Ok((record.spec.clone(), host))
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Appends `{verb, vm, what, seconds, ok}` to `$FARM_VERB_LOG`, when it is set.
fn log_verb(verb: &str, vm: &str, what: &str, started: Instant, ok: bool) {
    let Some(path) = std::env::var_os("FARM_VERB_LOG") else {
        return;
    };
    let line = serde_json::json!({
        "verb": verb,
        "vm": vm,
        "what": what,
        "seconds": started.elapsed().as_secs_f64(),
        "ok": ok,
    });
    use std::io::Write;
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(Path::new(&path))
    {
        let _ = writeln!(file, "{line}");
    }
}
