//! What `farm wait` waits for inside a VM, as the one shell script that waits for it there.
//!
//! The guest waits, not farm: one ssh session runs a loop that looks every 0.2 s (a
//! look is a `test`, or a read of `/proc/net/tcp`, not a login), and ends by itself at its
//! deadline, so a wait whose connection farm gives up on leaves nothing behind. The scripts
//! are POSIX sh that busybox runs too: farm's tiny image and Debian alike.

use crate::model::shell::shell_quote;

/// How often the guest looks.
const LOOK_EVERY: &str = "0.2";

/// What the guest's script exits with when the deadline passed.
pub const TIMED_OUT: i32 = 124;

/// What it exits with when what it waited for can no longer happen (a failed unit).
pub const FAILED: i32 = 3;

/// A condition inside a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitFor {
    /// A TCP port listening (IPv4 or IPv6).
    Port(u16),
    /// A path that exists.
    File(String),
    /// A shell command that succeeds.
    Until(String),
    /// A systemd unit that is active; a failed one fails the wait at once.
    Unit(String),
    /// A line of the VM's serial console matching this extended regular expression
    /// (`grep -E`), anywhere in the console since its qemu last started (a restore starts
    /// it anew). Looked for where the VM runs, not in the guest: a guest that no longer
    /// answers ssh still writes its console.
    Console(String),
}

impl WaitFor {
    /// How the condition reads in messages: "port 22 listening".
    pub fn describe(&self) -> String {
        match self {
            WaitFor::Port(port) => format!("port {port} listening"),
            WaitFor::File(path) => format!("`{path}` existing"),
            WaitFor::Until(command) => format!("`{command}` succeeding"),
            WaitFor::Unit(unit) => format!("unit `{unit}` active"),
            WaitFor::Console(regex) => format!("console line matching `{regex}`"),
        }
    }

    /// Whether it is looked for on the VM's site (its console) rather than in the guest.
    pub fn on_site(&self) -> bool {
        matches!(self, WaitFor::Console(_))
    }

    /// The script that waits on the VM's site for `console` (the VM's serial log there)
    /// to match, for at most `timeout_secs`; exit codes as [`WaitFor::guest_script`]'s.
    /// `None` for the conditions the guest looks for.
    pub fn site_script(&self, console: &std::path::Path, timeout_secs: u64) -> Option<String> {
        let WaitFor::Console(regex) = self else {
            return None;
        };
        Some(looping(
            &format!(
                "grep -qE -e {} {} 2>/dev/null",
                shell_quote(regex),
                crate::model::shell::quote_path(console)
            ),
            timeout_secs,
        ))
    }

    /// The test the guest repeats: exit 0 when met, [`FAILED`] when it never will be,
    /// anything else to look again.
    fn test(&self) -> String {
        match self {
            // A listening socket is state 0A in /proc/net/tcp{,6}, its local port the hex
            // after the address's colon.
            WaitFor::Port(port) => format!(
                "awk 'toupper($4) == \"0A\" && toupper($2) ~ /:{port:04X}$/ {{ found = 1 }} END {{ exit !found }}' /proc/net/tcp /proc/net/tcp6 2>/dev/null"
            ),
            WaitFor::File(path) => format!("test -e {}", shell_quote(path)),
            // 0 or 1 whatever the command exits with: its own 3 is not a failed unit.
            WaitFor::Until(command) => format!(
                "if sh -c {} >/dev/null 2>&1; then true; else false; fi",
                shell_quote(command)
            ),
            WaitFor::Unit(unit) => format!(
                "case $(systemctl is-active {u} 2>/dev/null) in active) true ;; failed) systemctl --no-pager status {u} 2>&1 | tail -n 20; exit {FAILED} ;; *) false ;; esac",
                u = shell_quote(unit)
            ),
            // Looked for on the site (`site_script`); in the guest, never met.
            WaitFor::Console(_) => "false".to_string(),
        }
    }

    /// The script that waits in the guest for at most `timeout_secs`: exit 0 when the
    /// condition holds, [`TIMED_OUT`] at the deadline, [`FAILED`] when it cannot hold.
    pub fn guest_script(&self, timeout_secs: u64) -> String {
        looping(&self.test(), timeout_secs)
    }
}

/// `test` repeated every [`LOOK_EVERY`] until it exits 0 or [`FAILED`], or the deadline.
fn looping(test: &str, timeout_secs: u64) -> String {
    format!(
        "end=$(( $(date +%s) + {timeout_secs} )); \
         while :; do ( {test} ); s=$?; \
         [ $s -eq 0 ] && exit 0; [ $s -eq {FAILED} ] && exit {FAILED}; \
         [ $(date +%s) -ge $end ] && exit {TIMED_OUT}; sleep {LOOK_EVERY}; done"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(script: &str) -> i32 {
        Command::new("sh")
            .args(["-c", script])
            .status()
            .unwrap()
            .code()
            .unwrap()
    }

    #[test]
    fn a_met_condition_ends_the_wait_and_an_unmet_one_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let there = dir.path().join("it's here");
        fs_err::write(&there, "").unwrap();
        let file = |p: &std::path::Path| WaitFor::File(p.display().to_string());
        assert_eq!(sh(&file(&there).guest_script(5)), 0);
        assert_eq!(
            sh(&file(&dir.path().join("absent")).guest_script(0)),
            TIMED_OUT
        );
        assert_eq!(sh(&WaitFor::Until("true".into()).guest_script(5)), 0);
        for failing in ["exit 1", "exit 3"] {
            assert_eq!(
                sh(&WaitFor::Until(failing.into()).guest_script(0)),
                TIMED_OUT
            );
        }
    }

    #[test]
    fn a_listening_port_is_read_from_proc() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(sh(&WaitFor::Port(port).guest_script(5)), 0);
        drop(listener);
        // A port nobody listens on (bound, then closed).
        assert_eq!(sh(&WaitFor::Port(port).guest_script(0)), TIMED_OUT);
    }

    #[test]
    fn a_console_line_is_looked_for_in_the_log_on_the_site() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        fs_err::write(&log, "booting\nWelcome to Debian GNU/Linux 12\n").unwrap();
        let wait = |regex: &str, secs| {
            WaitFor::Console(regex.into())
                .site_script(&log, secs)
                .unwrap()
        };
        assert_eq!(sh(&wait("^Welcome to .* 12$", 5)), 0);
        assert_eq!(sh(&wait("Kernel panic", 0)), TIMED_OUT);
        assert!(WaitFor::Port(22).site_script(&log, 1).is_none());
        assert!(WaitFor::Console("x".into()).on_site());
    }

    #[test]
    fn conditions_are_described_and_quoted() {
        assert_eq!(WaitFor::Port(22).describe(), "port 22 listening");
        assert!(
            WaitFor::File("/tmp/it's".into())
                .guest_script(3)
                .contains(r"test -e '/tmp/it'\''s'")
        );
        assert!(
            WaitFor::Unit("nginx".into())
                .guest_script(3)
                .contains(&format!("exit {FAILED}"))
        );
    }
}
