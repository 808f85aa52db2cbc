//! The tests' file fixtures are shared safely (`support::fixture`): two test processes that
//! want one at the same moment build it once, a changed recipe is built anew beside the old
//! one, and a kept fixture whose bytes changed is built again. The processes are this test
//! binary itself, running the ignored helper below, as nextest runs any test: in a process of
//! its own.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::fixture::file_fixture;
use crate::support::project::text;

/// Each build of the counting fixture adds a line here (in the test home).
const BUILDS: &str = "builds";

/// Not a test: the process the test below starts, twice at once. It wants the counting
/// fixture of the recipe in `FARM_TEST_RECIPE` and says where it is.
#[test]
#[ignore = "started by two_processes_at_once_build_a_fixture_once_and_a_changed_one_anew"]
fn want_the_counting_fixture() {
    let recipe = std::env::var("FARM_TEST_RECIPE").expect("FARM_TEST_RECIPE");
    let home = crate::support::test_home::test_home();
    let key = blake3::hash(recipe.as_bytes()).to_hex();
    let fixture = file_fixture("counting", &key[..16], "txt", |path, _log| {
        let mut builds = fs_err::read_to_string(home.join(BUILDS)).unwrap_or_default();
        builds.push_str(&format!("{}\n", std::process::id()));
        fs_err::write(home.join(BUILDS), builds).unwrap();
        // Long enough that the other process asks while this one builds.
        std::thread::sleep(Duration::from_secs(1));
        fs_err::write(path, &recipe).unwrap();
    });
    println!("fixture at {}", fixture.path.display());
}

fn want(home: &Path, recipe: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "fixtures::want_the_counting_fixture",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("FARM_TEST_HOME", home)
        .env("FARM_TEST_RECIPE", recipe)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Where the helper said its fixture is.
fn fixture_path(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(out));
    let said = String::from_utf8_lossy(&out.stdout);
    said.lines()
        .find_map(|l| l.strip_prefix("fixture at "))
        .unwrap_or_else(|| panic!("no fixture path in:\n{}", text(out)))
        .to_string()
}

fn builds(home: &Path) -> usize {
    fs_err::read_to_string(home.join(BUILDS))
        .unwrap_or_default()
        .lines()
        .count()
}

#[test]
fn two_processes_at_once_build_a_fixture_once_and_a_changed_one_anew() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();

    let (a, b) = (want(home, "one"), want(home, "one"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let one = fixture_path(&a);
    assert_eq!(fixture_path(&b), one);
    assert_eq!(builds(home), 1, "two processes built it");
    assert_eq!(fs_err::read_to_string(&one).unwrap(), "one");

    // A changed recipe: another fixture, built; the first one stays.
    let two = fixture_path(&want(home, "two").wait_with_output().unwrap());
    assert_ne!(two, one);
    assert_eq!(builds(home), 2);
    assert_eq!(fs_err::read_to_string(&two).unwrap(), "two");
    assert_eq!(fs_err::read_to_string(&one).unwrap(), "one");

    // Kept but changed since it was built (a disk a test wrote to, a bit gone bad): built
    // again, not used.
    fs_err::write(&one, "tampered").unwrap();
    let again = want(home, "one").wait_with_output().unwrap();
    assert_eq!(fixture_path(&again), one);
    assert!(text(&again).contains("is not what was built; building it again"));
    assert_eq!(builds(home), 3);
    assert_eq!(fs_err::read_to_string(&one).unwrap(), "one");

    // Unchanged: used as it is.
    let kept = fixture_path(&want(home, "two").wait_with_output().unwrap());
    assert_eq!(kept, two);
    assert_eq!(builds(home), 3);
}
