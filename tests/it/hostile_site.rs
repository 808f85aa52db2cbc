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

/// What no message of farm's may carry from a hostile site: what a user could paste and run,
/// and the escape character that starts terminal control sequences.
const NEVER_REPEATED: [&str; 5] = ["$(touch", "${IFS}", "../../", "`touch", "\u{1b}"];

/// A project whose VM `far` runs on the site `lab` (its farm root in `root`), before the
/// site's sshd starts, and the canary path a command the site wrote would create.
struct Setup {
    dir: tempfile::TempDir,
    root: std::path::PathBuf,
    port: u16,
    p: Project,
    key: crate::support::guest::Key,
    canary: std::path::PathBuf,
}

impl Setup {
    fn new(test: &str) -> Option<Setup> {
        if !crate::support::skip::require_vm(test, &[]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("farm-root");
        let port = farm::sys::hostinfo::free_local_port().unwrap();
        let p = Project::with_store(
            &site_toml(port, &root),
            &crate::support::test_home::shared_store(),
        );
        let key = keygen(p.path(), "lab_key");
        let canary = std::env::temp_dir().join(format!("farm-canary-{}", nonce()));
        Some(Setup {
            dir,
            root,
            port,
            p,
            key,
            canary,
        })
    }

    /// Starts the site: a real sshd on 127.0.0.1 that lets the project's key in and runs
    /// every command it is given through `wrapper` (a shell script's body, with the command
    /// in `$SSH_ORIGINAL_COMMAND`), as a root that rewrites farm's commands or their answers
    /// would; the project trusts its host key.
    fn serve(&self, wrapper: &str) -> Sshd {
        let path = self.dir.path().join("hostile.sh");
        fs_err::write(&path, format!("#!/bin/sh\n{wrapper}")).unwrap();
        std::process::Command::new("chmod")
            .args(["+x"])
            .arg(&path)
            .status()
            .unwrap();
        let server = Sshd::start(
            self.dir.path(),
            self.port,
            &format!("command=\"{}\" {}", path.display(), self.key.public),
        );
        self.p.write("lab_known_hosts", &server.known_hosts_line());
        server
    }

    /// Fails the test if anything created a path named by the canary (but `-keep`).
    fn assert_nothing_ran(&self) {
        let name = self
            .canary
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let ran: Vec<String> = crate::support::project::list(&std::env::temp_dir())
            .into_iter()
            .filter(|n| n.starts_with(&name) && !n.ends_with("-keep"))
            .collect();
        assert!(ran.is_empty(), "farm ran what the site wrote: {ran:?}");
    }
}

#[test]
fn crafted_observation_answers_run_nothing_and_write_nowhere() {
    let Some(setup) = Setup::new("crafted_observation_answers_run_nothing_and_write_nowhere")
    else {
        return;
    };
    let Setup { dir, p, canary, .. } = &setup;
    // A directory no command of farm's may touch, named by the site through `../`.
    let keep = std::env::temp_dir().join(format!(
        "{}-keep",
        canary.file_name().unwrap().to_string_lossy()
    ));
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
    let server = setup.serve(&format!(
        "case \"$SSH_ORIGINAL_COMMAND\" in\n\
               *FARM_PROJECT=*) sh -c \"$SSH_ORIGINAL_COMMAND\"; cat '{}' ;;\n\
               *) exec sh -c \"$SSH_ORIGINAL_COMMAND\" ;;\n\
             esac\n",
        crafted.display()
    ));

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
        for crafted in NEVER_REPEATED {
            assert!(
                !said.contains(crafted),
                "farm {args:?} repeats `{crafted}`:\n{said}"
            );
        }
    }

    setup.assert_nothing_ran();
    assert!(
        keep.join("file").exists(),
        "a `../` name from the site reached `{}`",
        keep.display()
    );
    let _ = fs_err::remove_dir_all(&keep);
    drop(server);
}

