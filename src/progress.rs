//! The one reporter all progress goes through: status lines and bars on stderr, so stdout
//! carries data only (plans, tables, JSON) and can be piped.
//!
//! On a terminal, long steps show as spinners and byte bars. Anywhere else (a CI log) bars
//! cannot draw, so a long step prints a line when it starts and then a heartbeat every
//! ~30 s (`FARM_HEARTBEAT_SECS`) with what it is doing and for how long: a multi-minute
//! layer build or boot is never a silent gap between two lines.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle, WeakProgressBar};

/// A long step followed by heartbeats off a terminal.
struct Tracked {
    label: String,
    bar: WeakProgressBar,
    next: Duration,
}

#[derive(Clone)]
pub struct Reporter {
    multi: MultiProgress,
    quiet: bool,
    terminal: bool,
    tracked: Arc<Mutex<Vec<Tracked>>>,
    heartbeat: Duration,
    beating: Arc<Once>,
}

fn heartbeat_interval() -> Duration {
    std::env::var("FARM_HEARTBEAT_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map_or(Duration::from_secs(30), Duration::from_secs_f64)
}

impl Reporter {
    /// Bars draw only on a terminal; status lines are printed either way unless `quiet`.
    pub fn new(quiet: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let target = if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            quiet,
            terminal,
            tracked: Arc::new(Mutex::new(Vec::new())),
            heartbeat: heartbeat_interval(),
            beating: Arc::new(Once::new()),
        }
    }

    /// A reporter that shows nothing (tests, `--quiet`).
    pub fn hidden() -> Self {
        Self::new(true)
    }

    /// A status line such as `fetched debian-bookworm (512 MiB, 3.2 s)`.
    pub fn line(&self, message: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        if self.multi.is_hidden() {
            eprintln!("{}", message.as_ref());
        } else {
            let _ = self.multi.println(message.as_ref());
        }
    }

    /// `verb` right-aligned, then what it applies to: cargo's status line.
    pub fn status(&self, verb: &str, message: impl AsRef<str>) {
        self.line(format!("{verb:>12} {}", message.as_ref()));
    }

    /// A warning: printed even with `--quiet`, which silences progress, not problems.
    pub fn warn(&self, message: impl AsRef<str>) {
        let text = format!("warning: {}", message.as_ref());
        if self.multi.is_hidden() {
            eprintln!("{text}");
        } else {
            let _ = self.multi.println(text);
        }
    }

    /// A byte-counting bar: total, rate and ETA when the length is known, a spinner otherwise.
    pub fn bytes(&self, prefix: &str, len: Option<u64>) -> ProgressBar {
        self.bytes_for(prefix, "", len)
    }

    /// [`Reporter::bytes`] saying what moves (shown off a terminal, where bars cannot draw).
    pub fn bytes_for(&self, prefix: &str, message: &str, len: Option<u64>) -> ProgressBar {
        let bar = match len {
            Some(len) => ProgressBar::new(len).with_style(
                ProgressStyle::with_template(
                    "{prefix:>12} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            ),
            None => ProgressBar::no_length().with_style(
                ProgressStyle::with_template("{prefix:>12} {spinner} {binary_bytes} {binary_bytes_per_sec}")
                    .expect("valid template"),
            ),
        };
        self.add(
            bar.with_prefix(prefix.to_string())
                .with_message(message.to_string()),
            prefix,
        )
    }

    /// A spinner with elapsed time, for a step whose length is unknown.
    pub fn spinner(&self, prefix: &str, message: &str) -> ProgressBar {
        let bar = ProgressBar::new_spinner()
            .with_style(
                ProgressStyle::with_template("{prefix:>12} {spinner} {msg} ({elapsed})")
                    .expect("valid template"),
            )
            .with_prefix(prefix.to_string())
            .with_message(message.to_string());
        let bar = self.add(bar, prefix);
        if self.terminal {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        bar
    }

    fn add(&self, bar: ProgressBar, label: &str) -> ProgressBar {
        if self.quiet {
            bar.set_draw_target(ProgressDrawTarget::hidden());
            return bar;
        }
        let bar = self.multi.add(bar);
        if !self.terminal {
            let message = bar.message();
            self.line(format!("{label:>12} {message}").trim_end());
            self.tracked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Tracked {
                    label: label.to_string(),
                    bar: bar.downgrade(),
                    next: self.heartbeat,
                });
            self.start_heartbeats();
        }
        bar
    }

    /// Off a terminal: one thread prints a line for every long step that has been running
    /// another heartbeat interval.
    fn start_heartbeats(&self) {
        let reporter = self.clone();
        self.beating.call_once(move || {
            let _ = std::thread::Builder::new()
                .name("farm-heartbeat".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_millis(250));
                        reporter.beat();
                    }
                });
        });
    }

    fn beat(&self) {
        let mut due = Vec::new();
        {
            let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
            tracked.retain_mut(|t| {
                let Some(bar) = t.bar.upgrade().filter(|b| !b.is_finished()) else {
                    return false;
                };
                let elapsed = bar.elapsed();
                if elapsed >= t.next {
                    t.next = elapsed + self.heartbeat;
                    due.push(heartbeat_line(&t.label, &bar, elapsed));
                }
                true
            });
        }
        for line in due {
            self.line(line);
        }
    }
}

fn heartbeat_line(label: &str, bar: &ProgressBar, elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    let took = if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    };
    let mut what = bar.message();
    if let Some(len) = bar.length() {
        let done = indicatif::BinaryBytes(bar.position());
        what = format!("{what} {done}/{}", indicatif::BinaryBytes(len))
            .trim()
            .to_string();
    }
    format!("{:>12} {label}: {what} ({took})", "still").replace(":  (", ": (")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_name_the_step_and_its_time() {
        let bar = ProgressBar::hidden().with_message("booting build VM");
        assert_eq!(
            heartbeat_line("web_amd64", &bar, Duration::from_secs(95)),
            "       still web_amd64: booting build VM (1m35s)"
        );
        let bytes = ProgressBar::hidden();
        bytes.set_length(2048);
        bytes.set_position(1024);
        assert_eq!(
            heartbeat_line("push", &bytes, Duration::from_secs(30)),
            "       still push: 1.00 KiB/2.00 KiB (30s)"
        );
    }
}
