//! What a guest's first boot says about itself, read from its serial console and from
//! cloud-init: whether something in the image will ever install farm's key (cloud-init or
//! farm's own agent), and whether cloud-init has finished — and how.
//!
//! Pure: the scripts are text run over ssh by the builder and `farm up`, and the parsers
//! take what those scripts and the console printed.

/// Run over ssh once the guest answers: waits (up to `seconds`) for cloud-init to finish,
/// then prints its verdict (one `cloud-init` run: each costs seconds of Python start-up
/// under TCG; asked again only when the wait ran out), or `farm: no cloud-init` when the image has none (farm's own
/// images, the tiny image). The log tail follows the verdict, for the error message.
pub fn wait_script(seconds: u64) -> String {
    format!(
        "command -v cloud-init >/dev/null 2>&1 || {{ echo 'farm: no cloud-init'; exit 0; }}; \
         timeout {seconds} cloud-init status --wait --long 2>&1; \
         if [ $? -eq 124 ]; then cloud-init status --long 2>&1; fi; \
         echo '{LOG_MARK}'; \
         (sudo -n tail -n {LOG_LINES} /var/log/cloud-init.log 2>/dev/null || tail -n {LOG_LINES} /var/log/cloud-init.log 2>&1); true"
    )
}

const LOG_MARK: &str = "farm: cloud-init.log";
const LOG_LINES: usize = 20;

/// How cloud-init's part of a first boot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloudInit {
    /// The image has no cloud-init: nothing to wait for.
    Absent,
    /// `status: done` (or `disabled`: cloud-init will not run, so nothing is pending).
    Done,
    /// Still `running` (or `not run`) when the wait ran out.
    Pending { status: String },
    /// `status: error` or `degraded`: something in the image's first boot failed.
    Failed {
        status: String,
        detail: String,
        log_tail: String,
    },
}

/// Reads what [`wait_script`] printed.
pub fn parse_wait_output(text: &str) -> CloudInit {
    if text.lines().any(|l| l.trim() == "farm: no cloud-init") {
        return CloudInit::Absent;
    }
    let (verdict, log_tail) = match text.split_once(LOG_MARK) {
        Some((verdict, tail)) => (verdict, tail.trim_matches('\n').to_string()),
        None => (text, String::new()),
    };
    let status = verdict
        .lines()
        .find_map(|l| l.trim().strip_prefix("status:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let detail: Vec<&str> = verdict
        .lines()
        .map(str::trim)
        // `--wait` prints a dot per look before the verdict.
        .filter(|l| !l.is_empty() && !l.starts_with("status:") && !l.chars().all(|c| c == '.'))
        .collect();
    match status.as_str() {
        "done" | "disabled" => CloudInit::Done,
        "running" | "not run" | "not started" => CloudInit::Pending { status },
        _ => CloudInit::Failed {
            status,
            detail: detail.join("\n"),
            log_tail,
        },
    }
}

/// What the console of a guest that does not answer ssh shows about why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleVerdict {
    /// Nothing conclusive yet: keep waiting.
    Undecided,
    /// The guest finished booting (a login prompt) and neither cloud-init nor farm's agent
    /// ran: nothing will ever install the key farm logs in with.
    NoAgent,
}

/// Reads a serial console for [`ConsoleVerdict::NoAgent`]. Both agents announce themselves
/// on the console before the login prompt: cloud-init's units (`cloud-init`), and farm's
/// agent and tiny image's init (`farm-seed:`).
pub fn read_console(console: &str) -> ConsoleVerdict {
    let lower = console.to_ascii_lowercase();
    let booted = lower.lines().any(is_login_prompt);
    let agent = ["cloud-init", "farm-seed"]
        .iter()
        .any(|marker| lower.contains(marker));
    if booted && !agent {
        ConsoleVerdict::NoAgent
    } else {
        ConsoleVerdict::Undecided
    }
}

/// A getty's `HOST login:` prompt, which kernel messages may follow on the same line (a
/// module loaded after getty started, such as `powernow_k8: …`).
fn is_login_prompt(line: &str) -> bool {
    line.rsplit_once("login:").is_some_and(|(_, after)| {
        let after = after.trim();
        after.is_empty() || after.starts_with('[')
    })
}

/// The hint shared by the builder's and `farm up`'s error for [`ConsoleVerdict::NoAgent`].
pub const NO_AGENT_HINT: &str = "use an image with cloud-init (a distribution's cloud image, such as Debian's genericcloud or Ubuntu's cloud images), or one farm builds (`debian = { … }` or `tiny = true`); farm gives a VM its key, host key and addresses through a NoCloud seed that one of them must read";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_init_verdicts() {
        assert_eq!(
            parse_wait_output("farm: no cloud-init\n"),
            CloudInit::Absent
        );
        let done = "\nstatus: done\ntime: Sat, 28 Nov 2026 15:00:00 +0000\ndetail:\nDataSourceNoCloud [seed=/dev/vdb][dsmode=net]\nfarm: cloud-init.log\n2026 ... finished\n";
        assert_eq!(parse_wait_output(done), CloudInit::Done);
        assert_eq!(
            parse_wait_output("status: running\nfarm: cloud-init.log\n"),
            CloudInit::Pending {
                status: "running".into()
            }
        );
        let error = "......\nstatus: error\ntime: x\ndetail:\n('locale', ProcessExecutionError(...))\nfarm: cloud-init.log\nline one\nline two\n";
        match parse_wait_output(error) {
            CloudInit::Failed {
                status,
                detail,
                log_tail,
            } => {
                assert_eq!(status, "error");
                assert!(
                    detail.contains("('locale'") && !detail.contains("......"),
                    "{detail}"
                );
                assert_eq!(log_tail, "line one\nline two");
            }
            other => panic!("{other:?}"),
        }
        // Nothing recognisable is a failure to report, not success.
        assert!(matches!(
            parse_wait_output("sh: cloud-init: Permission denied\n"),
            CloudInit::Failed { .. }
        ));
    }

    #[test]
    fn a_console_with_a_login_prompt_and_no_agent_is_a_dead_end() {
        let plain = "Booting from Hard Disk...\nWelcome to Debian GNU/Linux 12!\n[  OK  ] Started ssh.service\n\nDebian GNU/Linux 12 box ttyS0\n\nbox login: ";
        assert_eq!(read_console(plain), ConsoleVerdict::NoAgent);
        // Seen in a loaded run: kernel messages after the prompt, on its line.
        let late_module = "Debian GNU/Linux 12 localhost ttyS0\n\nlocalhost login: [   28.131493] powernow_k8: Power state transitions not supported\n[   28.131887] powernow_k8: Power state transitions not supported\n";
        assert_eq!(read_console(late_module), ConsoleVerdict::NoAgent);
        let cloud = "[  OK  ] Started cloud-init-local.service\nCloud-init v. 22.4.2 running 'init'\nbox login: ";
        assert_eq!(read_console(cloud), ConsoleVerdict::Undecided);
        let farm = "farm-seed: hostname web\nweb login: ";
        assert_eq!(read_console(farm), ConsoleVerdict::Undecided);
        // Still booting: no verdict yet.
        assert_eq!(
            read_console("Welcome to Debian GNU/Linux 12!\n"),
            ConsoleVerdict::Undecided
        );
    }
}
