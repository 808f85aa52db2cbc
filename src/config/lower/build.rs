//! What is built: images (a url, a Debian recipe or farm's tiny image) and platforms (a
//! parent and the steps on it), lowered with their hashes, paths and resources checked.

use super::*;

pub(super) fn lower_image(
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

pub(super) fn lower_platform(
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
    if let (Some(builder), Some(_)) = (&raw.builder, &raw.playbook)
        && *builder.get_ref() == crate::model::values::Builder::Chroot
    {
        problems.push(
            Diagnostic::new(
                format!(
                    "Platform `{}` runs its steps in a chroot (`builder = \"chroot\"`), but a playbook needs the image booted: Ansible reaches it over ssh",
                    name.value
                ),
                cx.origin(builder),
            )
            .hint("remove `builder = \"chroot\"` (steps then run in the booted image), or do the playbook's work with `run` commands"),
        );
    }
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
            builder: raw.builder.as_ref().map(|b| cx.located(b)),
        },
        resources: cx.resources(&raw.memory, &raw.cpus, &raw.disk_size, problems),
    }
}
