//! The one driver of [`BootWatch`]: it looks at a booting guest (its qemu, its console,
//! ssh) and does what the watch answers — try ssh, look again, restart the guest, or give
//! up with a [`BootFailure`]. Build VMs, `farm up`, snapshot restores and the tests all
//! wait for guests through it; what differs between them is only how a guest is looked
//! at and restarted, which is its [`BootTarget`].

use std::path::Path;
use std::time::{Duration, Instant};

use crate::model::build::boot_watch::{
    BootFailure, BootFailureKind, BootRules, BootWatch, Look, Qemu, RestartReason, Verdict,
};
use crate::model::build::first_boot;
use crate::model::build::qemu::QemuVm;
use crate::model::text::error_chain;
use crate::sys::ssh::Ssh;
use crate::sys::vm_process::{VmProcess, VmProcessError};

/// How often the console is read while qemu runs (on a remote site each read is an ssh
/// round trip); it is read at every look once qemu is not seen running.
const CONSOLE_EVERY: Duration = Duration::from_secs(5);

/// How long one ssh attempt may take to connect.
const SSH_ATTEMPT: Duration = Duration::from_secs(5);

/// The pause between ssh attempts that were refused.
const SSH_RETRY: Duration = Duration::from_millis(500);

/// A booting guest, as the driver looks at it.
pub trait BootTarget {
    /// What a failed restart returns.
    type Error;
    /// Whether its qemu runs.
    fn qemu(&mut self) -> Qemu;
    /// Its console from byte `offset` on (empty when there is nothing new or it cannot be
    /// read).
    fn console_from(&mut self, offset: u64) -> Vec<u8>;
    /// The last lines of qemu's own log, headed by its path.
    fn qemu_log(&mut self) -> String;
    /// Stops the guest's qemu and starts it again on the same disks.
    fn restart(&mut self) -> Result<(), Self::Error>;
}

/// How the guest is reached over ssh.
#[derive(Clone, Copy, Debug)]
pub struct SshRoute<'a> {
    pub config: &'a Path,
    pub alias: &'a str,
    /// The control socket of a connection to the hypervisor VM the guest runs on.
    pub jump: Option<&'a Path>,
    /// What proves the guest's shell answers.
    pub probe: Probe,
}

/// The command run over a new connection before the guest counts as answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `true`.
    Shell,
    /// Set the guest's clock to this machine's, as the attempt is made: a guest loaded from
    /// a saved state resumes with the clock it was saved with. One command, not two: each
    /// is a round trip into a guest that may run under TCG.
    SetClock,
}

impl Probe {
    fn command(self) -> String {
        match self {
            Probe::Shell => "true".to_string(),
            Probe::SetClock => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                format!("date -u -s @{now} >/dev/null 2>&1; true")
            }
        }
    }
}

/// Why a boot was not waited through.
#[derive(Debug)]
pub enum BootError<E> {
    /// The watch gave up.
    Failed(BootFailure),
    /// Restarting the guest failed.
    Restart(E),
}

/// Waits until the guest answers ssh under `rules`, restarting it when the watch says so
/// (told to `on_restart` with qemu's log when it says more). Returns the connection and
/// the watch, which [`wait_for_first_boot`] goes on with.
pub fn wait_for_ssh<T: BootTarget>(
    target: &mut T,
    route: SshRoute,
    rules: BootRules,
    on_restart: &mut dyn FnMut(&RestartReason, Option<String>),
) -> Result<(Ssh, BootWatch), BootError<T::Error>> {
    let mut watch = BootWatch::new(rules);
    let mut started = Instant::now();
    let mut offset = 0u64;
    let mut console_read: Option<Instant> = None;
    let mut answered: Option<Ssh> = None;
    let mut ssh_said: Option<Result<(), String>> = None;
    loop {
        let (qemu, console) = if answered.is_some() {
            (Qemu::Running, None)
        } else {
            let qemu = target.qemu();
            let due = qemu != Qemu::Running
                || console_read.is_none_or(|at| at.elapsed() >= CONSOLE_EVERY);
            let console = due.then(|| {
                console_read = Some(Instant::now());
                let bytes = target.console_from(offset);
                offset += bytes.len() as u64;
                bytes
            });
            (qemu, console)
        };
        let verdict = watch.look(Look {
            elapsed: started.elapsed(),
            console: console.as_deref(),
            qemu,
            ssh: ssh_said.take(),
        });
        match verdict {
            Verdict::Ready => {
                if let Some(ssh) = answered {
                    return Ok((ssh, watch));
                }
            }
            Verdict::TrySsh => match try_ssh(route) {
                Ok(ssh) => {
                    answered = Some(ssh);
                    ssh_said = Some(Ok(()));
                }
                Err(error) => {
                    ssh_said = Some(Err(error));
                    std::thread::sleep(SSH_RETRY);
                }
            },
            Verdict::LookAgainIn(pause) => std::thread::sleep(pause),
            Verdict::Restart(reason) => {
                let log = reason.wants_qemu_log().then(|| target.qemu_log());
                on_restart(&reason, log);
                target.restart().map_err(BootError::Restart)?;
                watch.restarted();
                started = Instant::now();
                offset = 0;
                console_read = None;
            }
            Verdict::Fail(mut failure) => {
                if failure.kind == BootFailureKind::QemuEnded {
                    failure.qemu_log = Some(target.qemu_log());
                }
                return Err(BootError::Failed(failure));
            }
        }
    }
}

