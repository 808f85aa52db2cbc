//! `farm test` on a tiny VM: the start snapshot `converged` is made once (without `[lab]`
//! asking for it), every test starts from it (what one test wrote, the next does not see),
//! scripts call farm's verbs, a failing test and one past its timeout are reported in the
//! JUnit file (read by junitparser, from PyPI) with their steps and output, and the failed
//! lab is saved as a snapshot that restores to the failed state, beside its console.

use std::process::Command;

use crate::support::project::{ANSIBLE_BIN, Project, stderr, stdout, text};
use crate::support::skip::{ANSIBLE, require_vm};
use crate::support::test_home::shared_store;

const LAB: &str = r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.plain]
from = "tiny"
memory = "256M"

[vms.solo]
platform = "plain"

[tests.a_writes]
script = "tests/writes.sh"

[tests.b_starts_clean]
script = "tests/starts_clean.sh"

[tests.c_fails]
script = "tests/fails.sh"

[tests.d_too_slow]
script = "tests/slow.sh"
timeout = "3s"

[tests.e_flaky]
script = "tests/flaky.sh"
"#;

/// Uses the verbs: a wait, a command, a copy back through `$FARM_SSH_CONFIG` too.
const WRITES: &str = r#"set -e
farm wait solo --port 22 --timeout 30
farm exec solo -- 'echo written-by-a > /root/mark'
farm cp solo:/root/mark "$FARM_TEST.copied"
grep -q written-by-a "$FARM_TEST.copied"
ssh -F "$FARM_SSH_CONFIG" solo cat /root/mark
"#;

/// The first test's file is not in the lab it starts from.
const STARTS_CLEAN: &str = r#"set -e
if farm exec solo -- test -e /root/mark; then echo "a's file is still here"; exit 1; fi
echo clean
"#;

/// Breaks the lab, then fails: the saved failed lab has the break.
const FAILS: &str = r#"farm exec solo -- 'echo broken > /root/broken && sync'
echo "about to fail"
exit 3
"#;

const SLOW: &str = "echo started; sleep 60; echo never\n";

/// Fails its first attempt, passes the next (it counts them beside farm.toml).
const FLAKY: &str = "if [ -e flaky.once ]; then echo second; else touch flaky.once; exit 1; fi\n";

#[test]
fn farm_test_runs_each_test_from_the_start_snapshot_and_keeps_the_failed_lab() {
    if !require_vm("farm_test", &[ANSIBLE]) {
        return;
    }
    let p = Project::with_store(LAB, &shared_store());
    for (path, script) in [
        ("tests/writes.sh", WRITES),
        ("tests/starts_clean.sh", STARTS_CLEAN),
        ("tests/fails.sh", FAILS),
        ("tests/slow.sh", SLOW),
        ("tests/flaky.sh", FLAKY),
    ] {
        p.write(path, script);
    }
    let junit = p.path().join("report.xml");
    let out = p
        .farm(&[
            "test",
            "a_writes",
            "b_starts_clean",
            "c_fails",
            "d_too_slow",
            "--junit",
            junit.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        stdout(&out).contains("4 test(s): 2 passed, 2 failed"),
        "{said}"
    );
    let log = stderr(&out);
    assert!(log.contains("saved snapshot converged"), "{said}");
    assert!(log.contains("a_writes | written-by-a"), "{said}");
    assert!(log.contains("b_starts_clean | clean"), "{said}");
    assert!(
        log.contains("passed a_writes") && log.contains("passed b_starts_clean"),
        "{said}"
    );
    assert!(
        log.contains("FAILED c_fails") && log.contains("failed (exit 3)"),
        "{said}"
    );
    assert!(
        log.contains("FAILED d_too_slow") && log.contains("timed out after 3 s"),
        "{said}"
    );

    // The JUnit report, as a consumer reads it.
    let read = Command::new(format!("{ANSIBLE_BIN}/python"))
        .arg("-c")
        .arg(
            r#"
import sys
from junitparser import JUnitXml, Failure
xml = JUnitXml.fromfile(sys.argv[1])
for suite in xml:
    for case in suite:
        kinds = [type(r).__name__ + ":" + (r.message or "") for r in case.result]
        print(case.name, round(case.time, 1) > 0, kinds, "wait solo port 22" in (case.system_out or ""))
"#,
        )
        .arg(&junit)
        .output()
        .unwrap();
    let cases = stdout(&read);
    assert!(read.status.success(), "{}", text(&read));
    assert!(cases.contains("a_writes True [] True"), "{cases}");
    assert!(cases.contains("b_starts_clean True [] False"), "{cases}");
    assert!(
        cases.contains("c_fails True ['Failure:failed (exit 3); the failed lab is saved: `farm snapshot restore failed-c_fails-"),
        "{cases}"
    );
    assert!(
        cases.contains("d_too_slow True ['Failure:timed out after 3 s"),
        "{cases}"
    );

    // The failed lab: its output, its console, and a snapshot that restores to the break.
    let results = p.path().join(".farm/test-results/c_fails");
    assert!(
        fs_err::read_to_string(results.join("output.log"))
            .unwrap()
            .contains("about to fail")
    );
    let console = fs_err::read_to_string(results.join("consoles/solo.log")).unwrap();
    assert!(!console.trim().is_empty());
    let steps = fs_err::read_to_string(results.join("verbs.jsonl")).unwrap();
    assert!(steps.contains("\"verb\":\"exec\""), "{steps}");
    let listed = stdout(&p.ok(&["snapshot", "ls"]));
    let failed = listed
        .split_whitespace()
        .find(|w| w.starts_with("failed-c_fails-"))
        .unwrap_or_else(|| panic!("{listed}"))
        .to_string();
    p.ok(&["snapshot", "restore", &failed]);
    let broken = p.ok(&["exec", "solo", "--", "cat /root/broken"]);
    assert_eq!(stdout(&broken), "broken\n");

    // One test by name; an unknown one is refused.
    let one = p.ok(&["test", "b_starts_clean"]);
    assert!(
        stdout(&one).contains("1 test(s): 1 passed, 0 failed"),
        "{}",
        text(&one)
    );
    // A test that passes on a retry is flaky; `--repeat` runs one several times.
    let retried = p.ok(&["test", "e_flaky", "--retries", "2"]);
    let said = stderr(&retried);
    assert!(
        said.contains("flaky e_flaky") && said.contains("passed on attempt 2"),
        "{}",
        text(&retried)
    );
    let repeated = p.ok(&["test", "b_starts_clean", "--repeat", "2"]);
    let said = stderr(&repeated);
    assert!(
        said.contains("passed b_starts_clean#1") && said.contains("passed b_starts_clean#2"),
        "{}",
        text(&repeated)
    );
    let unknown = p.run(&["test", "nope"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));
    assert!(
        stderr(&unknown).contains("`nope` is not a test"),
        "{}",
        text(&unknown)
    );
    p.ok(&["down"]);
}
