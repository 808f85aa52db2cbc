//! farm in a mount namespace of its own, its store remounted there first (read-only, or a
//! small tmpfs): the kernel then refuses writes as a read-only or full filesystem does,
//! and nothing outside the namespace sees the mount.

use std::process::{Command, Output};

use super::project::Project;

/// Whether this machine lets a test make mount namespaces (root does; CI runs as root).
/// Outside CI a machine without them skips, saying so; under CI it is a failure.
pub fn available(test: &str) -> bool {
    let ok = Command::new("unshare")
        .args(["--mount", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "{test}: CI runs as root, with unshare"
        );
        eprintln!("{test}: skipped, no mount namespaces here");
    }
    ok
}

/// How the store is mounted for the command.
pub enum StoreMount {
    /// Bind-mounted onto itself, read-only.
    ReadOnly,
    /// An empty tmpfs of this many MiB over it.
    Tmpfs { mib: u64 },
}

/// `farm ARGS` in `project`, in a mount namespace where its store is mounted as `mount` says.
pub fn farm(project: &Project, mount: StoreMount, args: &[&str]) -> Output {
    let store = project.store.display().to_string();
    let setup = match mount {
        StoreMount::ReadOnly => {
            format!("mount --bind '{store}' '{store}' && mount -o remount,bind,ro '{store}'")
        }
        StoreMount::Tmpfs { mib } => {
            format!("mkdir -p '{store}' && mount -t tmpfs -o size={mib}m tmpfs '{store}'")
        }
    };
    let mut script = format!("{setup} && exec '{}'", env!("CARGO_BIN_EXE_farm"));
    for arg in args {
        script.push_str(&format!(" '{arg}'"));
    }
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .current_dir(project.path())
        .env("FARM_STORE", &project.store)
        .output()
        .unwrap()
}
