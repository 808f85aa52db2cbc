//! `farm test`: each test of farm.toml's `[tests]` runs its script against the lab restored
//! from its start snapshot, so tests are independent and run in any order, in seconds each.
//!
//! The start snapshot `converged` is the lab as `up` converged it from nothing: made by a
//! `down` and an `up` when it is missing, and made again when what the lab is made from
//! changed (`up` keys it, see `run::converged`). A script gets the lab's environment
//! (`FARM_CONFIG`, `FARM_STORE`, `FARM_SSH_CONFIG`, `FARM_TEST`, `FARM_VERB_LOG`,
//! `FARM_TEST_RESULTS`, and this farm first on `PATH`, so its verbs are this farm's); what
//! it prints is shown as it comes and kept. Its results go in `.farm/test-results/<test>/`:
//! its output, its verbs' times, and the pcaps of its captures (one it left running is
//! stopped). A test that does not pass leaves its lab saved as a snapshot
//! (`failed-<test>-<time>`) and every VM's console there too.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::model::config::TestDecl;
use crate::model::lab::test_report::{Outcome, TestResult, steps_from_log};
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::lab::{LabError, UpOptions};
use crate::run::state::StatePaths;

/// How long a script stopped at its timeout has to end after SIGTERM, before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// What `farm test` was asked for.
pub struct TestOptions {
    /// The tests to run, in this order.
    pub tests: Vec<TestDecl>,
    /// How `up` makes the lab when the start snapshot `converged` is missing.
    pub up: UpOptions,
    /// Leave the lab of a failed test running (it is saved either way).
    pub keep: bool,
    /// Lines of output go to the terminal as they come (`false`: only into the results).
    pub echo: bool,
    /// GitHub Actions' groups and annotations around each test's output.
    pub github: bool,
    /// How many times each test runs (`--repeat`), each run reported on its own.
    pub repeat: u32,
    /// How many times a failing run is tried again (`--retries`).
    pub retries: u32,
}

/// Runs the tests; their results, in order. Only a lab that cannot be made at all is an
/// error: a test that cannot start is a result ([`Outcome::Error`]).
pub fn run_tests(
    project: &mut Project,
    state_root: &Path,
    options: &TestOptions,
    reporter: &Reporter,
) -> Result<Vec<TestResult>, LabError> {
    if options
        .tests
        .iter()
        .any(|t| t.start.value == crate::model::lab::converged::CONVERGED)
    {
        // `up` keeps it for `farm test` whatever `[lab] converged_snapshot` says.
        project.loaded.config.lab.converged_snapshot = true;
        make_converged(project, state_root, &options.up, reporter)?;
    }
    let results_root = state_root.join("test-results");
    let mut results = Vec::new();
    // Right after `up` made or restored it, the lab is at the converged moment: the first
    // test that starts there needs no restore.
    let mut at_start = options
        .tests
        .iter()
        .any(|t| t.start.value == crate::model::lab::converged::CONVERGED)
        .then(|| crate::model::lab::converged::CONVERGED.to_string());
    let total = options.tests.len() * options.repeat.max(1) as usize;
    for test in &options.tests {
        for run in 1..=options.repeat.max(1) {
            let position = (results.len() + 1, total);
            let name = if options.repeat > 1 {
                format!("{}#{run}", test.name.value)
            } else {
                test.name.value.clone()
            };
            if options.github {
                println!("::group::farm test {name}");
            }
            // A test that fails is run again, up to `retries` times: one that then passes
            // is flaky, and keeps its failed attempts (their times and saved labs).
            let mut earlier = Vec::new();
            let result = loop {
                let fresh = at_start
                    .take_if(|start| *start == test.start.value)
                    .is_some();
                let mut result = run_one(
                    project,
                    state_root,
                    &results_root,
                    test,
                    (fresh, position),
                    options,
                    reporter,
                );
                result.name = name.clone();
                if result.outcome.passed() || earlier.len() as u32 >= options.retries {
                    result.earlier = earlier;
                    break result;
                }
                reporter.warn(format!(
                    "Test `{name}` {} (attempt {}); running it again",
                    result.failure_message(),
                    earlier.len() + 1
                ));
                earlier.push(result.as_attempt());
            };
            if options.github {
                println!("::endgroup::");
                if !result.outcome.passed() {
                    println!("{}", crate::model::lab::test_report::github_error(&result));
                }
            }
            reporter.status(
                if !result.outcome.passed() {
                    "FAILED"
                } else if result.flaky() {
                    "flaky"
                } else {
                    "passed"
                },
                format!(
                    "{} ({:.1} s, restore {:.1} s){}",
                    result.name,
                    result.seconds,
                    result.restore_seconds,
                    if result.outcome.passed() {
                        if result.flaky() {
                            format!(": passed on attempt {}", result.earlier.len() + 1)
                        } else {
                            String::new()
                        }
                    } else {
                        format!(": {}", result.failure_message())
                    }
                ),
            );
            results.push(result);
        }
    }
    Ok(results)
}

