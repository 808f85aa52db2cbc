//! What `farm test` reports, as data and as text: each test's outcome, its time and the
//! verbs it called (`FARM_VERB_LOG` lines), rendered as JUnit XML (one testcase per test),
//! as a GitHub step summary, and as GitHub Actions annotations.

/// The environment variable naming a test's results directory (`.farm/test-results/<test>`),
/// where verbs keep what a failure is read from (pcaps).
pub const RESULTS_ENV: &str = "FARM_TEST_RESULTS";

use std::fmt::Write;

use crate::model::text::last_lines;

/// How one run of a test ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Passed,
    /// The script exited non-zero (`None`: killed by a signal).
    Failed {
        exit: Option<i32>,
    },
    /// The script ran past its timeout and was stopped.
    TimedOut {
        after_secs: u64,
    },
    /// The test could not run (its start snapshot did not restore, its script is missing).
    Error(String),
}

impl Outcome {
    pub fn passed(&self) -> bool {
        *self == Outcome::Passed
    }

    /// One line: "passed", "failed (exit 1)", "timed out after 300 s", "error: …".
    pub fn describe(&self) -> String {
        match self {
            Outcome::Passed => "passed".into(),
            Outcome::Failed { exit: Some(code) } => format!("failed (exit {code})"),
            Outcome::Failed { exit: None } => "failed (killed by a signal)".into(),
            Outcome::TimedOut { after_secs } => format!("timed out after {after_secs} s"),
            Outcome::Error(why) => format!("error: {why}"),
        }
    }
}

/// One verb a test's script called, as `run::verbs` logged it.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct Step {
    pub verb: String,
    pub vm: String,
    pub what: String,
    pub seconds: f64,
    pub ok: bool,
}

/// Steps from a verb log's lines; lines that are not steps are skipped.
pub fn steps_from_log(log: &str) -> Vec<Step> {
    log.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// One test's run.
#[derive(Clone, Debug, PartialEq)]
pub struct TestResult {
    pub name: String,
    pub outcome: Outcome,
    /// From its start snapshot restored to its script's end.
    pub seconds: f64,
    /// How long restoring its start snapshot took, within `seconds`.
    pub restore_seconds: f64,
    /// What its script printed (stdout and stderr, interleaved).
    pub output: String,
    pub steps: Vec<Step>,
    /// The snapshot its failed lab was saved as.
    pub failure_snapshot: Option<String>,
    /// The attempts that failed before this one (`farm test --retries`).
    pub earlier: Vec<Attempt>,
}

/// A failed attempt of a test that was run again.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub outcome: Outcome,
    pub seconds: f64,
    pub failure_snapshot: Option<String>,
}

impl TestResult {
    /// It passed, after failing first.
    pub fn flaky(&self) -> bool {
        self.outcome.passed() && !self.earlier.is_empty()
    }

    /// This run as an earlier attempt of the next one.
    pub fn as_attempt(&self) -> Attempt {
        Attempt {
            outcome: self.outcome.clone(),
            seconds: self.seconds,
            failure_snapshot: self.failure_snapshot.clone(),
        }
    }

    /// What a failure says: its outcome, the snapshot to restore, the output's last lines.
    pub fn failure_message(&self) -> String {
        let mut message = self.outcome.describe();
        if let Some(snapshot) = &self.failure_snapshot {
            let _ = write!(
                message,
                "; the failed lab is saved: `farm snapshot restore {snapshot}`"
            );
        }
        message
    }
}

