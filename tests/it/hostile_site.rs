//! A hypervisor site whose root is hostile (issue 31): its answers to farm's observation are
//! crafted (shell metacharacters in names and paths, `../` in entry names, records that lie,
//! oversized and cut-off output). The site is a real OpenSSH server on 127.0.0.1 whose key
//! runs every command through a wrapper: it runs farm's command for real, then, for the
//! observation script, adds the crafted lines. farm must report and go on or refuse, never
//! run what the site wrote, and never write outside its own directories.

use std::path::Path;

use crate::support::guest::keygen;
use crate::support::project::{Project, nonce, text};
use crate::support::sshd::Sshd;

fn site_toml(port: u16, root: &Path) -> String {
    format!(
        r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.small]
from = "tiny"
memory = "256M"

[hosts.lab]
address = "root@127.0.0.1:{port}"
identity_file = "lab_key"
known_hosts = "lab_known_hosts"
root = "{root}"

[vms.far]
platform = "small"
host = "lab"
"#,
        root = root.display()
    )
}

/// Lines a hostile root adds to what the observation script printed. `CANARY` becomes a
/// path that exists only if something ran a command the site wrote.
const CRAFTED: &str = r#"missing $(touch CANARY-missing)
vm far;touch${IFS}CANARY-vm 4242
vm ../../../../../../../..KEEP 77
record far {"format":2,"spec":{"name":"$(touch CANARY-record)","paths":{"dir":"/etc"}}}
record ../../x {not json
entry ../../../../../../../..KEEP
entry `touch CANARY-entry2`
netpid lab tap $(touch CANARY-netpid)
listen 0100007F:ZZZZ
arch x86_64; touch CANARY-arch
/proc/1/environ:FARM_PROJECT=PROJECT/proc/1/environ:FARM_PROCESS=vm:far
"#;

#[test]
fn crafted_observation_answers_run_nothing_and_write_nowhere() {
    let test = "crafted_observation_answers_run_nothing_and_write_nowhere";
    if !crate::support::skip::require_vm(test, &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("farm-root");
    let port = farm::sys::hostinfo::free_local_port().unwrap();
    let p = Project::with_store(
        &site_toml(port, &root),
        &crate::support::test_home::shared_store(),
    );
    let key = keygen(p.path(), "lab_key");
    let canary_name = format!("farm-canary-{}", nonce());
    let canary = std::env::temp_dir().join(&canary_name);
    // A directory no command of farm's may touch, named by the site through `../`.
    let keep = std::env::temp_dir().join(format!("{canary_name}-keep"));
    fs_err::create_dir_all(&keep).unwrap();
    fs_err::write(keep.join("file"), "keep").unwrap();
    let crafted = dir.path().join("crafted");
    let project_tag = p.path().join(".farm").display().to_string();
    fs_err::write(
        &crafted,
        CRAFTED
            .replace("KEEP", &keep.display().to_string())
            .replace("CANARY", &canary.display().to_string())
            .replace("PROJECT", &project_tag)
            .replace(
                "/proc/1/environ:FARM_PROCESS",
                "\0/proc/1/environ:FARM_PROCESS",
            )
            + &"x".repeat(4 << 20)
            + "\nvm cut-off-mid",
    )
    .unwrap();
    let wrapper = dir.path().join("hostile.sh");
    fs_err::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             case \"$SSH_ORIGINAL_COMMAND\" in\n\
               *FARM_PROJECT=*) sh -c \"$SSH_ORIGINAL_COMMAND\"; cat '{}' ;;\n\
               *) exec sh -c \"$SSH_ORIGINAL_COMMAND\" ;;\n\
             esac\n",
            crafted.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x"])
        .arg(&wrapper)
        .status()
        .unwrap();
    let server = Sshd::start(
        dir.path(),
        port,
        &format!("command=\"{}\" {}", wrapper.display(), key.public),
    );
    p.write("lab_known_hosts", &server.known_hosts_line());

    for args in [vec!["status"], vec!["up", "--dry-run"], vec!["down"]] {
        let out = p.run(&args);
        let said = text(&out);
        eprintln!(
            "farm {args:?}: {:?}\n{said}\nkeep there: {}",
            out.status,
            keep.join("file").exists()
        );
        // Whatever farm decides, it decides in words, not a panic.
        assert!(!said.contains("panicked"), "farm {args:?}:\n{said}");
        assert!(
            out.status.code().is_some(),
            "farm {args:?} was killed:\n{said}"
        );
        assert!(
            !said.contains("Cannot reach host"),
            "farm {args:?}:\n{said}"
        );
        // Nor does it repeat the site's names in messages or hints a user might paste.
        for crafted in ["$(touch", "${IFS}", "../../", "`touch"] {
            assert!(
                !said.contains(crafted),
                "farm {args:?} repeats `{crafted}`:\n{said}"
            );
        }
    }

    let ran: Vec<String> = crate::support::project::list(&std::env::temp_dir())
        .into_iter()
        .filter(|name| name.starts_with(&canary_name) && !name.ends_with("-keep"))
        .collect();
    assert!(ran.is_empty(), "farm ran what the site wrote: {ran:?}");
    assert!(
        keep.join("file").exists(),
        "a `../` name from the site reached `{}`",
        keep.display()
    );
    let _ = fs_err::remove_dir_all(&keep);
    drop(server);
}
