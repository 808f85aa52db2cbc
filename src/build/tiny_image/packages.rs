//! The tiny image's packages: the current cloud kernel's version, each package's candidate,
//! and the `.deb`s downloaded with `apt-get download` into the store's cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use super::TinyImageError;
use crate::build::tools::ToolRunner;
use crate::model::tiny_recipe::KERNEL_META_PACKAGE;

/// The versioned kernel `linux-image-cloud-amd64` points at (`6.1.0-28-cloud-amd64`), so the
/// image follows Debian's security updates. Runs `apt-get update` once if apt knows nothing.
pub(super) fn current_kernel(log: &ToolRunner) -> Result<String, TinyImageError> {
    let parse = |out: &str| {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .map(str::trim)
            .find(|v| v.ends_with("-cloud-amd64"))
            .map(str::to_string)
    };
    let depends = || {
        log.tool("apt-cache")
            .args(["depends", KERNEL_META_PACKAGE])
            .hint(apt_hint)
            .run()
    };
    if let Ok(out) = depends()
        && let Some(version) = parse(&out)
    {
        return Ok(version);
    }
    apt_update(log)?;
    let out = depends()?;
    parse(&out).ok_or(TinyImageError::NoCandidate {
        package: KERNEL_META_PACKAGE.into(),
    })
}

fn apt_update(log: &ToolRunner) -> Result<(), TinyImageError> {
    log.tool("apt-get")
        .args(["update"])
        .hint(|| "check that the Debian mirror in /etc/apt/sources.list is reachable".into())
        .run()?;
    Ok(())
}

fn apt_hint() -> String {
    "run `apt-get update` and check the mirror in /etc/apt/sources.list".into()
}

/// `name_version_arch.deb` as `apt-get download` names it (the epoch's `:` as `%3a`).
pub fn deb_file_name(package: &str, version: &str, arch: &str) -> String {
    format!("{package}_{}_{arch}.deb", version.replace(':', "%3a"))
}

/// The candidate `(version, architecture)` of each package, from one `apt-cache show`.
fn candidates(
    log: &ToolRunner,
    packages: &[String],
) -> Result<BTreeMap<String, (String, String)>, TinyImageError> {
    let out = log
        .tool("apt-cache")
        .args(["show", "--no-all-versions"])
        .args(packages)
        .hint(apt_hint)
        .run()?;
    let mut found = BTreeMap::new();
    for stanza in out.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        if let (Some(p), Some(v), Some(a)) =
            (field("Package:"), field("Version:"), field("Architecture:"))
        {
            found.entry(p).or_insert((v, a));
        }
    }
    Ok(found)
}

/// The `.deb` of every package's candidate version, downloaded into `cache_dir` unless it is
/// there already.
pub(super) fn fetch_debs(
    log: &ToolRunner,
    cache_dir: &Path,
    packages: &[String],
    progress: &ProgressBar,
) -> Result<Vec<PathBuf>, TinyImageError> {
    let mut found = candidates(log, packages);
    if found
        .as_ref()
        .map_or(true, |f| packages.iter().any(|p| !f.contains_key(p)))
    {
        apt_update(log)?;
        found = candidates(log, packages);
    }
    let found = found?;
    let mut debs = Vec::new();
    let mut missing = Vec::new();
    for package in packages {
        let (version, arch) = found
            .get(package)
            .ok_or_else(|| TinyImageError::NoCandidate {
                package: package.clone(),
            })?;
        let deb = cache_dir.join(deb_file_name(package, version, arch));
        if !deb.exists() {
            missing.push(format!("{package}={version}"));
        }
        debs.push(deb);
    }
    if !missing.is_empty() {
        progress.set_message(format!("apt-get download ({} packages)", missing.len()));
        log.tool("apt-get")
            // The cache directory is usually not readable by `_apt`; downloading as root
            // avoids a warning and a failed chown.
            .args([
                "-o",
                "APT::Sandbox::User=root",
                "-o",
                "Acquire::Retries=3",
                "download",
            ])
            .args(&missing)
            .cwd(cache_dir)
            .hint(|| "check that the Debian mirror is reachable (`apt-get update`)".into())
            .run()?;
    }
    for deb in &debs {
        if !deb.exists() {
            return Err(TinyImageError::Missing { path: deb.clone() });
        }
    }
    Ok(debs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb_names_match_apt_get_download() {
        assert_eq!(
            deb_file_name("busybox-static", "1:1.35.0-4+deb12u1+b1", "amd64"),
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
        );
    }
}
