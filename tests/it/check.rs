//! `farm check` and the commands that only read, through the real binary: bad input exits 2
//! with the file, line and a hint, and leaves every file as it was.

use crate::support::project;

use std::process::Stdio;

use project::{Project, list, stderr, text};

const IMAGE: &str = "[images.deb]\nurl = \"http://127.0.0.1:9/deb.qcow2\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n";

/// What `ssh-keygen` writes: a private key must never be accepted as an authorized key.
const PRIVATE_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n-----END OPENSSH PRIVATE KEY-----\n";

#[test]
fn a_private_key_fails_check_with_exit_2_its_line_and_a_hint_and_nothing_is_written() {
    let project = Project::new(&format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\nauthorized_keys = {{ root = [\"keys/id\"] }}\n"
    ));
    project.write("keys/id", PRIVATE_KEY);
    let before = list(project.path());

    for command in [&["check"][..], &["build"], &["up"], &["build", "--dry-run"]] {
        let out = project.run(command);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {}", text(&out));
        let err = stderr(&out);
        assert!(err.contains("`keys/id` is a private key"), "{err}");
        assert!(err.contains("farm.toml:7:"), "{err}");
        assert!(
            err.contains("hint: `authorized_keys` takes public keys"),
            "{err}"
        );
    }
    assert_eq!(list(project.path()), before, "bad input changes no file");
}

#[test]
fn a_missing_identity_file_fails_check_naming_the_host() {
    let project = Project::new(&format!(
        "{IMAGE}\n[hosts.lab]\naddress = \"root@192.0.2.1\"\nidentity_file = \"~/.ssh/farm_lab_does_not_exist\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nhost = \"lab\"\n"
    ));
    let out = project.run(&["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "The identity_file `~/.ssh/farm_lab_does_not_exist` of host `lab` does not exist"
        ),
        "{err}"
    );
    assert!(err.contains("farm.toml:7:"), "{err}");
}

#[test]
fn a_byte_that_is_not_utf8_is_one_error_at_its_line_and_column() {
    let project = Project::new("");
    let mut bytes = format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n").into_bytes();
    bytes.extend_from_slice(b"packages = [\"vim\", \"caf\xc3\x28\"]\n");
    fs_err::write(project.path().join("farm.toml"), &bytes).unwrap();
    let out = project.run(&["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("farm.toml:7:24"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(err.contains("hint: save the file as UTF-8"), "{err}");
}

#[test]
fn without_targets_platforms_are_built_for_this_machine_and_show_finds_them() {
    let project = Project::new(&format!("{IMAGE}\n[platforms.child]\nfrom = \"deb\"\n"));
    let check = project.ok(&["check"]);
    let target = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(said.contains("1 platform, 1 target"), "{said}");
    assert!(
        said.contains(&format!("targets: none declared, so `{target}`")),
        "check says which target it assumed: {said}"
    );
    let show = project.ok(&["show", "child"]);
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(shown.contains(&format!("name: child_{target}")), "{shown}");
    let plan = project.ok(&["build", "--dry-run"]);
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains(&format!("child_{target}")),
        "{}",
        text(&plan)
    );
    assert!(
        !project.path().join("cache").exists(),
        "a dry run makes no store"
    );
}

#[test]
fn a_printing_command_whose_reader_goes_away_ends_without_a_panic() {
    let project = Project::new(&format!("{IMAGE}\n[platforms.child]\nfrom = \"deb\"\n"));
    let mut child = project
        .farm(&["show", "child"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before farm writes: its first `println!` meets a closed pipe.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn store_commands_never_create_a_store() {
    let project = Project::new(IMAGE);
    let typo = project.path().join("cahce");
    let out = project
        .farm(&["store", "verify"])
        .arg("--store")
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("There is no store at"),
        "{}",
        text(&out)
    );
    assert!(
        stderr(&out).contains("hint: check --store"),
        "{}",
        text(&out)
    );
    assert!(!typo.exists(), "a mistyped --store is not created");

    project.write("a-file", "not a store\n");
    for command in [["store", "verify"], ["store", "ls"]] {
        let out = project
            .farm(&command)
            .arg("--store")
            .arg(project.path().join("a-file"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let err = stderr(&out);
        assert!(
            err.contains("a-file") && !err.contains("os error 17"),
            "{err}"
        );
    }
}

#[test]
fn an_unknown_init_and_a_missing_vm_playbook_fail_check_with_their_lines() {
    let project = Project::new(
        "[images.x]\ndebian = { suite = \"bookworm\", init = \"openrc\" }\n[targets.amd64]\narch = \"x86_64\"\n[platforms.p]\nfrom = \"x\"\n[vms.v]\nplatform = \"p\"\nplaybook = \"missing.yml\"\n",
    );
    let out = project.run(&["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("Unknown variant `openrc`, expected `systemd` or `busybox`")
            && err.contains("farm.toml:2:"),
        "{err}"
    );

    project.write(
        "farm.toml",
        "[images.x]\ndebian = { suite = \"bookworm\", init = \"busybox\" }\n[targets.amd64]\narch = \"x86_64\"\n[platforms.p]\nfrom = \"x\"\n[vms.v]\nplatform = \"p\"\nplaybook = \"missing.yml\"\n",
    );
    let before = list(project.path());
    for command in [&["check"][..], &["up"]] {
        let out = project.run(command);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {}", text(&out));
        let err = stderr(&out);
        assert!(
            err.contains("Cannot read `missing.yml`") && err.contains("farm.toml:9:"),
            "{err}"
        );
    }
    assert_eq!(list(project.path()), before, "bad input changes no file");
}

#[test]
fn a_farm_toml_that_is_a_directory_says_why_once_with_exit_2() {
    let project = Project::new("");
    fs_err::remove_file(project.path().join("farm.toml")).unwrap();
    fs_err::create_dir(project.path().join("farm.toml")).unwrap();
    let out = project.run(&["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("Cannot read `farm.toml`"), "{err}");
    assert_eq!(
        err.matches("Is a directory").count(),
        1,
        "each cause is said once:\n{err}"
    );
}
