//! Loading farm.toml (and `images/*.toml`, `platforms/*.toml` beside it) into the model.
//!
//! Reading files is the only effect here; `parse_sources` is pure and is what tests use.
//! Problems come back as `Diagnostic`s rendered like compiler errors: file:line:col, the
//! offending line with a caret, and a hint.

mod lower;
mod raw;
mod render;

use std::path::{Path, PathBuf};

use toml::Spanned;

pub use lower::{DEFAULT_DEBIAN_MIRROR, is_valid_name};
pub use render::{SourceFile, SourceMap};

use crate::model::config::diagnostic::Diagnostic;
use crate::model::config::topology::Topology;
use crate::model::config::validate::validate;
use crate::model::config::{Config, Located, Origin};
use lower::FileContext;

/// What a source file contributes: the whole farm.toml, or one image or platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Main,
    Image,
    Platform,
}

/// A valid configuration with its expanded topology.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub topology: Topology,
    pub sources: SourceMap,
    /// The directory holding farm.toml: the default home of `cache/` and `.farm/`.
    pub project_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{rendered}")]
    Invalid {
        rendered: String,
        diagnostics: Vec<Diagnostic>,
    },
}

/// Reads and validates the configuration at `path` (a farm.toml).
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    // Bytes first: a file that is not UTF-8 is reported at the byte that is not.
    let mut not_utf8: Vec<(usize, usize)> = Vec::new();
    let mut read_index = 0;
    let mut read = |p: &Path| -> Result<String, ConfigError> {
        let bytes = fs_err::read(p).map_err(|source| ConfigError::Read {
            path: p.to_path_buf(),
            source,
        })?;
        let index = read_index;
        read_index += 1;
        Ok(match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                not_utf8.push((index, e.utf8_error().valid_up_to()));
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            }
        })
    };
    let project_dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut files = vec![(path.to_path_buf(), SourceKind::Main, read(path)?)];
    for (dir, kind) in [
        ("images", SourceKind::Image),
        ("platforms", SourceKind::Platform),
    ] {
        for file in toml_files_in(&project_dir.join(dir))? {
            let text = read(&file)?;
            files.push((file, kind, text));
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let sources = SourceMap::new(
        files
            .iter()
            .map(|(p, _, t)| SourceFile {
                path: p.clone(),
                text: t.clone(),
            })
            .collect(),
    );
    if !not_utf8.is_empty() {
        let diagnostics: Vec<Diagnostic> = not_utf8
            .iter()
            .map(|(file, at)| {
                Diagnostic::new(
                    format!(
                        "`{}` is not UTF-8 text: the byte here does not begin a UTF-8 character",
                        files[*file].0.display()
                    ),
                    Origin {
                        file: *file,
                        span: *at..*at,
                    },
                )
                .hint("save the file as UTF-8 (farm.toml is TOML, which is always UTF-8)")
            })
            .collect();
        return Err(ConfigError::Invalid {
            rendered: sources.render_all(&diagnostics),
            diagnostics,
        });
    }
    let kinds: Vec<SourceKind> = files.iter().map(|(_, k, _)| *k).collect();
    match parse_sources(&sources, &kinds, home.as_deref()) {
        Ok((config, topology)) => Ok(Loaded {
            config,
            topology,
            sources,
            project_dir,
        }),
        Err(diagnostics) => Err(ConfigError::Invalid {
            rendered: sources.render_all(&diagnostics),
            diagnostics,
        }),
    }
}

fn toml_files_in(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let entries = fs_err::read_dir(dir).map_err(|source| ConfigError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Parses and validates already-read sources. `kinds[i]` says what `sources.files[i]` holds.
pub fn parse_sources(
    sources: &SourceMap,
    kinds: &[SourceKind],
    home: Option<&Path>,
) -> Result<(Config, Topology), Vec<Diagnostic>> {
    let mut config = Config::default();
    let mut problems = Vec::new();
    for (file_id, (source, kind)) in sources.files.iter().zip(kinds).enumerate() {
        let dir = source.path.parent().unwrap_or(Path::new("."));
        let cx = FileContext {
            file: file_id,
            dir,
            home,
        };
        let whole_file = Origin {
            file: file_id,
            span: 0..0,
        };
        let stem_name = || {
            let stem = source
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            Located::new(stem, whole_file.clone())
        };
        let parse_error = |e: toml::de::Error| {
            let span = e.span().unwrap_or(0..0);
            Diagnostic::new(
                capitalise(e.message().trim_end()),
                Origin {
                    file: file_id,
                    span,
                },
            )
        };
        match kind {
            SourceKind::Main => match toml::from_str::<raw::RawFile>(&source.text) {
                Ok(raw) => lower::merge_file(&mut config, raw, &cx, &mut problems),
                Err(e) => {
                    let top_level = e.message().contains("`images`");
                    let diagnostic = parse_error(e);
                    problems.push(if top_level {
                        diagnostic.hint("farm.toml has the tables images, targets, platforms, networks, hosts, vms, lab and tests, and the lists substituters and trusted-public-keys; see README.md")
                    } else {
                        diagnostic
                    });
                }
            },
            SourceKind::Platform => {
                match toml::from_str::<Spanned<raw::RawPlatform>>(&source.text) {
                    Ok(raw) => {
                        let name = stem_name();
                        if is_valid_name(&name.value) {
                            lower::merge_platform_file(
                                &mut config,
                                name,
                                raw.into_inner(),
                                &cx,
                                &mut problems,
                            )
                        } else {
                            problems.push(invalid_file_name(&name, "platform"));
                        }
                    }
                    Err(e) => problems.push(parse_error(e)),
                }
            }
            SourceKind::Image => match toml::from_str::<raw::RawImage>(&source.text) {
                Ok(raw) => {
                    let name = stem_name();
                    if is_valid_name(&name.value) {
                        lower::merge_image_file(&mut config, name, raw, &cx, &mut problems)
                    } else {
                        problems.push(invalid_file_name(&name, "image"));
                    }
                }
                Err(e) => problems.push(parse_error(e)),
            },
        }
    }
    if !problems.is_empty() {
        problems.sort_by_key(|d| (d.at.file, d.at.span.start));
        return Err(problems);
    }
    add_implicit_target(&mut config);
    let topology = validate(&config)?;
    Ok((config, topology))
}

/// The name of the target farm.toml gets when it declares none but builds or runs
/// something: this machine's architecture, named as Debian names it.
pub fn implicit_target_name() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

/// A farm.toml with platforms or VMs but no `[targets]` builds and runs for this machine's
/// architecture, as if it said `[targets.amd64] arch = "x86_64"` (or arm64 on an arm host).
fn add_implicit_target(config: &mut Config) {
    let uses_targets = !config.platforms.is_empty() || !config.vms.is_empty();
    if !config.targets.is_empty() || !uses_targets {
        return;
    }
    let arch = match std::env::consts::ARCH {
        "aarch64" => crate::model::values::Arch::Aarch64,
        _ => crate::model::values::Arch::X86_64,
    };
    let name = implicit_target_name().to_string();
    config.targets.insert(
        name.clone(),
        crate::model::config::Target {
            name: Located::new(name, Origin::default()),
            arch,
            machine: None,
            cpu: None,
            accel: crate::model::values::Accel::Auto,
        },
    );
}

fn invalid_file_name(name: &Located<String>, kind: &str) -> Diagnostic {
    Diagnostic::new(
        format!(
            "The {kind} file name `{}.toml` is not a valid {kind} name",
            name.value
        ),
        name.at.clone(),
    )
    .hint("names use letters, digits, `-`, `_` and `.`, and start with a letter or digit")
}

/// toml's messages start in lower case; farm's start with a capital letter.
fn capitalise(message: &str) -> String {
    let mut chars = message.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}