/// The start snapshot `converged`, as `up` keeps it: the lab is taken down, and `up` from
/// nothing restores the snapshot when it is current, or boots, provisions and saves it.
fn make_converged(
    project: &Project,
    state_root: &Path,
    up: &UpOptions,
    reporter: &Reporter,
) -> Result<(), LabError> {
    crate::run::down::down(
        project,
        state_root,
        &[],
        false,
        up.stop_timeout,
        false,
        reporter,
    )?;
    crate::run::up::up(project, state_root, up, reporter)?;
    Ok(())
}

/// One test, the `position`th of a run: its start snapshot restored (unless the lab is
/// `fresh` from it), its script run, and its lab kept when it did not pass.
fn run_one(
    project: &Project,
    state_root: &Path,
    results_root: &Path,
    test: &TestDecl,
    (fresh, position): (bool, (usize, usize)),
    options: &TestOptions,
    reporter: &Reporter,
) -> TestResult {
    let name = test.name.value.clone();
    let started = Instant::now();
    let dir = results_root.join(&name);
    let _ = fs_err::remove_dir_all(&dir);
    let error = |why: String, restore_seconds: f64| TestResult {
        name: name.clone(),
        outcome: Outcome::Error(why),
        seconds: started.elapsed().as_secs_f64(),
        restore_seconds,
        output: String::new(),
        steps: Vec::new(),
        failure_snapshot: None,
        earlier: Vec::new(),
    };
    if let Err(e) = fs_err::create_dir_all(&dir) {
        return error(e.to_string(), 0.0);
    }
    let restored = if fresh {
        Ok(())
    } else {
        crate::run::snapshot::restore(project, state_root, &test.start.value, reporter).map(|_| ())
    };
    if let Err(e) = restored {
        let why = format!(
            "its start snapshot `{}` did not restore: {}",
            test.start.value,
            crate::model::text::error_chain(&e)
        );
        // Kept with the test's results, as a script's output is: the run's log scrolls away.
        let _ = fs_err::write(dir.join("output.log"), format!("{why}\n"));
        return error(why, started.elapsed().as_secs_f64());
    }
    let restore_seconds = started.elapsed().as_secs_f64();
    let verb_log = dir.join("verbs.jsonl");
    // On a terminal, a spinner under the script's lines says which test runs and what it
    // last said; elsewhere a line when it starts, then a heartbeat.
    let bar = reporter.spinner(
        "testing",
        &format!("{name} ({}/{})", position.0, position.1),
    );
    let run = run_script(
        project,
        state_root,
        test,
        &verb_log,
        options,
        (reporter, &bar),
    );
    bar.finish_and_clear();
    let (outcome, output) = match run {
        Ok(ran) => ran,
        Err(e) => (Outcome::Error(e), String::new()),
    };
    let _ = fs_err::write(dir.join("output.log"), &output);
    stop_captures(project, state_root, &dir, reporter);
    let steps = steps_from_log(&fs_err::read_to_string(&verb_log).unwrap_or_default());
    let mut result = TestResult {
        name: name.clone(),
        outcome,
        seconds: started.elapsed().as_secs_f64(),
        restore_seconds,
        output,
        steps,
        failure_snapshot: None,
        earlier: Vec::new(),
    };
    if !result.outcome.passed() {
        result.failure_snapshot =
            keep_failed_lab(project, state_root, &dir, &name, options.keep, reporter);
    }
    result
}

