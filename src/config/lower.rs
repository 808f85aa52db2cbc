//! Raw (as written) → model (as meant): attach file ids to spans, resolve relative paths
//! against the declaring file's directory, parse hashes, and merge files into one `Config`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::raw::{
    RawDeploy, RawFile, RawHost, RawImage, RawKeys, RawNetworkKind, RawNic, RawPlatform, RawSize,
    RawVm,
};
use crate::model::backend::{self, Backend};
use crate::model::config::{
    Attachment, Config, DebianSpec, Deploy, DuplicateDefinition, FileId, Forward, Host, Image,
    ImageSource, KeyGrant, Located, Network, NetworkKind, Nic, Origin, Platform, Resources, Steps,
    Target, VmDecl,
};
use crate::model::diagnostic::Diagnostic;
use crate::model::hash::{ExpectedHash, HashAlgo};
use crate::model::limits::{self, Refusal};

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
                format!("The {kind} name `{}` is not allowed", name.get_ref()),
                cx.origin(name),
            )
            .hint("names use letters, digits, `-`, `_` and `.`, and start with a letter or digit"),
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
named!(Image, Target, Platform, Network, Host, VmDecl);

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

fn lower_image(
    name: Located<String>,
    raw: RawImage,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) -> Option<Image> {
    let hashes: Vec<(HashAlgo, &Spanned<String>)> = [
        (HashAlgo::Sha256, &raw.sha256),
        (HashAlgo::Sha512, &raw.sha512),
        (HashAlgo::Blake3, &raw.blake3),
    ]
    .into_iter()
    .filter_map(|(algo, text)| text.as_ref().map(|t| (algo, t)))
    .collect();
    if hashes.len() > 1 {
        problems.push(
            Diagnostic::new(
                format!("Image `{}` declares more than one hash", name.value),
                cx.origin(hashes[1].1),
            )
            .hint("keep one of `sha256`, `sha512` or `blake3`"),
        );
        return None;
    }
    let hash = match hashes.first() {
        Some((algo, text)) => match ExpectedHash::parse(*algo, text.get_ref()) {
            Ok(h) => Some(h),
            Err(e) => {
                problems.push(
                    Diagnostic::new(
                        format!(
                            "Image `{}` has a malformed {}: {e}",
                            name.value,
                            algo.name()
                        ),
                        cx.origin(text),
                    )
                    .hint("copy the digest from the publisher's SHA256SUMS/SHA512SUMS file"),
                );
                return None;
            }
        },
        None => None,
    };
    let sources = [
        raw.url.as_ref().map(|s| cx.origin(s)),
        raw.path.as_ref().map(|s| cx.origin(s)),
        raw.debian.as_ref().map(|s| cx.origin(s)),
        raw.tiny
            .as_ref()
            .filter(|t| *t.get_ref())
            .map(|s| cx.origin(s)),
    ];
    let given: Vec<&Origin> = sources.iter().flatten().collect();
    if given.len() != 1 {
        let at = given
            .get(1)
            .map(|o| (*o).clone())
            .unwrap_or(name.at.clone());
        problems.push(
            Diagnostic::new(
                format!(
                    "Image `{}` must have exactly one source: `url`, `path`, `debian` or `tiny = true`",
                    name.value
                ),
                at,
            )
            .hint("e.g. `url = \"https://…/disk.qcow2\"` with `sha512 = \"…\"`"),
        );
        return None;
    }
    let source = if let Some(url) = &raw.url {
        cx.checked(url, |u: &String| limits::image_url(u), problems)?;
        let Some(hash) = hash else {
            problems.push(
                Diagnostic::new(
                    format!(
                        "Image `{}` is downloaded from a URL but declares no hash to verify it against",
                        name.value
                    ),
                    cx.origin(url),
                )
                .hint("add `sha256 = \"…\"` or `sha512 = \"…\"` as published next to the image"),
            );
            return None;
        };
        ImageSource::Url {
            url: cx.located(url),
            hash,
        }
    } else if let Some(path) = &raw.path {
        ImageSource::Path {
            path: cx.path(path),
            hash,
        }
    } else if raw.tiny.as_ref().is_some_and(|t| *t.get_ref()) {
        ImageSource::Tiny
    } else {
        let debian = raw.debian.expect("one source is present").into_inner();
        let suite = cx.checked(
            &debian.suite,
            |s: &String| limits::debian_suite(s),
            problems,
        );
        let mirror = match &debian.mirror {
            Some(m) => cx
                .checked(m, |m: &String| limits::debian_mirror(m), problems)
                .map(|()| m.get_ref().clone()),
            None => Some(DEFAULT_DEBIAN_MIRROR.to_string()),
        };
        let variant = match &debian.variant {
            Some(v) => cx
                .checked(v, |v: &String| limits::debian_variant(v), problems)
                .map(|()| v.get_ref().clone()),
            None => Some("minbase".to_string()),
        };
        let packages = cx.packages(&debian.packages, problems);
        let (Some(()), Some(mirror), Some(variant)) = (suite, mirror, variant) else {
            return None;
        };
        ImageSource::Debian(DebianSpec {
            suite: debian.suite.into_inner(),
            mirror,
            variant,
            packages,
            init: debian.init,
        })
    };
    let firmware = match (&raw.firmware, &source) {
        (Some(firmware), ImageSource::Debian(_) | ImageSource::Tiny) => {
            problems.push(
                Diagnostic::new(
                    format!(
                        "Image `{}` is one farm builds, which boots its kernel directly: `firmware` does not apply",
                        name.value
                    ),
                    cx.origin(firmware),
                )
                .hint("`firmware` is for images with their own bootloader (`url` or `path`); remove it"),
            );
            return None;
        }
        (firmware, _) => firmware.as_ref().map(|f| *f.get_ref()),
    };
    Some(Image {
        name,
        source,
        arch: raw.arch,
        format: raw.format,
        firmware,
    })
}

