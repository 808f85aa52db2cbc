//! Watching a guest boot until it answers ssh: the one set of rules for build VMs, `farm
//! up`, snapshot restores and the tests. When to keep waiting, when to restart the guest
//! once (and why), and when to give up (and with what).
//!
//! Pure: a driver (`sys::boot_wait`) looks at the guest — how long since it started, what
//! its console printed since the last look, whether its qemu runs, what ssh said — and
//! hands each [`Look`] to a [`BootWatch`], which answers with a [`Verdict`]. So every rule
//! is tested here on recorded consoles, without booting anything.

use std::time::Duration;

use crate::model::build::first_boot::{self, CloudInit, ConsoleVerdict};
use crate::model::build::kernel_panic::kernel_panic;
use crate::model::text::last_lines_of_bytes;

/// How long a guest booting its kernel directly may leave its console empty: the kernel
/// prints within seconds even under TCG nested in TCG.
pub const SILENT_CONSOLE: Duration = Duration::from_secs(90);

/// How long a kernel may stop printing before it reached its first program: early boot
/// prints line after line even under TCG nested in TCG, so a console that stopped there
/// (seen: at the timer check) belongs to a machine that hangs.
pub const STALLED_KERNEL: Duration = Duration::from_secs(90);

/// How long a guest under KVM inside a hypervisor VM that itself runs under TCG may take
/// to answer ssh before it is restarted once: such guests answer in 15-25 s when TCG's
/// emulated SVM works, and now and then hang for good early in boot (seen: a console
/// stopped at the kernel's timer check, another that stayed empty).
pub const NESTED_KVM_PATIENCE: Duration = Duration::from_secs(120);

/// How long after a look that found qemu gone the second look comes: one look can catch
/// a pidfile while it is being written, so a guest is given up on only when two agree.
pub const GONE_RECHECK: Duration = Duration::from_secs(1);

/// How many console lines a failure quotes.
pub const CONSOLE_TAIL_LINES: usize = 25;

/// The most console kept in memory: a boot prints far less before it answers ssh.
const CONSOLE_KEPT: usize = 4 << 20;

/// What the watcher is told about the guest it watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootRules {
    /// How long the guest may take to answer ssh.
    pub timeout: Duration,
    /// The guest boots its kernel directly (no firmware or bootloader before it), so its
    /// console is written within seconds.
    pub direct_boot: bool,
    /// The hypervisor VM it runs in, when it runs under KVM there and that hypervisor VM
    /// under TCG.
    pub kvm_inside_tcg: Option<String>,
    /// Whether the guest may be restarted (once) when it hangs early in boot.
    pub may_restart: bool,
}

/// Whether the guest's qemu runs, as far as a look could tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qemu {
    Running,
    Gone,
    /// The look did not get an answer (a hypervisor VM under TCG can stall long enough for
    /// farm's connection to it to drop): that says nothing of the guest.
    Unknown,
}

/// One look at the guest.
#[derive(Clone, Debug)]
pub struct Look<'a> {
    /// Since the guest's qemu started (or last restarted).
    pub elapsed: Duration,
    /// What its console printed since the last look; `None` when the console was not read
    /// this time.
    pub console: Option<&'a [u8]>,
    pub qemu: Qemu,
    /// What ssh said, when it was tried since the last look.
    pub ssh: Option<Result<(), String>>,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The guest answered ssh.
    Ready,
    /// Nothing conclusive: try ssh, then look again.
    TrySsh,
    /// Look again after this long, without trying ssh (qemu was just seen gone).
    LookAgainIn(Duration),
    /// Stop the guest and start it again; the watcher then watches the new boot.
    Restart(RestartReason),
    /// Give up.
    Fail(BootFailure),
}

/// Why a guest is restarted: each is a hang early in boot, seen under TCG, that a second
/// boot gets past.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestartReason {
    /// A guest that boots its kernel directly wrote nothing to its console.
    SilentConsole,
    /// Its qemu ended before the guest wrote a byte.
    QemuEndedSilently,
    /// Its kernel stopped printing before it ran its first program.
    StalledKernel { last_line: String },
    /// Its kernel panicked setting up the timer ("IO-APIC + timer doesn't work!"): TCG on a
    /// busy host can miss the kernel's timer check.
    TimerCheckPanic,
    /// It runs under KVM inside a hypervisor VM under TCG and has not answered.
    KvmInsideTcg { hypervisor: String },
}

