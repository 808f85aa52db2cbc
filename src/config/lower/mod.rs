//! Raw (as written) → model (as meant): attach file ids to spans, resolve relative paths
//! against the declaring file's directory, parse hashes, and merge files into one `Config`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::raw::{
    RawDeploy, RawFile, RawHost, RawImage, RawKeys, RawNetworkKind, RawNic, RawPlatform, RawSize,
    RawVm,
};
use crate::model::config::backend::{self, Backend};
use crate::model::config::diagnostic::Diagnostic;
use crate::model::config::limits::{self, Refusal};
use crate::model::config::{
    Attachment, Config, DEFAULT_TEST_START, DEFAULT_TEST_TIMEOUT, DebianSpec, Deploy,
    DuplicateDefinition, FileId, Forward, Host, Image, ImageSource, KeyGrant, Located, Network,
    NetworkKind, Nic, Origin, Platform, Resources, Steps, Target, TestDecl, VmDecl,
};
use crate::model::hash::{ExpectedHash, HashAlgo};

mod build;
mod site;

use build::{lower_image, lower_platform};
use site::{lower_host, lower_vm};

/// The default Debian mirror; offline labs point `mirror` at their own.
pub const DEFAULT_DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

/// Everything lowering needs to know about the file being lowered.
pub struct FileContext<'a> {
    pub file: FileId,
    /// Relative paths in the file are relative to this directory.
    pub dir: &'a Path,
    /// For `~/` in paths; None leaves `~` alone (and the path will not be found).
    pub home: Option<&'a Path>,
}

impl FileContext<'_> {
    fn origin<T>(&self, spanned: &Spanned<T>) -> Origin {
        Origin {
            file: self.file,
            span: spanned.span(),
        }
    }

    fn located<T: Clone>(&self, spanned: &Spanned<T>) -> Located<T> {
        Located::new(spanned.get_ref().clone(), self.origin(spanned))
    }

    fn path(&self, spanned: &Spanned<String>) -> Located<PathBuf> {
        let text = spanned.get_ref();
        let path = match (text.strip_prefix("~/"), self.home) {
            (Some(rest), Some(home)) => home.join(rest),
            _ => self.dir.join(text),
        };
        Located::new(path, self.origin(spanned))
    }

    fn names(&self, list: &[Spanned<String>]) -> Vec<Located<String>> {
        list.iter().map(|s| self.located(s)).collect()
    }

    /// A diagnostic at `spanned` for a value that cannot work.
    fn refused<T>(&self, spanned: &Spanned<T>, refusal: Refusal) -> Diagnostic {
        Diagnostic::new(refusal.message, self.origin(spanned)).hint(refusal.hint)
    }

    /// `check`'s value, or `None` with a diagnostic in `problems`.
    fn checked<T, U>(
        &self,
        spanned: &Spanned<T>,
        check: impl FnOnce(&T) -> Result<U, Refusal>,
        problems: &mut Vec<Diagnostic>,
    ) -> Option<U> {
        match check(spanned.get_ref()) {
            Ok(value) => Some(value),
            Err(refusal) => {
                problems.push(self.refused(spanned, refusal));
                None
            }
        }
    }

    /// Package names that `apt-get install` can take; the others are reported.
    fn packages(&self, raw: &[Spanned<String>], problems: &mut Vec<Diagnostic>) -> Vec<String> {
        raw.iter()
            .filter_map(|p| {
                self.checked(p, |p: &String| limits::package(p), problems)
                    .map(|()| p.get_ref().clone())
            })
            .collect()
    }

    /// `memory`, `cpus` and `disk_size`, each checked against its unit and bounds.
    fn resources(
        &self,
        memory: &Option<Spanned<RawSize>>,
        cpus: &Option<Spanned<i64>>,
        disk_size: &Option<Spanned<RawSize>>,
        problems: &mut Vec<Diagnostic>,
    ) -> Resources {
        let size = |field: &str, raw: &Option<Spanned<RawSize>>, rule, problems: &mut Vec<_>| {
            raw.as_ref().and_then(|r| {
                self.checked(r, |r: &RawSize| limits::size(field, &r.0, rule), problems)
            })
        };
        Resources {
            memory: size("memory", memory, limits::MEMORY, problems),
            cpus: cpus
                .as_ref()
                .and_then(|c| self.checked(c, |c| limits::cpus(*c), problems)),
            disk_size: size("disk_size", disk_size, limits::DISK_SIZE, problems),
        }
    }
}

