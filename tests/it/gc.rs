//! `farm gc` through the real binary on a real store shared by several projects: it keeps
//! exactly what is live (this farm.toml, another project, a `--keep`, a running qemu's
//! backing chain) and removes the rest, leftovers included.

use crate::support::entries;
use crate::support::project;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use project::{Project, text};

/// A blank qcow2 of `megabytes` MiB at `path`: images of different sizes are different
/// derivations, and a platform without steps on one is an empty layer (no VM needed).
fn blank(path: &Path, megabytes: u32) {
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(format!("{megabytes}M"))
        .status()
        .expect("qemu-img (scripts/setup.sh installs it)");
    assert!(status.success());
}

/// A farm.toml with, for each `(name, megabytes)`, an image `<name>_img` and a platform
/// `<name>` on it; the images are created in the project.
fn lab(project: &Project, images: &[(&str, u32)]) {
    let mut toml = String::from("[targets.amd64]\narch = \"x86_64\"\n");
    for (name, megabytes) in images {
        blank(&project.path().join(format!("{name}.qcow2")), *megabytes);
        toml.push_str(&format!(
            "[images.{name}_img]\npath = \"{name}.qcow2\"\n[platforms.{name}]\nfrom = \"{name}_img\"\n"
        ));
    }
    project.write("farm.toml", &toml);
}

/// Entry labels in the store (`a_img`, `a_amd64`, …), sorted.
fn labels(store: &Path) -> Vec<String> {
    let mut names: Vec<String> = project::list(&store.join("store"))
        .into_iter()
        .map(|dir| dir.split_once('-').unwrap().1.to_string())
        .collect();
    names.sort();
    names
}

/// A qemu that holds `disk` (and so its whole backing chain) open, as a running VM does.
struct Holder(Child);