/// Runs the test's script with the lab's environment, for at most its timeout: how it
/// ended and what it printed.
fn run_script(
    project: &Project,
    state_root: &Path,
    test: &TestDecl,
    verb_log: &Path,
    options: &TestOptions,
    (reporter, bar): (&Reporter, &indicatif::ProgressBar),
) -> Result<(Outcome, String), String> {
    use std::os::unix::process::CommandExt;
    let state = StatePaths::new(state_root);
    let script = &test.script.value;
    let mut command = if crate::sys::programs::is_executable(script) {
        Command::new(script)
    } else {
        let mut sh = Command::new("sh");
        sh.arg(script);
        sh
    };
    let farm_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![farm_dir];
    paths.extend(std::env::split_paths(&path));
    let (reader, writer) = std::io::pipe().map_err(|e| e.to_string())?;
    command
        .current_dir(project.project_dir())
        .env("FARM_CONFIG", absolute(&project.config_path))
        .env("FARM_STORE", absolute(&project.store_dir))
        .env("FARM_SSH_CONFIG", absolute(&state.ssh_config()))
        .env("FARM_TEST", &test.name.value)
        .env("FARM_VERB_LOG", absolute(verb_log))
        .env(
            crate::model::lab::test_report::RESULTS_ENV,
            absolute(verb_log.parent().unwrap_or(Path::new("."))),
        )
        .env(
            "PATH",
            std::env::join_paths(paths).map_err(|e| e.to_string())?,
        )
        .stdin(Stdio::null())
        .stdout(writer.try_clone().map_err(|e| e.to_string())?)
        .stderr(writer)
        // Its own process group: a timeout stops the script and everything it started.
        .process_group(0);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run `{}`: {e}", script.display()))?;
    // The writing ends are the child's alone now: the reader sees the end when it exits.
    drop(command);
    let prefix = format!("{} | ", test.name.value);
    let echo = options.echo;
    let (reporter, bar) = (reporter.clone(), bar.clone());
    let heading = bar.message();
    let reading = std::thread::spawn(move || {
        let mut kept = String::new();
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if echo {
                reporter.line(format!("{prefix}{line}"));
                bar.set_message(format!(
                    "{heading}: {}",
                    crate::model::text::clip(&line, 60)
                ));
            }
            kept.push_str(&line);
            kept.push('\n');
        }
        kept
    });
    let deadline = Instant::now() + test.timeout;
    let outcome = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break if status.success() {
                Outcome::Passed
            } else {
                Outcome::Failed {
                    exit: status.code(),
                }
            };
        }
        if Instant::now() >= deadline {
            stop_group(&mut child);
            break Outcome::TimedOut {
                after_secs: test.timeout.as_secs(),
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = reading.join().unwrap_or_default();
    Ok((outcome, output))
}

/// Stops the captures a script left running (they land where it asked, and in the test's
/// results): a failed script often ends before its `farm capture --stop`.
fn stop_captures(project: &Project, state_root: &Path, results: &Path, reporter: &Reporter) {
    let lab = crate::run::verbs::Lab {
        topology: &project.loaded.topology,
        state: StatePaths::new(state_root),
    };
    for (capture, stopped) in lab.stop_all_captures(results) {
        match stopped {
            Ok((file, frames)) => reporter.status(
                "captured",
                format!(
                    "{frames} frames of {} on {} in {} (left running by the test)",
                    capture.vm,
                    capture.network,
                    file.display()
                ),
            ),
            Err(e) => reporter.warn(format!(
                "The capture of {} on {} was lost: {e}",
                capture.vm, capture.network
            )),
        }
    }
}

/// SIGTERM to the script's process group, SIGKILL after [`TERM_GRACE`].
fn stop_group(child: &mut std::process::Child) {
    let group = child.id() as i32;
    // SAFETY: kill(2) with a negative pid signals that process group; it touches no memory.
    unsafe { libc::kill(-group, libc::SIGTERM) };
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    let _ = child.wait();
}

/// Saves the failed lab as `failed-<test>-<time>` (stopped unless `keep`) and copies every
/// VM's console into the test's results; the snapshot's name, when it was saved.
fn keep_failed_lab(
    project: &Project,
    state_root: &Path,
    dir: &Path,
    test: &str,
    keep: bool,
    reporter: &Reporter,
) -> Option<String> {
    let lab = crate::run::verbs::Lab {
        topology: &project.loaded.topology,
        state: StatePaths::new(state_root),
    };
    let consoles = dir.join("consoles");
    let _ = fs_err::create_dir_all(&consoles);
    for vm in lab.state.records().keys() {
        let _ = fs_err::write(consoles.join(format!("{vm}.log")), lab.console(vm));
    }
    let name = format!("failed-{test}-{}", timestamp());
    match crate::run::snapshot::save(project, state_root, &name, &[], !keep, reporter) {
        Ok(_) => {
            reporter.status(
                "kept",
                format!(
                    "the failed lab of {test} as snapshot {name} (`farm snapshot restore {name}`; consoles and output in `{}`)",
                    dir.display()
                ),
            );
            Some(name)
        }
        Err(e) => {
            reporter.warn(format!(
                "The failed lab of test `{test}` could not be saved: {e}"
            ));
            None
        }
    }
}

/// This moment as `YYYYmmdd-HHMMSS` (UTC): a snapshot name's part.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_792), (2026, 12, 5));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
