//! The tiny image's packages: the current cloud kernel's version, each package's candidate,
//! and the `.deb`s downloaded with `apt-get download` into the store's cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use super::TinyImageError;
use crate::build::tools::ToolRunner;
use crate::model::build::tiny_recipe::kernel_meta_package;
use crate::model::values::Arch;

/// How apt is asked about one architecture's packages. For the host's own architecture,
/// the host's apt as it is. For another one, a private apt state under the build cache
/// (package lists, archives, an empty dpkg status) that reads the host's sources: the host's
/// apt configuration is never changed (no `dpkg --add-architecture`), yet the same mirror
/// serves both.
pub(super) struct Apt {
    arch: Arch,
    options: Vec<String>,
}

impl Apt {
    pub(super) fn for_arch(arch: Arch, cache_dir: &Path) -> std::io::Result<Self> {
        if Some(arch) == crate::sys::hostinfo::host_arch() {
            return Ok(Self {
                arch,
                options: Vec::new(),
            });
        }
        let root = cache_dir.join(format!("apt-{}", arch.debian_name()));
        fs_err::create_dir_all(root.join("lists/partial"))?;
        fs_err::create_dir_all(root.join("cache/archives/partial"))?;
        let status = root.join("status");
        if !status.exists() {
            fs_err::write(&status, "")?;
        }
        let path = |p: PathBuf| p.display().to_string();
        let options = [
            format!("APT::Architecture={}", arch.debian_name()),
            format!("APT::Architectures::={}", arch.debian_name()),
            format!("Dir::State::Lists={}", path(root.join("lists"))),
            format!("Dir::Cache={}", path(root.join("cache"))),
            format!("Dir::State::status={}", path(status)),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        Ok(Self { arch, options })
    }

    /// `apt-get`/`apt-cache` with this architecture's options.
    fn tool<'a>(&self, log: &'a ToolRunner, tool: &str) -> crate::build::tools::Invocation<'a> {
        log.tool(tool).args(&self.options)
    }

    fn update(&self, log: &ToolRunner) -> Result<(), TinyImageError> {
        self.tool(log, "apt-get")
            .args(["-o", "APT::Sandbox::User=root", "update"])
            .hint(|| {
                "check that the Debian mirror in /etc/apt/sources.list(.d) is reachable".into()
            })
            .run()?;
        Ok(())
    }
}

/// The versioned kernel the cloud kernel's meta-package points at (`6.1.0-28-cloud-amd64`),
/// so the image follows Debian's security updates. Runs `apt-get update` once if apt knows
/// nothing.
pub(super) fn current_kernel(log: &ToolRunner, apt: &Apt) -> Result<String, TinyImageError> {
    let meta = kernel_meta_package(apt.arch);
    let flavour = format!("-cloud-{}", apt.arch.debian_name());
    let parse = |out: &str| {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .map(str::trim)
            .find(|v| v.ends_with(&flavour))
            .map(str::to_string)
    };
    let depends = || {
        apt.tool(log, "apt-cache")
            .args(["depends", meta])
            .hint(apt_hint)
            .run()
    };
    if let Ok(out) = depends()
        && let Some(version) = parse(&out)
    {
        return Ok(version);
    }
    apt.update(log)?;
    let out = depends()?;
    parse(&out).ok_or(TinyImageError::NoCandidate {
        package: meta.into(),
    })
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
    apt: &Apt,
    packages: &[String],
) -> Result<BTreeMap<String, (String, String)>, TinyImageError> {
    let out = apt
        .tool(log, "apt-cache")
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
    apt: &Apt,
    cache_dir: &Path,
    packages: &[String],
    progress: &ProgressBar,
) -> Result<Vec<PathBuf>, TinyImageError> {
    let mut found = candidates(log, apt, packages);
    if found
        .as_ref()
        .map_or(true, |f| packages.iter().any(|p| !f.contains_key(p)))
    {
        apt.update(log)?;
        found = candidates(log, apt, packages);
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
        apt.tool(log, "apt-get")
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