impl RestartReason {
    /// Whether qemu's own log says more about it.
    pub fn wants_qemu_log(&self) -> bool {
        matches!(self, RestartReason::QemuEndedSilently)
    }
}

impl std::fmt::Display for RestartReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestartReason::SilentConsole => write!(
                f,
                "nothing on its console {} s after it started (stuck before its kernel ran); restarting it once",
                SILENT_CONSOLE.as_secs()
            ),
            RestartReason::QemuEndedSilently => write!(
                f,
                "its qemu stopped before the guest wrote a byte to its console; restarting it once"
            ),
            RestartReason::StalledKernel { last_line } => write!(
                f,
                "its kernel printed nothing for {} s before running its first program (stopped at `{last_line}`); restarting it once",
                STALLED_KERNEL.as_secs()
            ),
            RestartReason::TimerCheckPanic => write!(
                f,
                "its kernel panicked at its timer check (TCG on a busy host can miss it); restarting it once"
            ),
            RestartReason::KvmInsideTcg { hypervisor } => write!(
                f,
                "no ssh {} s after it started, under KVM inside {hypervisor}, which runs under TCG (whose emulated SVM hangs such guests now and then); restarting it once",
                NESTED_KVM_PATIENCE.as_secs()
            ),
        }
    }
}

/// Why a boot was given up on, with what the guest's console (and qemu's log, when the
/// driver could read it) said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootFailure {
    pub kind: BootFailureKind,
    /// The last lines of its console.
    pub console_tail: String,
    /// The last lines of qemu's log, headed by its path, when the driver read it.
    pub qemu_log: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootFailureKind {
    /// No ssh before the timeout (or ssh failed once it answered).
    NoSsh { seconds: u64, reason: String },
    /// A login prompt, and neither cloud-init nor farm's agent ran: nothing will ever
    /// install the key farm logs in with.
    NoAgent,
    /// Its kernel panicked: the panic and the headlines of the oops before it.
    Panicked { panic: String },
    /// Its qemu ended (two looks agree) before the guest answered.
    QemuEnded,
    /// cloud-init's first boot did not finish well.
    CloudInit { status: String, detail: String },
}

impl BootFailure {
    /// The failure as a message about `subject` ("VM `web`", "the build VM for `p`"),
    /// ending with a hint made of the failure's own and `more` (where to read further).
    pub fn render(&self, subject: &str, more: &str) -> String {
        let (text, hint) = match &self.kind {
            BootFailureKind::NoSsh { seconds, reason } => (
                format!(
                    "{} did not answer ssh within {seconds} s ({reason})",
                    capitalised(subject)
                ),
                None,
            ),
            BootFailureKind::NoAgent => (
                format!(
                    "{} booted to a login prompt, but its image has neither cloud-init nor farm's agent, so nothing will install farm's key",
                    capitalised(subject)
                ),
                Some(first_boot::NO_AGENT_HINT),
            ),
            BootFailureKind::Panicked { panic } => (
                format!("The kernel of {subject} panicked before it answered ssh:\n{panic}"),
                None,
            ),
            BootFailureKind::QemuEnded => (
                format!("The qemu of {subject} ended before the guest answered ssh"),
                None,
            ),
            BootFailureKind::CloudInit { status, detail } => (
                format!("cloud-init in {subject} ended in `{status}`\n{detail}"),
                Some("the image's own first boot failed"),
            ),
        };
        let mut message = text;
        if let Some(log) = &self.qemu_log {
            message.push_str(&format!("\nqemu's log: {log}"));
        }
        if !matches!(self.kind, BootFailureKind::CloudInit { .. }) {
            message.push_str("\nlast lines of its serial console:\n");
            message.push_str(&self.console_tail);
        }
        let hint: Vec<&str> = hint
            .into_iter()
            .chain(Some(more))
            .filter(|h| !h.is_empty())
            .collect();
        if !hint.is_empty() {
            message.push_str(&format!("\nhint: {}", hint.join("; ")));
        }
        message
    }
}