/// JUnit XML: a `testsuite` of one `testcase` per test (its time the test's), a `failure`
/// or `error` for one that did not pass, and its output with its steps and their times in
/// `system-out`.
pub fn junit_xml(suite: &str, results: &[TestResult]) -> String {
    let failures = results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed { .. } | Outcome::TimedOut { .. }))
        .count();
    let errors = results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Error(_)))
        .count();
    let total: f64 = results.iter().map(|r| r.seconds).sum();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"{s}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{total:.3}\">",
        results.len(),
        s = escape(suite)
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{s}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"0\" time=\"{total:.3}\">",
        results.len(),
        s = escape(suite)
    );
    for r in results {
        let _ = writeln!(
            x,
            "    <testcase name=\"{}\" classname=\"{}\" time=\"{:.3}\">",
            escape(&r.name),
            escape(suite),
            r.seconds
        );
        let tail = last_lines(&r.output, 20);
        match &r.outcome {
            Outcome::Passed => {}
            Outcome::Failed { .. } | Outcome::TimedOut { .. } => {
                let _ = writeln!(
                    x,
                    "      <failure message=\"{}\" type=\"{}\">{}</failure>",
                    escape(&r.failure_message()),
                    if matches!(r.outcome, Outcome::TimedOut { .. }) {
                        "timeout"
                    } else {
                        "failure"
                    },
                    escape(&tail)
                );
            }
            Outcome::Error(_) => {
                let _ = writeln!(
                    x,
                    "      <error message=\"{}\" type=\"error\">{}</error>",
                    escape(&r.failure_message()),
                    escape(&tail)
                );
            }
        }
        let _ = writeln!(
            x,
            "      <system-out>{}</system-out>",
            escape(&system_out(r))
        );
        x.push_str("    </testcase>\n");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

/// A test's earlier attempts, its steps and their times, then its output.
fn system_out(r: &TestResult) -> String {
    let mut out = String::new();
    if r.flaky() {
        let _ = writeln!(out, "flaky: passed on attempt {}", r.earlier.len() + 1);
    }
    for (i, attempt) in r.earlier.iter().enumerate() {
        let _ = writeln!(
            out,
            "attempt {}: {} ({:.1} s){}",
            i + 1,
            attempt.outcome.describe(),
            attempt.seconds,
            attempt
                .failure_snapshot
                .as_ref()
                .map(|s| format!(", its lab saved as snapshot {s}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        out,
        "restore of the start snapshot: {:.1} s",
        r.restore_seconds
    );
    for step in &r.steps {
        let _ = writeln!(
            out,
            "{} {} {}: {:.1} s{}",
            step.verb,
            step.vm,
            step.what,
            step.seconds,
            if step.ok { "" } else { " (failed)" }
        );
    }
    out.push('\n');
    out.push_str(&r.output);
    out
}

/// A markdown table for `$GITHUB_STEP_SUMMARY`.
pub fn github_summary(results: &[TestResult]) -> String {
    let mut md =
        String::from("### farm test\n\n| test | result | time | restore |\n|---|---|---:|---:|\n");
    for r in results {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} s | {:.1} s |",
            r.name,
            if r.flaky() {
                format!("passed on attempt {} (flaky)", r.earlier.len() + 1)
            } else if r.outcome.passed() {
                "passed".to_string()
            } else {
                r.failure_message().replace('|', "\\|")
            },
            r.seconds,
            r.restore_seconds
        );
    }
    md
}

/// A GitHub Actions error annotation for a test that did not pass.
pub fn github_error(r: &TestResult) -> String {
    // Workflow commands end at a newline: theirs are written `%0A`.
    let message = format!("{}\n{}", r.failure_message(), last_lines(&r.output, 10))
        .replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A");
    format!("::error title=farm test {}::{message}", r.name)
}

/// Text in XML attributes and elements; characters XML 1.0 cannot hold become `?`.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, outcome: Outcome) -> TestResult {
        TestResult {
            name: name.into(),
            outcome,
            seconds: 2.5,
            restore_seconds: 1.25,
            output: "line one\n<b>&\u{1b}[0m\n".into(),
            steps: steps_from_log(
                "{\"verb\":\"wait\",\"vm\":\"hv\",\"what\":\"port 22 listening\",\"seconds\":0.5,\"ok\":true}\nnot json\n",
            ),
            failure_snapshot: None,
            earlier: Vec::new(),
        }
    }

    #[test]
    fn a_test_that_passes_on_a_retry_is_flaky_and_keeps_its_attempts() {
        let mut flaky = result("flaky", Outcome::Passed);
        let mut failed = result("flaky", Outcome::Failed { exit: Some(1) });
        failed.failure_snapshot = Some("failed-flaky-1".into());
        flaky.earlier.push(failed.as_attempt());
        assert!(flaky.flaky() && !result("p", Outcome::Passed).flaky());
        let xml = junit_xml("farm test", &[flaky.clone()]);
        assert!(xml.contains("failures=\"0\""), "{xml}");
        assert!(
            xml.contains("flaky: passed on attempt 2\nattempt 1: failed (exit 1) (2.5 s), its lab saved as snapshot failed-flaky-1"),
            "{xml}"
        );
        assert!(github_summary(&[flaky]).contains("| flaky | passed on attempt 2 (flaky) |"));
    }

    #[test]
    fn junit_has_one_testcase_per_test_with_failures_escaped() {
        let mut failed = result("fails", Outcome::Failed { exit: Some(1) });
        failed.failure_snapshot = Some("failed-fails-20261205-120000".into());
        let xml = junit_xml(
            "farm test",
            &[
                result("passes", Outcome::Passed),
                failed,
                result("slow", Outcome::TimedOut { after_secs: 5 }),
                result("broken", Outcome::Error("no script `x.sh`".into())),
            ],
        );
        assert!(
            xml.contains("tests=\"4\" failures=\"2\" errors=\"1\""),
            "{xml}"
        );
        assert!(xml.contains("<testcase name=\"passes\" classname=\"farm test\" time=\"2.500\">"));
        assert!(xml.contains("message=\"failed (exit 1); the failed lab is saved: `farm snapshot restore failed-fails-20261205-120000`\""), "{xml}");
        assert!(xml.contains("type=\"timeout\""));
        assert!(xml.contains("<error message=\"error: no script `x.sh`\""));
        assert!(xml.contains("&lt;b&gt;&amp;?[0m"), "{xml}");
        assert!(xml.contains("wait hv port 22 listening: 0.5 s"), "{xml}");
        assert!(!xml.contains('\u{1b}'));
    }

    #[test]
    fn github_gets_a_table_and_one_line_annotations() {
        let failed = result("fails", Outcome::Failed { exit: Some(3) });
        let summary = github_summary(&[result("passes", Outcome::Passed), failed.clone()]);
        assert!(
            summary.contains("| passes | passed | 2.5 s | 1.2 s |"),
            "{summary}"
        );
        assert!(summary.contains("| fails | failed (exit 3) |"), "{summary}");
        let annotation = github_error(&failed);
        assert!(annotation.starts_with("::error title=farm test fails::failed (exit 3)%0A"));
        assert!(!annotation.contains('\n'));
    }
}