/// One ssh attempt: a connection that runs `true`.
fn try_ssh(route: SshRoute) -> Result<Ssh, String> {
    let ssh = Ssh::connect_through(route.config, route.alias, SSH_ATTEMPT, route.jump)
        .map_err(|e| error_chain(&e))?;
    match ssh.run(&route.probe.command(), None) {
        Ok(out) if out.success() => Ok(ssh),
        Ok(out) => Err(out.said()),
        Err(e) => Err(error_chain(&e)),
    }
}

/// What waiting for cloud-init's first boot found: what its status said (for a build log)
/// and whether the guest is ready.
pub struct FirstBoot {
    pub output: String,
    pub ready: Result<(), BootFailure>,
}

/// Waits, for up to `within` (at least a minute), for cloud-init (where the image has it)
/// to finish the guest's first boot: whatever runs next must not race it.
pub fn wait_for_first_boot(watch: &BootWatch, ssh: &Ssh, within: Duration) -> FirstBoot {
    let seconds = within.as_secs().max(60);
    match ssh.run(&first_boot::wait_script(seconds), None) {
        Ok(out) => {
            let output = out.said();
            let ready = watch.first_boot(first_boot::parse_wait_output(&output), seconds);
            FirstBoot { output, ready }
        }
        Err(e) => FirstBoot {
            output: String::new(),
            ready: Err(watch.failure(BootFailureKind::NoSsh {
                seconds,
                reason: format!("it answered, then: {}", error_chain(&e)),
            })),
        },
    }
}

/// A guest whose qemu is farm's own child on this machine (a build VM, a test's guest).
pub struct LocalQemu<'a> {
    pub vm: &'a QemuVm,
    pub process: VmProcess,
    /// Where qemu's stderr goes.
    pub stderr_log: &'a Path,
}

impl LocalQemu<'_> {
    pub fn start<'a>(
        vm: &'a QemuVm,
        stderr_log: &'a Path,
    ) -> Result<LocalQemu<'a>, VmProcessError> {
        Ok(LocalQemu {
            vm,
            process: VmProcess::start(vm, stderr_log)?,
            stderr_log,
        })
    }
}

impl BootTarget for LocalQemu<'_> {
    type Error = VmProcessError;

    fn qemu(&mut self) -> Qemu {
        match self.process.check_running() {
            Ok(()) => Qemu::Running,
            Err(_) => Qemu::Gone,
        }
    }

    fn console_from(&mut self, offset: u64) -> Vec<u8> {
        read_from(&self.vm.serial_log, offset)
    }

    fn qemu_log(&mut self) -> String {
        let exit = self.process.check_running().err().unwrap_or_default();
        let log = fs_err::read(self.stderr_log).unwrap_or_default();
        format!(
            "`{}` {exit}\n{}",
            self.stderr_log.display(),
            crate::model::text::last_lines_of_bytes(&log, 6)
        )
    }

    fn restart(&mut self) -> Result<(), VmProcessError> {
        self.process.kill();
        self.process = VmProcess::start(self.vm, self.stderr_log)?;
        Ok(())
    }
}

/// A guest farm cannot look at while it waits for it (a VM inside a hypervisor VM whose
/// snapshot is being restored: its qemu and console are inside that VM): only ssh and the
/// timeout decide. It is never restarted.
pub struct Unobserved;

impl BootTarget for Unobserved {
    type Error = std::convert::Infallible;

    fn qemu(&mut self) -> Qemu {
        Qemu::Unknown
    }

    fn console_from(&mut self, _offset: u64) -> Vec<u8> {
        Vec::new()
    }

    fn qemu_log(&mut self) -> String {
        String::new()
    }

    /// Never asked: its rules say `may_restart: false`. Were it asked, there is nothing
    /// here to restart, and the wait runs on to its timeout.
    fn restart(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// The bytes of a local file (a console) from `offset` on; none when it cannot be read.
pub fn read_from(path: &Path, offset: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = fs_err::File::open(path) else {
        return Vec::new();
    };
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_ok() {
        let _ = file.read_to_end(&mut bytes);
    }
    bytes
}

impl<E> std::fmt::Display for BootError<E>
where
    E: std::fmt::Display,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootError::Failed(failure) => write!(f, "{}", failure.render("the guest", "")),
            BootError::Restart(error) => write!(f, "Cannot restart the guest: {error}"),
        }
    }
}
