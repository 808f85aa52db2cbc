//! What farm.toml refers to on this machine, checked before anything runs: every
//! `authorized_keys` file holds public keys (never a private one), and a remote host's
//! `identity_file` and `known_hosts` exist.

use std::path::{Path, PathBuf};

use crate::model::config::Config;
use crate::model::config::diagnostic::Diagnostic;
use crate::model::config::limits;

/// Problems with the files farm.toml names; `home` expands `~/`.
pub fn check_referenced(
    config: &Config,
    project_dir: &Path,
    home: Option<&Path>,
) -> Vec<Diagnostic> {
    let mut problems = Vec::new();
    for platform in config.platforms.values() {
        for grant in &platform.steps.authorized_keys {
            let path = &grant.key_file.value;
            // Unreadable files are reported where inputs are hashed.
            let Ok(bytes) = fs_err::read(path) else {
                continue;
            };
            let text = String::from_utf8_lossy(&bytes);
            if let Err(refusal) = limits::public_keys(&path.display().to_string(), &text) {
                problems.push(
                    Diagnostic::new(refusal.message, grant.key_file.at.clone()).hint(refusal.hint),
                );
            }
        }
    }
    let resolve = |written: &str| -> PathBuf {
        match (written.strip_prefix("~/"), home) {
            (Some(rest), Some(home)) => home.join(rest),
            _ => project_dir.join(written),
        }
    };
    for test in config.tests.values() {
        if !test.script.value.is_file() {
            problems.push(
                Diagnostic::new(
                    format!(
                        "The script `{}` of test `{}` does not exist",
                        test.script.value.display(),
                        test.name.value
                    ),
                    test.script.at.clone(),
                )
                .hint("`script` is a path relative to farm.toml's directory"),
            );
        }
    }
    for host in config.hosts.values() {
        for (what, file) in [
            ("identity_file", &host.identity_file),
            ("known_hosts", &host.known_hosts),
        ] {
            let Some(file) = file else { continue };
            if !resolve(&file.value).is_file() {
                problems.push(
                    Diagnostic::new(
                        format!(
                            "The {what} `{}` of host `{}` does not exist",
                            file.value, host.name.value
                        ),
                        file.at.clone(),
                    )
                    .hint(match what {
                        "identity_file" => "give the private key you log in to the host with (relative to farm.toml; `~/` is your home), or leave it out to use ssh's defaults",
                        _ => "give a file with the host's key (`ssh-keyscan HOST > FILE`), or leave it out to use your own known_hosts",
                    }),
                );
            }
        }
    }
    problems
}
