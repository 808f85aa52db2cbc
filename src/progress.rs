//! The one reporter all progress goes through: status lines and bars on stderr, so stdout
//! carries data only (plans, tables, JSON) and can be piped.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
pub struct Reporter {
    multi: MultiProgress,
    quiet: bool,
}

impl Reporter {
    /// Bars draw only on a terminal; status lines are printed either way unless `quiet`.
    pub fn new(quiet: bool) -> Self {
        let target = if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            quiet,
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

    /// A byte-counting bar: total, rate and ETA when the length is known, a spinner otherwise.
    pub fn bytes(&self, prefix: &str, len: Option<u64>) -> ProgressBar {
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
        self.add(bar.with_prefix(prefix.to_string()))
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
        let bar = self.add(bar);
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }

    fn add(&self, bar: ProgressBar) -> ProgressBar {
        if self.quiet {
            bar.set_draw_target(ProgressDrawTarget::hidden());
            bar
        } else {
            self.multi.add(bar)
        }
    }
}