impl Holder {
    fn start(disk: &Path, store: &Path) -> Holder {
        let blockdev = format!(
            r#"{{"driver":"qcow2","node-name":"d","read-only":true,"file":{{"driver":"file","filename":"{}"}}}}"#,
            disk.display()
        );
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "none", "-display", "none", "-S", "-nodefaults"])
            .args(["-blockdev", &blockdev])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64 (scripts/setup.sh installs it)");
        let holder = Holder(child);
        let fd_dir = format!("/proc/{}/fd", holder.0.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let holds = fs_err::read_dir(&fd_dir)
                .map(|fds| {
                    fds.flatten()
                        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                        .any(|target| target.starts_with(store))
                })
                .unwrap_or(false);
            if holds {
                return holder;
            }
            assert!(
                Instant::now() < deadline,
                "qemu never opened `{}`",
                disk.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn gc_keeps_exactly_what_is_live_and_removes_the_rest_with_leftovers() {
    let shared = tempfile::tempdir().unwrap();
    let store = shared.path().join("cache");

    // Project A built five labs; its farm.toml now wants only `a`.
    let a = Project::with_store("", &store);
    lab(&a, &[("a", 16), ("old", 17), ("kept", 18), ("held", 19)]);
    a.ok(&["build"]);
    lab(&a, &[("a", 16)]);
    // Project B shares the store; project C did too, and is gone.
    let b = Project::with_store("", &store);
    lab(&b, &[("b", 20)]);
    b.ok(&["build"]);
    let c = Project::with_store("", &store);
    lab(&c, &[("c", 21)]);
    c.ok(&["build"]);
    drop(c);

    // A running qemu on an overlay of `held_amd64`, which no farm.toml wants.
    let scratch = tempfile::tempdir().unwrap();
    let overlay = scratch.path().join("vm.qcow2");
    let held_layer = project::list(&store.join("store"))
        .into_iter()
        .find(|d| d.ends_with("-held_amd64"))
        .unwrap();
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(store.join("store").join(&held_layer).join("disk.qcow2"))
        .arg(&overlay)
        .status()
        .unwrap();
    assert!(status.success());
    let _vm = Holder::start(&overlay, &store);

    // Leftovers: a dead build's staging directory, a download abandoned a month ago.
    let stale_staging = store
        .join("tmp")
        .join(format!("{}-x.999999.dead", "f".repeat(32)));
    fs_err::create_dir_all(&stale_staging).unwrap();
    fs_err::write(stale_staging.join("disk.qcow2"), vec![0u8; 1 << 20]).unwrap();
    let stale_partial = store
        .join("partial")
        .join(format!("{}.part", "e".repeat(32)));
    fs_err::write(&stale_partial, vec![1u8; 1 << 20]).unwrap();
    let month_ago = SystemTime::now() - Duration::from_secs(30 * 86_400);
    fs_err::File::options()
        .write(true)
        .open(&stale_partial)
        .unwrap()
        .set_modified(month_ago)
        .unwrap();

    let everything = labels(&store);
    assert_eq!(everything.len(), 12, "{everything:?}");

    // A dry run says what would go and removes nothing.
    let dry = a.ok(&["gc", "--dry-run", "--keep", "kept_img"]);
    let said = text(&dry);
    assert!(said.contains("would remove"), "{said}");
    assert!(said.contains("wanted by this farm.toml"), "{said}");
    assert_eq!(labels(&store), everything, "a dry run removes nothing");
    assert!(stale_staging.exists() && stale_partial.exists());

    let out = a.ok(&["gc", "--keep", "kept_img"]);
    let said = text(&out);
    assert_eq!(
        labels(&store),
        vec![
            "a_amd64",
            "a_img",
            "b_amd64",
            "b_img",
            "held_amd64",
            "held_img",
            "kept_img"
        ],
        "{said}"
    );
    assert!(!stale_staging.exists(), "{said}");
    assert!(!stale_partial.exists(), "{said}");
    assert!(said.contains("freed"), "{said}");
    assert!(said.contains("1 gc roots of gone projects"), "{said}");
    // What stays is whole, and B still finds everything it built.
    a.ok(&["store", "verify"]);
    let again = b.ok(&["build"]);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("are cached"),
        "{}",
        text(&again)
    );
    // A second gc has nothing left to do.
    let second = a.ok(&["gc", "--keep", "kept_img"]);
    assert!(
        text(&second).contains("freed 0 B in 0 entries"),
        "{}",
        text(&second)
    );
}

#[test]
fn gc_with_an_unknown_keep_name_exits_2_and_removes_nothing() {
    let shared = tempfile::tempdir().unwrap();
    let store = shared.path().join("cache");
    let a = Project::with_store("", &store);
    lab(&a, &[("a", 16), ("old", 17)]);
    a.ok(&["build"]);
    lab(&a, &[("a", 16)]);
    let before = labels(&store);
    let out = a.run(&["gc", "--keep", "nothing-like-this"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("hint:"), "{}", text(&out));
    assert_eq!(labels(&store), before);
}

/// The appliance a project's chroot builds run in stays while the project has one: making
/// it again needs the Debian mirror, which an offline lab may not reach.
#[test]
fn gc_keeps_the_appliance_of_a_projects_chroot_builds() {
    let shared = tempfile::tempdir().unwrap();
    let store_dir = shared.path().join("cache");
    let p = Project::with_store("", &store_dir);
    lab(&p, &[("a", 16)]);
    p.ok(&["build"]);
    entries::commit_appliance(&farm::store::Store::open(&store_dir).unwrap());

    // A platform built in a chroot: its appliance is wanted.
    let toml = fs_err::read_to_string(p.path().join("farm.toml")).unwrap();
    p.write(
        "farm.toml",
        &toml.replace(
            "[platforms.a]\nfrom = \"a_img\"\n",
            "[platforms.a]\nfrom = \"a_img\"\nbuilder = \"chroot\"\n",
        ),
    );
    let dry = text(&p.ok(&["gc", "--dry-run"]));
    assert!(
        dry.contains("-farm-appliance-amd64: wanted by this farm.toml"),
        "{dry}"
    );
    p.ok(&["gc"]);
    assert!(labels(&store_dir).contains(&"farm-appliance-amd64".to_string()));
    // No chroot build left: it goes like any unwanted entry.
    p.write("farm.toml", &toml);
    p.ok(&["gc"]);
    assert!(!labels(&store_dir).contains(&"farm-appliance-amd64".to_string()));
}