/// The site lies about its store, the two ways it can (issue 31): every layer farm pushes
/// reads back wrong (its `b3sum` says so, and it names entries farm never sent, in
/// terminal escapes), then it claims to hold layers it does not have (its `[ -e …/meta.json ]`
/// tests always succeed). Each time `farm up` fails saying what the site did, runs nothing the
/// site wrote and takes nothing from it into L0's store; once the site is honest, the same
/// `farm up` converges: the layers are pushed, checked on arrival and the VM answers ssh.
#[test]
fn a_site_that_lies_about_its_store_gets_a_clear_refusal_and_nothing_runs() {
    let Some(setup) =
        Setup::new("a_site_that_lies_about_its_store_gets_a_clear_refusal_and_nothing_runs")
    else {
        return;
    };
    let Setup {
        dir,
        root,
        p,
        canary,
        ..
    } = &setup;
    let lies = dir.path().join("lies");
    fs_err::create_dir_all(&lies).unwrap();
    let fake_bin = dir.path().join("fake-bin");
    fs_err::create_dir_all(&fake_bin).unwrap();
    // A b3sum whose every check fails, with a line of its own.
    fs_err::write(
        fake_bin.join("b3sum"),
        format!(
            "#!/bin/sh\nwhile read -r sum path; do echo \"$path: FAILED\"; done\n\
             printf '%s\\033]0;pwned\\007\\n' 'junk $(touch {canary}-b3sum)'\nexit 1\n",
            canary = canary.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x"])
        .arg(fake_bin.join("b3sum"))
        .status()
        .unwrap();
    let server = setup.serve(&format!(
        "lies={lies}\n\
             cmd=$SSH_ORIGINAL_COMMAND\n\
             if [ -e $lies/hashes ]; then\n\
               case \"$cmd\" in *b3sum*)\n\
                 PATH={fake_bin}:$PATH sh -c \"$cmd\"; rc=$?\n\
                 printf 'rejected $(touch {canary}-rejected)\\nrejected ../../etc\\n\\033[2J\\n'\n\
                 exit $rc ;;\n\
               esac\n\
             fi\n\
             if [ -e $lies/present ]; then\n\
               cmd=$(printf '%s' \"$cmd\" | sed 's|\\[ -e \\([^]]*\\)/meta.json \\]|true|g')\n\
             fi\n\
             exec sh -c \"$cmd\"\n",
        lies = lies.display(),
        fake_bin = fake_bin.display(),
        canary = canary.display(),
    ));
    p.ok(&["build", "small"]);
    let layer = p.entry("small").join("meta.json");
    let layer_meta = fs_err::read(&layer).unwrap();
    let site_entries = || crate::support::project::list(&root.join("cache/store"));
    let refused = |what: &str, expected: &str| {
        let out = p.run(&["up", "--boot-timeout", "300"]);
        let said = text(&out);
        eprintln!("farm up, {what}:\n{said}");
        assert!(!out.status.success(), "{what}: farm up succeeded:\n{said}");
        assert!(
            said.contains(expected),
            "{what}: expected `{expected}`:\n{said}"
        );
        assert!(!said.contains("panicked"), "{what}:\n{said}");
        for crafted in NEVER_REPEATED {
            assert!(
                !said.contains(crafted),
                "{what}: farm repeats `{crafted}`:\n{said}"
            );
        }
    };

    // Every push reads back wrong: farm sends it three times, then says so, and the site's
    // store gets nothing.
    fs_err::write(lies.join("hashes"), "").unwrap();
    refused("every layer reads back wrong", "corrupted 3 times in a row");
    assert!(site_entries().is_empty(), "{:?}", site_entries());
    fs_err::remove_file(lies.join("hashes")).unwrap();

    // The site claims every layer: nothing is pushed, and the VM cannot start on it.
    fs_err::write(lies.join("present"), "").unwrap();
    refused("the site claims layers it lacks", "far");
    fs_err::remove_file(lies.join("present")).unwrap();

    // Honest again: the same command converges.
    let out = p.run(&["up", "--boot-timeout", "300"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!site_entries().is_empty());
    let hello = p.ok(&["ssh", "far", "--", "echo", "hello-from-far"]);
    assert!(crate::support::project::stdout(&hello).contains("hello-from-far"));
    p.ok(&["down"]);

    setup.assert_nothing_ran();
    assert_eq!(
        fs_err::read(&layer).unwrap(),
        layer_meta,
        "L0's layer changed"
    );
    drop(server);
}