/// Adds one parsed file's definitions to `config`; problems go to `problems`.
pub fn merge_file(
    config: &mut Config,
    raw: RawFile,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) {
    if let Some(on) = raw.lab.converged_snapshot {
        config.lab.converged_snapshot |= on;
    }
    for (name, test) in raw.tests {
        if check_name(&name, cx, "test", problems) {
            let start = match &test.start {
                Some(start) if !is_valid_name(start.get_ref()) => {
                    problems.push(
                        Diagnostic::new(
                            format!("`start = \"{}\"` is not a snapshot's name", start.get_ref()),
                            cx.origin(start),
                        )
                        .hint("a test starts from `converged` (the default) or from a snapshot saved with `farm snapshot save NAME`"),
                    );
                    continue;
                }
                Some(start) => cx.located(start),
                None => Located::new(DEFAULT_TEST_START.to_string(), cx.origin(&name)),
            };
            let timeout = match &test.timeout {
                Some(t) => {
                    match cx.checked(t, |t: &String| limits::duration("timeout", t), problems) {
                        Some(timeout) => timeout,
                        None => continue,
                    }
                }
                None => DEFAULT_TEST_TIMEOUT,
            };
            let decl = TestDecl {
                name: cx.located(&name),
                script: cx.path(&test.script),
                start,
                timeout,
            };
            insert(config, |c| &mut c.tests, "test", decl);
        }
    }
    for url in &raw.substituters {
        if cx
            .checked(url, |u: &String| limits::substituter(u), problems)
            .is_some()
        {
            config.cache.substituters.push(cx.located(url));
        }
    }
    for key in &raw.trusted_public_keys {
        if let Some(parsed) = cx.checked(key, |k: &String| limits::trusted_public_key(k), problems)
        {
            config
                .cache
                .trusted_public_keys
                .push(Located::new(parsed, cx.origin(key)));
        }
    }
    for (name, image) in raw.images {
        if let Some(image) = check_name(&name, cx, "image", problems)
            .then(|| lower_image(cx.located(&name), image, cx, problems))
            .flatten()
        {
            insert(config, |c| &mut c.images, "image", image);
        }
    }
    for (name, target) in raw.targets {
        if check_name(&name, cx, "target", problems) {
            let arch = target.arch;
            let target = Target {
                name: cx.located(&name),
                arch,
                machine: target.machine.as_ref().and_then(|m| {
                    cx.checked(
                        m,
                        |m: &String| limits::machine(arch, m).map(|()| m.clone()),
                        problems,
                    )
                }),
                cpu: target.cpu,
                accel: target.accel,
            };
            insert(config, |c| &mut c.targets, "target", target);
        }
    }
    for (name, platform) in raw.platforms {
        if check_name(&name, cx, "platform", problems) {
            let platform = lower_platform(cx.located(&name), platform, cx, problems);
            insert(config, |c| &mut c.platforms, "platform", platform);
        }
    }
    for (name, network) in raw.networks {
        if check_name(&name, cx, "network", problems) {
            let network = Network {
                name: cx.located(&name),
                kind: match network.kind {
                    RawNetworkKind::Vde => NetworkKind::Vde {
                        url: network.url.as_ref().and_then(|u| {
                            cx.checked(u, |u: &String| limits::vde_url(u), problems)
                                .map(|()| cx.located(u))
                        }),
                        subnet: network.subnet.as_ref().map(|s| cx.located(s)),
                    },
                },
            };
            insert(config, |c| &mut c.networks, "network", network);
        }
    }
    for (name, host) in raw.hosts {
        if check_name(&name, cx, "host", problems) {
            let host = lower_host(cx.located(&name), host, cx, problems);
            insert(config, |c| &mut c.hosts, "host", host);
        }
    }
    for (name, vm) in raw.vms {
        if check_name(&name, cx, "VM", problems) {
            let vm = lower_vm(cx.located(&name), vm, cx, problems);
            insert(config, |c| &mut c.vms, "VM", vm);
        }
    }
}

/// Lowers `platforms/NAME.toml`, whose top level is one platform named after the file.
pub fn merge_platform_file(
    config: &mut Config,
    name: Located<String>,
    raw: RawPlatform,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) {
    let platform = lower_platform(name, raw, cx, problems);
    insert(config, |c| &mut c.platforms, "platform", platform);
}

/// Lowers `images/NAME.toml`, whose top level is one image named after the file.
pub fn merge_image_file(
    config: &mut Config,
    name: Located<String>,
    raw: RawImage,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) {
    if let Some(image) = lower_image(name, raw, cx, problems) {
        insert(config, |c| &mut c.images, "image", image);
    }
}

/// Names become store directory names and hostnames: keep them to a safe alphabet.
fn check_name(
    name: &Spanned<String>,
    cx: &FileContext,
    kind: &str,
    problems: &mut Vec<Diagnostic>,
) -> bool {
    let ok = is_valid_name(name.get_ref());
    if !ok {
        problems.push(
            Diagnostic::new(
                match name.get_ref().len() {
                    n if n > limits::NAME_MAX_LEN => format!(
                        "The {kind} name `{}` is not allowed: it has {n} characters",
                        name.get_ref()
                    ),
                    _ => format!("The {kind} name `{}` is not allowed", name.get_ref()),
                },
                cx.origin(name),
            )
            .hint(limits::NAME_RULE),
        );
    }
    ok
}

pub fn is_valid_name(name: &str) -> bool {
    limits::is_vm_name(name)
}

/// Definitions carry their name and where it was written, so duplicates can report both places.
trait Named {
    fn located_name(&self) -> &Located<String>;
}

macro_rules! named {
    ($($ty:ty),*) => {
        $(impl Named for $ty {
            fn located_name(&self) -> &Located<String> {
                &self.name
            }
        })*
    };
}
named!(Image, Target, Platform, Network, Host, VmDecl, TestDecl);

/// Inserts a definition; a second one with the same name is recorded for validation to
/// report, and the first is kept.
fn insert<T: Named>(
    config: &mut Config,
    table: impl Fn(&mut Config) -> &mut BTreeMap<String, T>,
    kind: &'static str,
    value: T,
) {
    let name = value.located_name().value.clone();
    let second = value.located_name().at.clone();
    if let Some(existing) = table(config).get(&name) {
        let first = existing.located_name().at.clone();
        config.duplicates.push(DuplicateDefinition {
            kind,
            name,
            first,
            second,
        });
    } else {
        table(config).insert(name, value);
    }
}