fn lower_platform(
    name: Located<String>,
    raw: RawPlatform,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) -> Platform {
    let authorized_keys = match &raw.authorized_keys {
        None => Vec::new(),
        Some(RawKeys::ForRoot(keys)) => keys
            .iter()
            .map(|k| KeyGrant {
                user: "root".to_string(),
                key_file: cx.path(k),
            })
            .collect(),
        Some(RawKeys::PerUser(users)) => users
            .iter()
            .filter(|(user, _)| {
                cx.checked(user, |u: &String| limits::login(u), problems)
                    .is_some()
            })
            .flat_map(|(user, keys)| {
                keys.iter().map(move |k| KeyGrant {
                    user: user.get_ref().clone(),
                    key_file: cx.path(k),
                })
            })
            .collect(),
    };
    let files = raw
        .files
        .iter()
        .filter(|(guest, _)| {
            cx.checked(guest, |g: &String| limits::guest_path(g), problems)
                .is_some()
        })
        .map(|(guest, local)| (guest.get_ref().clone(), cx.path(local)))
        .collect();
    Platform {
        name,
        from: cx.located(&raw.from),
        steps: Steps {
            authorized_keys,
            upgrade: raw.upgrade,
            packages: cx.packages(&raw.packages, problems),
            files,
            run: raw.run,
            playbook: raw.playbook.as_ref().map(|p| cx.path(p)),
        },
        resources: cx.resources(&raw.memory, &raw.cpus, &raw.disk_size, problems),
    }
}

fn lower_deploy(raw: &RawDeploy, cx: &FileContext) -> Deploy {
    Deploy {
        targets: cx.names(&raw.targets),
        platforms: cx.names(&raw.platforms),
    }
}

fn lower_attach(
    raw: &BTreeMap<Spanned<String>, Spanned<crate::model::values::IpCidr>>,
    cx: &FileContext,
) -> Vec<Attachment> {
    raw.iter()
        .map(|(network, address)| Attachment {
            network: cx.located(network),
            address: cx.located(address),
        })
        .collect()
}

/// `backend` and `libvirt_uri` of a host or hypervisor VM, each checked at its span; the
/// backend is located at `backend` (where a later refusal points).
fn lower_backend(
    kind: &Option<Spanned<String>>,
    uri: &Option<Spanned<String>>,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) -> Option<Located<Backend>> {
    let uri_ok = uri
        .as_ref()
        .map(|u| cx.checked(u, |u: &String| backend::parse_uri(u), problems));
    if let Some(u) = uri
        .as_ref()
        .filter(|_| kind.as_ref().is_none_or(|k| k.get_ref() != "libvirt"))
    {
        problems.push(cx.refused(
            u,
            Refusal {
                message: "`libvirt_uri` is set but `backend` is not \"libvirt\"".into(),
                hint: "add `backend = \"libvirt\"`, or remove `libvirt_uri`".into(),
            },
        ));
    }
    let kind = kind.as_ref()?;
    cx.checked(kind, |k: &String| backend::parse_kind(k), problems)?;
    let uri = uri
        .as_ref()
        .filter(|_| uri_ok.flatten().is_some())
        .map(|u| u.get_ref().as_str());
    Some(Located::new(
        backend::from_parts(kind.get_ref(), uri),
        cx.origin(kind),
    ))
}