fn capitalised(subject: &str) -> String {
    let mut chars = subject.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The rules, applied to one boot after another look.
#[derive(Clone, Debug)]
pub struct BootWatch {
    rules: BootRules,
    /// What the console printed since qemu started.
    console: Vec<u8>,
    /// When the console last grew (since qemu started).
    console_grew_at: Duration,
    /// A look found qemu gone; the next one decides.
    gone_once: bool,
    last_ssh_error: String,
    restarted: bool,
}

impl BootWatch {
    pub fn new(rules: BootRules) -> BootWatch {
        BootWatch {
            rules,
            console: Vec::new(),
            console_grew_at: Duration::ZERO,
            gone_once: false,
            last_ssh_error: "not tried yet".into(),
            restarted: false,
        }
    }

    /// The guest was restarted: what follows is a new boot, which is not restarted again.
    pub fn restarted(&mut self) {
        self.console.clear();
        self.console_grew_at = Duration::ZERO;
        self.gone_once = false;
        self.restarted = true;
    }

    /// What to do after `look`.
    pub fn look(&mut self, look: Look) -> Verdict {
        match look.ssh {
            Some(Ok(())) => return Verdict::Ready,
            Some(Err(error)) => self.last_ssh_error = error,
            None => {}
        }
        if let Some(bytes) = look.console.filter(|b| !b.is_empty()) {
            self.console.extend_from_slice(bytes);
            if self.console.len() > CONSOLE_KEPT {
                self.console.drain(..self.console.len() - CONSOLE_KEPT);
            }
            self.console_grew_at = look.elapsed;
        }
        let may_restart = self.rules.may_restart && !self.restarted;
        let console = String::from_utf8_lossy(&self.console).into_owned();
        if let Some(panic) = kernel_panic(&console) {
            if may_restart && panic.contains("IO-APIC + timer doesn't work") {
                return Verdict::Restart(RestartReason::TimerCheckPanic);
            }
            return Verdict::Fail(self.failure(BootFailureKind::Panicked { panic }));
        }
        if first_boot::read_console(&console) == ConsoleVerdict::NoAgent {
            return Verdict::Fail(self.failure(BootFailureKind::NoAgent));
        }
        match look.qemu {
            Qemu::Gone if !self.gone_once => {
                self.gone_once = true;
                return Verdict::LookAgainIn(GONE_RECHECK);
            }
            Qemu::Gone if may_restart && self.console.is_empty() => {
                return Verdict::Restart(RestartReason::QemuEndedSilently);
            }
            Qemu::Gone => return Verdict::Fail(self.failure(BootFailureKind::QemuEnded)),
            Qemu::Running | Qemu::Unknown => self.gone_once = false,
        }
        if may_restart && let Some(reason) = self.hang(look.elapsed, &console) {
            return Verdict::Restart(reason);
        }
        if look.elapsed >= self.rules.timeout {
            return Verdict::Fail(self.failure(BootFailureKind::NoSsh {
                seconds: self.rules.timeout.as_secs(),
                reason: self.last_ssh_error.clone(),
            }));
        }
        Verdict::TrySsh
    }

    /// A hang early in boot that a restart gets past, if the guest shows one.
    fn hang(&self, elapsed: Duration, console: &str) -> Option<RestartReason> {
        if let Some(hypervisor) = &self.rules.kvm_inside_tcg
            && elapsed >= NESTED_KVM_PATIENCE
        {
            return Some(RestartReason::KvmInsideTcg {
                hypervisor: hypervisor.clone(),
            });
        }
        if console.is_empty() {
            return (self.rules.direct_boot && elapsed >= SILENT_CONSOLE)
                .then_some(RestartReason::SilentConsole);
        }
        let stalled = elapsed.saturating_sub(self.console_grew_at) >= STALLED_KERNEL;
        (stalled && in_early_kernel(console)).then(|| RestartReason::StalledKernel {
            last_line: console
                .trim_end()
                .lines()
                .last()
                .unwrap_or("")
                .trim()
                .to_string(),
        })
    }

    /// What the wait for cloud-init's first boot ([`first_boot::wait_script`], given
    /// `seconds`) found: `Ok` when the guest is ready.
    pub fn first_boot(&self, cloud_init: CloudInit, seconds: u64) -> Result<(), BootFailure> {
        match cloud_init {
            CloudInit::Absent | CloudInit::Done => Ok(()),
            CloudInit::Pending { status } => Err(self.failure(BootFailureKind::CloudInit {
                status: format!("still {status} after {seconds} s"),
                detail: String::new(),
            })),
            CloudInit::Failed {
                status,
                detail,
                log_tail,
            } => Err(self.failure(BootFailureKind::CloudInit {
                status,
                detail: format!("{detail}\nlast lines of /var/log/cloud-init.log:\n{log_tail}"),
            })),
        }
    }

    /// A failure of `kind`, quoting the console.
    pub fn failure(&self, kind: BootFailureKind) -> BootFailure {
        BootFailure {
            kind,
            console_tail: last_lines_of_bytes(&self.console, CONSOLE_TAIL_LINES),
            qemu_log: None,
        }
    }
}

/// Whether a console shows a kernel that has not yet run its first program (init, or a
/// bootloader's menu, which is not a kernel at all).
fn in_early_kernel(console: &str) -> bool {
    const USERSPACE: [&str; 7] = [
        "Run /init",
        "Run /sbin/init",
        "Freeing unused kernel",
        "systemd[1]",
        "farm-seed",
        "cloud-init",
        "login:",
    ];
    let kernel_started = console.lines().any(is_kernel_line);
    kernel_started && !USERSPACE.iter().any(|mark| console.contains(mark))
}

/// A kernel message: `[    1.234567] …`.
fn is_kernel_line(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
        .is_some_and(|(stamp, _)| {
            let stamp = stamp.trim_start();
            !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMER_CHECK_PANIC: &str =
        include_str!("../../../tests/fixtures/consoles/timer_check_panic.log");
    const TIMER_CHECK_STALLED: &str =
        include_str!("../../../tests/fixtures/consoles/timer_check_stalled.log");
    const KVM_STACK_PANIC: &str =
        include_str!("../../../tests/fixtures/consoles/kvm_stack_panic.log");
    const CLOUD_INIT_ERROR: &str =
        include_str!("../../../tests/fixtures/consoles/cloud_init_error.txt");

    fn rules() -> BootRules {
        BootRules {
            timeout: Duration::from_secs(300),
            direct_boot: true,
            kvm_inside_tcg: None,
            may_restart: true,
        }
    }

    fn look(seconds: u64, console: Option<&str>, qemu: Qemu) -> Look<'_> {
        Look {
            elapsed: Duration::from_secs(seconds),
            console: console.map(str::as_bytes),
            qemu,
            ssh: Some(Err("Connection refused".into())),
        }
    }

    #[test]
    fn ssh_answering_is_ready_and_a_quiet_wait_tries_ssh() {
        let mut watch = BootWatch::new(rules());
        assert_eq!(
            watch.look(look(1, Some(""), Qemu::Running)),
            Verdict::TrySsh
        );
        let answered = Look {
            ssh: Some(Ok(())),
            ..look(2, None, Qemu::Running)
        };
        assert_eq!(watch.look(answered), Verdict::Ready);
    }

    #[test]
    fn a_kernel_panic_fails_at_once_with_its_headlines() {
        let mut watch = BootWatch::new(rules());
        let Verdict::Fail(failure) = watch.look(look(40, Some(KVM_STACK_PANIC), Qemu::Running))
        else {
            panic!("a panic fails the boot");
        };
        let BootFailureKind::Panicked { panic } = &failure.kind else {
            panic!("{failure:?}");
        };
        assert!(
            panic.contains("BUG: TASK stack guard page was hit"),
            "{panic}"
        );
        assert!(failure.console_tail.ends_with("inside scheduler ]---"));
        let message = failure.render("VM `hv`", "`farm logs hv` shows the whole console");
        assert!(message.starts_with("The kernel of VM `hv` panicked before it answered ssh:\n"));
        assert!(message.ends_with("\nhint: `farm logs hv` shows the whole console"));
    }

    #[test]
    fn a_panic_at_the_timer_check_restarts_once_then_fails() {
        let mut watch = BootWatch::new(rules());
        // Read in two pieces, as a driver reads a growing console.
        let (first, rest) = TIMER_CHECK_PANIC.split_at(TIMER_CHECK_PANIC.len() / 2);
        assert_eq!(
            watch.look(look(1, Some(first), Qemu::Running)),
            Verdict::TrySsh
        );
        assert_eq!(
            watch.look(look(2, Some(rest), Qemu::Running)),
            Verdict::Restart(RestartReason::TimerCheckPanic)
        );
        watch.restarted();
        assert_eq!(
            watch.look(look(1, Some(""), Qemu::Running)),
            Verdict::TrySsh
        );
        let Verdict::Fail(failure) = watch.look(look(2, Some(TIMER_CHECK_PANIC), Qemu::Gone))
        else {
            panic!("a second panic fails");
        };
        assert!(
            matches!(&failure.kind, BootFailureKind::Panicked { panic } if panic.contains("IO-APIC + timer"))
        );
    }

    #[test]
    fn a_console_stuck_at_the_timer_check_restarts_once() {
        let mut watch = BootWatch::new(rules());
        assert_eq!(
            watch.look(look(2, Some(TIMER_CHECK_STALLED), Qemu::Running)),
            Verdict::TrySsh
        );
        assert_eq!(
            watch.look(look(60, Some(""), Qemu::Running)),
            Verdict::TrySsh
        );
        let Verdict::Restart(reason) = watch.look(look(95, None, Qemu::Running)) else {
            panic!("a stalled kernel is restarted");
        };
        assert_eq!(
            reason,
            RestartReason::StalledKernel {
                last_line: "[    0.008000] ..TIMER: vector=0x30 apic1=0 pin1=2 apic2=-1 pin2=-1"
                    .into()
            }
        );
        // The same console after a restart waits until the timeout, then names ssh.
        watch.restarted();
        watch.look(look(2, Some(TIMER_CHECK_STALLED), Qemu::Running));
        assert_eq!(watch.look(look(200, None, Qemu::Running)), Verdict::TrySsh);
        let Verdict::Fail(failure) = watch.look(look(300, None, Qemu::Running)) else {
            panic!("the timeout fails");
        };
        assert_eq!(
            failure.kind,
            BootFailureKind::NoSsh {
                seconds: 300,
                reason: "Connection refused".into()
            }
        );
        assert!(failure.console_tail.ends_with("pin2=-1"));
    }

    #[test]
    fn a_booted_userspace_that_is_quiet_is_not_a_stalled_kernel() {
        let mut watch = BootWatch::new(rules());
        let booted = format!("{TIMER_CHECK_STALLED}[    9.1] Run /init as init process\n");
        watch.look(look(2, Some(&booted), Qemu::Running));
        assert_eq!(watch.look(look(200, None, Qemu::Running)), Verdict::TrySsh);
    }

    #[test]
    fn an_empty_console_restarts_a_direct_boot_once() {
        let mut watch = BootWatch::new(rules());
        assert_eq!(
            watch.look(look(89, Some(""), Qemu::Running)),
            Verdict::TrySsh
        );
        assert_eq!(
            watch.look(look(90, Some(""), Qemu::Running)),
            Verdict::Restart(RestartReason::SilentConsole)
        );
        watch.restarted();
        assert_eq!(
            watch.look(look(120, Some(""), Qemu::Running)),
            Verdict::TrySsh
        );
        // A guest behind firmware may stay silent: it is waited for.
        let mut firmware = BootWatch::new(BootRules {
            direct_boot: false,
            ..rules()
        });
        assert_eq!(
            firmware.look(look(120, Some(""), Qemu::Running)),
            Verdict::TrySsh
        );
    }

    #[test]
    fn qemu_gone_needs_two_looks_and_restarts_only_a_silent_guest() {
        let mut watch = BootWatch::new(rules());
        assert_eq!(
            watch.look(look(3, Some(""), Qemu::Gone)),
            Verdict::LookAgainIn(GONE_RECHECK)
        );
        // The second look sees it running: it was the pidfile being written.
        assert_eq!(watch.look(look(4, None, Qemu::Running)), Verdict::TrySsh);
        assert_eq!(
            watch.look(look(5, None, Qemu::Gone)),
            Verdict::LookAgainIn(GONE_RECHECK)
        );
        let restart = watch.look(look(6, None, Qemu::Gone));
        assert_eq!(restart, Verdict::Restart(RestartReason::QemuEndedSilently));
        assert!(RestartReason::QemuEndedSilently.wants_qemu_log());

        let mut spoke = BootWatch::new(rules());
        spoke.look(look(3, Some("[    0.0] Linux version 6.1\n"), Qemu::Gone));
        let Verdict::Fail(failure) = spoke.look(look(4, None, Qemu::Gone)) else {
            panic!("a guest that printed and whose qemu ended fails");
        };
        assert_eq!(failure.kind, BootFailureKind::QemuEnded);
        assert_eq!(failure.console_tail, "[    0.0] Linux version 6.1");
    }

    #[test]
    fn an_unanswered_look_says_nothing_of_the_guest() {
        let mut watch = BootWatch::new(BootRules {
            direct_boot: false,
            ..rules()
        });
        assert_eq!(watch.look(look(3, None, Qemu::Unknown)), Verdict::TrySsh);
        assert_eq!(watch.look(look(4, None, Qemu::Unknown)), Verdict::TrySsh);
    }

    #[test]
    fn kvm_inside_tcg_is_restarted_after_its_patience() {
        let mut watch = BootWatch::new(BootRules {
            kvm_inside_tcg: Some("hv".into()),
            ..rules()
        });
        watch.look(look(
            1,
            Some("[    0.0] Linux version 6.1\n[    1.0] Run /init as init process\n"),
            Qemu::Running,
        ));
        assert_eq!(watch.look(look(119, None, Qemu::Running)), Verdict::TrySsh);
        assert_eq!(
            watch.look(look(120, None, Qemu::Running)),
            Verdict::Restart(RestartReason::KvmInsideTcg {
                hypervisor: "hv".into()
            })
        );
    }

    #[test]
    fn a_login_prompt_without_an_agent_fails_before_the_timeout() {
        let mut watch = BootWatch::new(rules());
        let console =
            "[    0.0] Linux version 6.1\nDebian GNU/Linux 12 localhost ttyS0\n\nlocalhost login: ";
        let Verdict::Fail(failure) = watch.look(look(30, Some(console), Qemu::Running)) else {
            panic!("no agent fails");
        };
        assert_eq!(failure.kind, BootFailureKind::NoAgent);
        let message = failure.render("the build VM for `p`", "the full log is `/l`");
        assert!(message.starts_with("The build VM for `p` booted to a login prompt"));
        assert!(message.ends_with(&format!(
            "hint: {}; the full log is `/l`",
            first_boot::NO_AGENT_HINT
        )));
    }

    #[test]
    fn a_cloud_init_error_fails_with_its_words_and_log() {
        let watch = BootWatch::new(rules());
        let failure = watch
            .first_boot(first_boot::parse_wait_output(CLOUD_INIT_ERROR), 250)
            .unwrap_err();
        let message = failure.render("VM `web`", "");
        assert!(
            message.starts_with("cloud-init in VM `web` ended in `error`\n"),
            "{message}"
        );
        assert!(
            message.contains("\n('scripts_user', RuntimeError("),
            "{message}"
        );
        assert!(
            message.contains("last lines of /var/log/cloud-init.log:\n"),
            "{message}"
        );
        assert!(message.contains("Failed running /var/lib/cloud/instance/scripts/part-001"));
        assert!(
            message.ends_with("hint: the image's own first boot failed"),
            "{message}"
        );
        let pending = watch
            .first_boot(
                CloudInit::Pending {
                    status: "running".into(),
                },
                60,
            )
            .unwrap_err();
        assert_eq!(
            pending.kind,
            BootFailureKind::CloudInit {
                status: "still running after 60 s".into(),
                detail: String::new()
            }
        );
        assert_eq!(watch.first_boot(CloudInit::Absent, 60), Ok(()));
    }
}
