//! The verbs scripts call on a running lab: `farm exec`, `farm wait` and `farm cp`.
//!
//! Each goes through the users' ssh_config (`.farm/ssh_config`): every level is reached
//! through its jump chain, and every call after the first to a VM opens a channel on the
//! connection that ssh_config shares, instead of logging in again (most of a second per hop
//! under TCG). A verb that cannot reach its VM fails naming it, with its console's tail.
//! When `FARM_VERB_LOG` names a file, each verb appends a JSON line with its time there
//! (`farm test` reads them).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::model::config::topology::Topology;
use crate::model::lab::instance::InstanceSpec;
use crate::model::lab::wait::{FAILED, TIMED_OUT, WaitFor};
use crate::model::shell::shell_quote;
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
    #[error("Cannot switch the link of VM `{vm}`: {why}")]
    Link { vm: String, why: String },
    #[error(transparent)]
    Host(#[from] crate::run::host::HostError),
    #[error("Cannot reach where VM `{vm}` runs: {why}")]
    Site { vm: String, why: String },
    #[error("Cannot crash VM `{vm}`: {why}")]
    Crash { vm: String, why: String },
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

    /// Runs `command` as root in `vm`, its output streamed and its exit status returned.
    pub fn exec(&self, vm: &str, command: &[String]) -> Result<i32, VerbError> {
        let started = Instant::now();
        let mut ssh = self.ssh(vm);
        ssh.arg("--").args(command);
        let status = ssh.status().map_err(|source| VerbError::Spawn {
            program: "ssh",
            source,
        })?;
        let code = exit_code(status);
        log_verb("exec", vm, &command.join(" "), started, code == 0);
        if code == SSH_FAILED {
            return Err(self.unreachable(vm));
        }
        Ok(code)
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
                said: out.text(),
            }),
        }
    }

    /// Cuts (`up = false`) or restores the cable of `vm`'s NIC on `network` (`user` for
    /// QEMU's user network): QMP `set_link` on its qemu, wherever it runs. The guest sees
    /// its carrier go; what was sent meanwhile is lost.
    pub fn link(&self, vm: &str, network: &str, up: bool) -> Result<(), VerbError> {
        let started = Instant::now();
        let (spec, host) = self.site_of(vm)?;
        let failed = |why: String| VerbError::Link {
            vm: vm.to_string(),
            why,
        };
        let netdev = spec.netdev_of(network).map_err(failed)?;
        let result = crate::run::host::with_qmp(
            &*host,
            &spec.paths.qmp(),
            Duration::from_secs(5),
            |qmp| {
                qmp.command("set_link", serde_json::json!({ "name": netdev, "up": up }))
                    .map(|_| ())
                    .map_err(|e| failed(e.to_string()))
            },
            failed,
        );
        log_verb(
            "link",
            vm,
            &format!("{network} {}", if up { "up" } else { "down" }),
            started,
            result.is_ok(),
        );
        result
    }

    /// Stops `vm`'s qemu at once, as a power cut: nothing in the guest is told, and the VMs
    /// inside a hypervisor go with it. `farm up` starts it again on its overlay.
    pub fn crash(&self, vm: &str) -> Result<(), VerbError> {
        let started = Instant::now();
        let (spec, host) = self.site_of(vm)?;
        let result = crate::run::backend::stop_spec(&*host, &spec, Duration::ZERO, None)
            .map(|_| ())
            .map_err(|e| VerbError::Crash {
                vm: vm.to_string(),
                why: e.to_string(),
            });
        // Its shared connection went with it.
        self.state.stop_shared_connection(vm);
        log_verb("crash", vm, "", started, result.is_ok());
        result
    }

    /// Reboots `vm` from inside (`reboot`) and waits up to `timeout` until it answers ssh
    /// in a new boot; how long that took.
    pub fn reboot(&self, vm: &str, timeout: Duration) -> Result<Duration, VerbError> {
        let started = Instant::now();
        let mut ask = self.ssh(vm);
        ask.args(["--", "cat /proc/sys/kernel/random/boot_id"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let out =
            crate::sys::process::output_within(ask, Duration::from_secs(60)).map_err(|source| {
                VerbError::Spawn {
                    program: "ssh",
                    source,
                }
            })?;
        let boot = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.is_none_or(|s| !s.success()) || boot.is_empty() {
            return Err(self.unreachable(vm));
        }
        let mut reboot = self.ssh(vm);
        reboot
            .args(["--", "reboot"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its connection may end with the guest's sshd, before `reboot` returns.
        let _ = crate::sys::process::output_within(reboot, Duration::from_secs(30));
        self.state.stop_shared_connection(vm);
        let new_boot = WaitFor::Until(format!(
            "[ \"$(cat /proc/sys/kernel/random/boot_id)\" != {} ]",
            shell_quote(&boot)
        ));
        let left = timeout.saturating_sub(started.elapsed());
        let waited = self.wait(vm, &new_boot, left).map_err(|e| match e {
            VerbError::TimedOut { vm, console, .. } => VerbError::TimedOut {
                vm,
                what: "new boot answering ssh".into(),
                timeout,
                console,
            },
            other => other,
        });
        log_verb("reboot", vm, "", started, waited.is_ok());
        waited.map(|_| started.elapsed())
    }

    /// Copies between this machine and `vm` through ssh alone (the guest needs `cat`, and
    /// `tar` for directories; no sftp server): a file to a file, or into a directory that
    /// exists; with `recursive`, a directory's contents into `to`, created if need be.
    pub fn copy(&self, vm: &str, copy: &Transfer, recursive: bool) -> Result<(), VerbError> {
        let started = Instant::now();
        let (script, local_side) = copy.plan(recursive);
        let mut ssh = self.ssh(vm);
        ssh.arg("--").arg(&script).stderr(Stdio::piped());
        let result = local_side.run(ssh);
        log_verb("cp", vm, &copy.describe(), started, result.is_ok());
        result.map_err(|said| self.copy_failed(vm, copy, said))
    }

    /// A copy that failed: the VM's console too when the VM no longer answers.
    fn copy_failed(&self, vm: &str, copy: &Transfer, said: String) -> VerbError {
        let answers = self
            .ssh(vm)
            .args(["--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if answers {
            VerbError::CopyFailed {
                vm: vm.to_string(),
                what: copy.describe(),
                said,
            }
        } else {
            self.unreachable(vm)
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

/// One copy between this machine and a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transfer {
    ToVm { local: PathBuf, remote: String },
    FromVm { remote: String, local: PathBuf },
}

/// This machine's end of a copy: what ssh's stdin reads, or where its stdout goes.
enum LocalSide {
    /// A file sent to `cat` in the guest.
    SendFile(PathBuf),
    /// A directory sent to `tar` in the guest.
    SendDir(PathBuf),
    /// The guest's `cat`, written to this file (through a temporary beside it).
    ReceiveFile(PathBuf),
    /// The guest's `tar`, unpacked into this directory.
    ReceiveDir(PathBuf),
}

impl Transfer {
    fn describe(&self) -> String {
        match self {
            Transfer::ToVm { local, remote } => format!("`{}` to `{remote}`", local.display()),
            Transfer::FromVm { remote, local } => format!("`{remote}` to `{}`", local.display()),
        }
    }

    /// The guest's script, and what this machine does at its end.
    fn plan(&self, recursive: bool) -> (String, LocalSide) {
        match self {
            Transfer::ToVm { local, remote } if recursive => (
                format!("mkdir -p {r} && tar -C {r} -xf -", r = shell_quote(remote)),
                LocalSide::SendDir(local.clone()),
            ),
            Transfer::ToVm { local, remote } => {
                let name = local
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (
                    format!(
                        "d={r}; if [ -d \"$d\" ]; then d=\"$d\"/{n}; fi; cat > \"$d\"",
                        r = shell_quote(remote),
                        n = shell_quote(&name)
                    ),
                    LocalSide::SendFile(local.clone()),
                )
            }
            Transfer::FromVm { remote, local } if recursive => (
                format!("tar -C {} -cf - .", shell_quote(remote)),
                LocalSide::ReceiveDir(local.clone()),
            ),
            Transfer::FromVm { remote, local } => {
                let local = if local.is_dir() {
                    local.join(Path::new(remote).file_name().unwrap_or_default())
                } else {
                    local.clone()
                };
                (
                    format!("cat {}", shell_quote(remote)),
                    LocalSide::ReceiveFile(local),
                )
            }
        }
    }
}

impl LocalSide {
    /// Runs `ssh` (its stderr piped) with this end attached; what went wrong otherwise.
    fn run(self, mut ssh: Command) -> Result<(), String> {
        let failed = |e: std::io::Error| e.to_string();
        let said = |out: &std::process::Output| {
            let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if text.is_empty() {
                format!("exit {}", out.status)
            } else {
                text
            }
        };
        match self {
            LocalSide::SendFile(file) => {
                let input = fs_err::File::open(&file).map_err(failed)?.into_parts().0;
                let out = ssh
                    .stdin(input)
                    .stdout(Stdio::null())
                    .output()
                    .map_err(failed)?;
                out.status.success().then_some(()).ok_or_else(|| said(&out))
            }
            LocalSide::SendDir(dir) => {
                if !dir.is_dir() {
                    return Err(format!("`{}` is not a directory", dir.display()));
                }
                let mut tar = Command::new("tar")
                    .arg("-C")
                    .arg(&dir)
                    .args(["-cf", "-", "."])
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(failed)?;
                let pipe = tar.stdout.take().expect("piped");
                let out = ssh
                    .stdin(pipe)
                    .stdout(Stdio::null())
                    .output()
                    .map_err(failed)?;
                let packed = tar.wait().map_err(failed)?;
                if !packed.success() {
                    return Err(format!("tar of `{}` failed ({packed})", dir.display()));
                }
                out.status.success().then_some(()).ok_or_else(|| said(&out))
            }
            LocalSide::ReceiveFile(file) => {
                let partial = file.with_extension("farm-partial");
                let output = fs_err::File::create(&partial)
                    .map_err(failed)?
                    .into_parts()
                    .0;
                let out = ssh
                    .stdin(Stdio::null())
                    .stdout(output)
                    .output()
                    .map_err(failed)?;
                if !out.status.success() {
                    let _ = fs_err::remove_file(&partial);
                    return Err(said(&out));
                }
                fs_err::rename(&partial, &file).map_err(failed)
            }
            LocalSide::ReceiveDir(dir) => {
                fs_err::create_dir_all(&dir).map_err(failed)?;
                let mut child = ssh
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(failed)?;
                let pipe = child.stdout.take().expect("piped");
                let unpacked = Command::new("tar")
                    .arg("-C")
                    .arg(&dir)
                    .args(["-xf", "-"])
                    .stdin(pipe)
                    .status()
                    .map_err(failed)?;
                let out = child.wait_with_output().map_err(failed)?;
                if !out.status.success() {
                    return Err(said(&out));
                }
                unpacked
                    .success()
                    .then_some(())
                    .ok_or_else(|| format!("unpacking into `{}` failed", dir.display()))
            }
        }
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