fn lower_host(
    name: Located<String>,
    raw: RawHost,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) -> Host {
    Host {
        backend: lower_backend(&raw.backend, &raw.libvirt_uri, cx, problems),
        name,
        address: raw.address.as_ref().map(|a| cx.located(a)),
        identity_file: raw.identity_file.as_ref().map(|s| cx.located(s)),
        known_hosts: raw.known_hosts.as_ref().map(|s| cx.located(s)),
        root: raw.root.as_ref().map(|s| cx.located(s)),
        deploy: raw.deploy.as_ref().map(|d| lower_deploy(d, cx)),
        attach: lower_attach(&raw.attach, cx),
    }
}

/// The VM's VDE NICs (`network`) or its libvirt ones (`libvirt_network`); a NIC naming
/// both or neither is reported once, with the VDE ones.
fn lower_nics(
    raw: &[Spanned<RawNic>],
    libvirt: bool,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) -> Vec<Nic> {
    raw.iter()
        .filter_map(|spanned| {
            let n = spanned.get_ref();
            let network = match (&n.network, &n.libvirt_network) {
                (Some(network), None) if !libvirt => network,
                (None, Some(network)) if libvirt => network,
                (Some(_), Some(_)) | (None, None) => {
                    if !libvirt {
                        problems.push(cx.refused(
                            spanned,
                            Refusal {
                                message: "A NIC names both `network` and `libvirt_network`, or neither".into(),
                                hint: "give each NIC one: `{ network = \"lab\" }` (a VDE network of farm.toml) or `{ libvirt_network = \"default\" }` (a network of the site's libvirtd)".into(),
                            },
                        ));
                    }
                    return None;
                }
                _ => return None,
            };
            Some(Nic {
                network: cx.located(network),
                ip: n.ip.as_ref().and_then(|ip| {
                    cx.checked(ip, limits::host_address, problems)
                        .map(|()| cx.located(ip))
                }),
                gateway: n.gateway.as_ref().map(|g| cx.located(g)),
                mac: n.mac.as_ref().and_then(|m| {
                    cx.checked(m, limits::nic_mac, problems)
                        .map(|()| cx.located(m))
                }),
            })
        })
        .collect()
}

fn lower_vm(
    name: Located<String>,
    raw: RawVm,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) -> VmDecl {
    let forwards = raw
        .forwards
        .iter()
        .filter(|f| {
            let ports = [
                ("forwards.host", f.get_ref().host),
                ("forwards.guest", f.get_ref().guest),
            ];
            ports.iter().all(|(field, port)| {
                cx.checked(f, |_| limits::port(field, *port), problems)
                    .is_some()
            })
        })
        .map(|f| {
            Located::new(
                Forward {
                    host: f.get_ref().host,
                    guest: f.get_ref().guest,
                },
                cx.origin(f),
            )
        })
        .collect();
    VmDecl {
        name,
        platform: raw.platform.as_ref().map(|s| cx.located(s)),
        target: raw.target.as_ref().map(|s| cx.located(s)),
        host: raw.host.as_ref().map(|s| cx.located(s)),
        hostname: raw.hostname.as_ref().and_then(|h| {
            cx.checked(h, |h: &String| limits::hostname(h), problems)
                .map(|()| cx.located(h))
        }),
        ssh_port: raw.ssh_port.as_ref().and_then(|p| {
            cx.checked(p, |p| limits::port("ssh_port", *p), problems)
                .map(|_| cx.located(p))
        }),
        forwards,
        user_network: raw.user_network.unwrap_or(true),
        nics: lower_nics(&raw.nics, false, cx, problems),
        libvirt_nics: lower_nics(&raw.nics, true, cx, problems),
        attach: lower_attach(&raw.attach, cx),
        deploy: raw.deploy.as_ref().map(|d| lower_deploy(d, cx)),
        resources: cx.resources(&raw.memory, &raw.cpus, &raw.disk_size, problems),
        playbook: raw.playbook.as_ref().map(|p| cx.path(p)),
        backend: lower_backend(&raw.backend, &raw.libvirt_uri, cx, problems),
    }
}
