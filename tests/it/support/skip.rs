//! A test whose real parts (qemu, mmdebstrap, nginx, sshd, …) are missing is skipped loudly,
//! never passed silently, and under CI it fails.
//!
//! Why this shape: a VM test that returns early because qemu is missing would count as a pass.
//! Outside CI a skip writes one line to the process's real stderr (not the test's captured
//! output, which a passing test never shows), appends the test to the run's skip list (which
//! `scripts/test.sh` counts at the end of a run), and the test binary prints how many tests it
//! skipped when it exits. Under `CI=true` a missing part panics: CI installs every part with
//! `scripts/setup.sh`, so a missing one is a setup bug.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Something a test needs from the machine.
#[derive(Clone, Copy, Debug)]
pub enum Part {
    /// A program on `PATH`.
    Program(&'static str),
    /// A file at a fixed path (a server installed by `scripts/setup.sh`, a venv's program).
    File(&'static str),
}

impl Part {
    fn present(self) -> bool {
        match self {
            Part::Program(name) => farm::sys::programs::find_program(name).is_some(),
            Part::File(path) => Path::new(path).exists(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Part::Program(name) | Part::File(name) => name,
        }
    }
}

/// What every VM test needs: qemu and qemu-img, mmdebstrap for Debian images, ssh.
pub const VM_PARTS: &[Part] = &[
    Part::Program("qemu-system-x86_64"),
    Part::Program("qemu-img"),
    Part::Program("mmdebstrap"),
    Part::Program("ssh"),
    Part::Program("ssh-keygen"),
];

/// ansible-core's venv, made by `scripts/setup.sh` (see `project::ANSIBLE_BIN`).
pub const ANSIBLE: Part = Part::File("/opt/farm-ansible/bin/ansible-playbook");

/// Whether `test` can run: true when every part is present. Otherwise it fails under
/// `CI=true` and is skipped (loudly, and counted) elsewhere.
pub fn require(test: &str, parts: &[Part]) -> bool {
    let missing: Vec<&str> = parts
        .iter()
        .filter(|p| !p.present())
        .map(|p| p.name())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if in_ci() {
        panic!("{test}: missing {missing:?} under CI=true; run ./scripts/setup.sh");
    }
    record_skip(test, &missing);
    false
}

/// [`require`] with [`VM_PARTS`] and `more`.
pub fn require_vm(test: &str, more: &[Part]) -> bool {
    let parts: Vec<Part> = VM_PARTS.iter().chain(more).copied().collect();
    require(test, &parts)
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The run's skip list: `FARM_TEST_SKIPS` (set by `scripts/test.sh`), else a file in the
/// target directory.
fn skip_list() -> PathBuf {
    std::env::var_os("FARM_TEST_SKIPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests"))
}

static SKIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn record_skip(test: &str, missing: &[&str]) {
    let line = format!(
        "SKIPPED {test}: missing {} (run ./scripts/setup.sh)",
        missing.join(", ")
    );
    // The real stderr, not `eprintln!`: libtest captures that and shows it only on failure.
    let _ = writeln!(std::io::stderr(), "{line}");
    if let Ok(mut list) = fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skip_list())
    {
        let _ = writeln!(list, "{line}");
    }
    let mut skipped = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    if skipped.is_empty() {
        // SAFETY: registers a plain `extern "C"` function with no captured state.
        unsafe { libc::atexit(print_skipped_at_exit) };
    }
    skipped.push(test.to_string());
}

/// Runs when the test binary exits, after libtest's summary: how many tests it skipped.
extern "C" fn print_skipped_at_exit() {
    let skipped = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    let _ = writeln!(
        std::io::stderr(),
        "\n{} test(s) SKIPPED for missing parts: {}\n(run ./scripts/setup.sh; under CI=true they fail)",
        skipped.len(),
        skipped.join(", ")
    );
}
