//! Derivations: the recipe for each store entry, and its hash.
//!
//! A derivation holds everything that determines its output — the parent's hash, the steps,
//! the *content* (not the path) of every referenced file and key, the target, and a format
//! version — and nothing else: memory, cpus, the mirror URL or the entry's name do not change
//! what is built, so they do not change the hash. The hash is blake3 over a canonical
//! encoding: JSON with sorted object keys and no whitespace (serde_json's `Value` keeps keys
//! in a `BTreeMap`), so it never depends on declaration order or on `std::hash::Hash`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::model::config::diagnostic::Diagnostic;
use crate::model::config::topology::Topology;
use crate::model::config::{Config, DebianInit, DebianSpec, ImageSource, Origin};
use crate::model::hash::{ContentHash, DrvHash, ExpectedHash};
use crate::model::values::{Arch, Builder, DiskFormat, Firmware};

/// Bumped whenever the encoding or the meaning of a field changes: every hash changes with it.
pub const FORMAT_VERSION: u32 = 1;

/// The blake3 key-derivation context: keeps farm's hashes apart from any other blake3 use.
const HASH_CONTEXT: &str = "farm 2026 derivation";

/// What is built and how; serialized canonically to compute the hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Derivation {
    pub format: u32,
    #[serde(flatten)]
    pub recipe: Recipe,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Recipe {
    /// A download or local file whose hash is declared: its output is fixed in advance, so
    /// where it comes from (URL, path) is not part of the hash.
    FixedImage {
        hash: ExpectedHash,
        format: Option<DiskFormat>,
    },
    /// A local file without a declared hash: keyed by its content.
    LocalImage {
        content: ContentHash,
        format: Option<DiskFormat>,
    },
    /// A root filesystem built by mmdebstrap. The mirror is *where* packages come from, not
    /// *what* is built, so an offline lab's mirror gives the same key.
    DebianImage {
        suite: String,
        variant: String,
        packages: Vec<String>,
        arch: Arch,
        /// Absent for systemd, so the keys of images that never say stay what they were.
        #[serde(default, skip_serializing_if = "DebianInit::is_systemd")]
        init: DebianInit,
        /// What farm itself bakes in (agent, hooks, its packages): see `debian_recipe`.
        farm_parts: ContentHash,
    },
    /// farm's tiny image. The kernel version is resolved from the apt sources at build
    /// time, like mmdebstrap's package versions: the recipe, not the versions, is the key.
    TinyImage {
        arch: Arch,
        /// What farm bakes in (scripts, packages, modules): see `tiny_recipe`.
        farm_parts: ContentHash,
    },
    /// A platform: one qcow2 layer on its parent's.
    Layer(LayerRecipe),
}

/// What a platform's layer is built from: its parent, the build VM's hardware and the
/// step inputs (a struct of its own so a layer build can be handed exactly this).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LayerRecipe {
    pub parent: DrvHash,
    pub arch: Arch,
    pub machine: Option<String>,
    /// The firmware the build VM boots the image's bootloader with, when the image asks
    /// for other than its architecture's default (absent otherwise, so the hashes of
    /// labs that never say stay what they were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    /// How the steps reached the image: a chroot build leaves no trace of a first boot,
    /// so it is another output (absent for `boot`, so existing keys stay).
    #[serde(default, skip_serializing_if = "Builder::is_boot")]
    pub builder: Builder,
    pub steps: StepInputs,
}

/// A platform's steps with every file replaced by its content hash.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StepInputs {
    pub authorized_keys: Vec<KeyInput>,
    pub upgrade: bool,
    /// Sorted and deduplicated: the set of packages is what matters to apt.
    pub packages: Vec<String>,
    pub files: BTreeMap<String, ContentHash>,
    pub run: Vec<String>,
    /// The playbook and the tree of its `roles/` (absent when the platform has none, so
    /// the hashes of platforms without one stay what they were).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub playbook: Option<PlaybookInput>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlaybookInput {
    pub playbook: ContentHash,
    pub roles: Option<ContentHash>,
}

/// The `roles/` directory beside a playbook, whose tree is an input of the layer.
pub fn roles_dir(playbook: &Path) -> PathBuf {
    playbook.parent().unwrap_or(Path::new(".")).join("roles")
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KeyInput {
    pub user: String,
    pub key: ContentHash,
}

impl Recipe {
    /// The architecture of what the recipe makes, when the recipe fixes it (images farm
    /// builds, layers); a downloaded or local disk is whatever it is.
    pub fn arch(&self) -> Option<Arch> {
        match self {
            Recipe::FixedImage { .. } | Recipe::LocalImage { .. } => None,
            Recipe::DebianImage { arch, .. } | Recipe::TinyImage { arch, .. } => Some(*arch),
            Recipe::Layer(layer) => Some(layer.arch),
        }
    }
}

impl Derivation {
    /// The canonical encoding: compact JSON with sorted keys.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let value = serde_json::to_value(self).expect("derivations serialize to JSON");
        serde_json::to_vec(&value).expect("JSON values encode")
    }

    pub fn hash(&self) -> DrvHash {
        hash_canonical(&self.canonical_bytes())
    }

    /// The derivation as shown to people: the canonical JSON, pretty-printed.
    pub fn pretty(&self) -> String {
        let value = serde_json::to_value(self).expect("derivations serialize to JSON");
        serde_json::to_string_pretty(&value).expect("JSON values encode")
    }

    pub fn parent(&self) -> Option<DrvHash> {
        match &self.recipe {
            Recipe::Layer(layer) => Some(layer.parent),
            _ => None,
        }
    }
}

/// The hash of a derivation kept as JSON (an entry's `meta.json`): what `farm store verify`
/// and import recompute to know the metadata describes the entry it keys.
pub fn hash_of_json(derivation: &serde_json::Value) -> DrvHash {
    hash_canonical(&serde_json::to_vec(derivation).expect("JSON values encode"))
}

fn hash_canonical(bytes: &[u8]) -> DrvHash {
    let mut hasher = blake3::Hasher::new_derive_key(HASH_CONTEXT);
    hasher.update(bytes);
    DrvHash::from_blake3(hasher.finalize())
}

/// The store entry name of the appliance chroot builds run in (`farm-appliance-amd64`).
pub const APPLIANCE_NAME: &str = "farm-appliance";

/// farm's tiny image for `arch` as the appliance of `builder = "chroot"` builds: the same
/// derivation as a `tiny = true` image of that arch, so one entry serves both. It is not a
/// parent of the layers it builds (they do not contain it); projects keep it as a gc root.
pub fn appliance_node(arch: Arch) -> DrvNode {
    let derivation = Derivation {
        format: FORMAT_VERSION,
        recipe: Recipe::TinyImage {
            arch,
            farm_parts: crate::model::build::tiny_recipe::digest(arch),
        },
    };
    DrvNode {
        id: DrvId::Image {
            image: APPLIANCE_NAME.to_string(),
            arch: Some(arch),
        },
        name: format!("{APPLIANCE_NAME}-{}", arch.debian_name()),
        hash: derivation.hash(),
        derivation,
        parent: None,
        make: Make::BuildTiny { arch },
    }
}

/// The arches whose appliance the chroot builds of `graph` need.
pub fn appliance_arches(graph: &DrvGraph) -> BTreeSet<Arch> {
    graph
        .nodes
        .values()
        .filter_map(|node| match &node.derivation.recipe {
            Recipe::Layer(LayerRecipe {
                arch,
                builder: Builder::Chroot,
                ..
            }) => Some(*arch),
            _ => None,
        })
        .collect()
}

/// Identifies a derivation in a configuration.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DrvId {
    /// An image; Debian images are built per architecture, others are arch-independent.
    Image { image: String, arch: Option<Arch> },
    /// A platform built for a target.
    Platform { platform: String, target: String },
}

/// A derivation in context: its id, store name, parent and how it is made.
#[derive(Clone, Debug)]
pub struct DrvNode {
    pub id: DrvId,
    /// The store entry name: `<image>`, `<image>-<debian arch>`, or `<platform>_<target>`.
    pub name: String,
    pub derivation: Derivation,
    pub hash: DrvHash,
    pub parent: Option<DrvId>,
    pub make: Make,
}

/// How a derivation is made when the store lacks it, with everything its producer
/// (`build::produce`) needs: where an image comes from, what a layer is built from. Found
/// in the configuration with the recipe, so the two always agree; a plan carries it
/// (`model::plan::Action::Make`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Make {
    /// Download `url` and verify it against `hash`.
    Fetch {
        url: String,
        hash: ExpectedHash,
        format: Option<DiskFormat>,
    },
    /// Copy a local file into the store, verifying it against `hash` when one is declared.
    Import {
        path: PathBuf,
        hash: Option<ExpectedHash>,
        format: Option<DiskFormat>,
    },
    /// Build a root filesystem from a Debian mirror.
    Debootstrap { spec: DebianSpec, arch: Arch },
    /// Assemble farm's tiny image from Debian packages.
    BuildTiny { arch: Arch },
    /// A platform without steps: an empty overlay on its parent's entry.
    EmptyLayer,
    /// Run a platform's steps in a build VM, or in a chroot in farm's appliance.
    Layer(Box<LayerMake>),
}

/// What a platform's layer build needs besides its parent's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerMake {
    /// The platform and target in the configuration: the steps' files, the build VM's
    /// hardware and resources.
    pub platform: String,
    pub target: String,
    /// How many kinds of steps the platform has, for the plan and the status line.
    pub step_kinds: usize,
    pub recipe: LayerRecipe,
}

/// Every derivation of a configuration, keyed by id.
#[derive(Clone, Debug, Default)]
pub struct DrvGraph {
    pub nodes: BTreeMap<DrvId, DrvNode>,
}

impl DrvGraph {
    /// `wanted` and all its ancestors, parents before children.
    pub fn closure(&self, wanted: &[DrvId]) -> Vec<&DrvNode> {
        let mut seen: BTreeSet<&DrvId> = BTreeSet::new();
        let mut ordered = Vec::new();
        for id in wanted {
            let mut chain = Vec::new();
            let mut current = self.nodes.get(id);
            while let Some(node) = current {
                if !seen.insert(&node.id) {
                    break;
                }
                chain.push(node);
                current = node.parent.as_ref().and_then(|p| self.nodes.get(p));
            }
            ordered.extend(chain.into_iter().rev());
        }
        ordered
    }

    /// Every derivation, parents before children.
    pub fn all(&self) -> Vec<&DrvNode> {
        let ids: Vec<DrvId> = self.nodes.keys().cloned().collect();
        self.closure(&ids)
    }
}

/// Content hashes of the files a configuration refers to (keys, files, local images),
/// read by an effectful step before derivations are computed.
pub type InputHashes = BTreeMap<PathBuf, ContentHash>;

/// Every local file the derivations of `config` depend on, with where it is referenced.
pub fn referenced_files(config: &Config) -> Vec<(PathBuf, Origin, Option<ExpectedHash>)> {
    let mut files = Vec::new();
    for image in config.images.values() {
        if let ImageSource::Path { path, hash } = &image.source {
            files.push((path.value.clone(), path.at.clone(), hash.clone()));
        }
    }
    for platform in config.platforms.values() {
        for grant in &platform.steps.authorized_keys {
            files.push((
                grant.key_file.value.clone(),
                grant.key_file.at.clone(),
                None,
            ));
        }
        for local in platform.steps.files.values() {
            files.push((local.value.clone(), local.at.clone(), None));
        }
        if let Some(playbook) = &platform.steps.playbook {
            files.push((playbook.value.clone(), playbook.at.clone(), None));
        }
    }
    // Not derivation inputs, but read by `farm up`: checked with the rest.
    for vm in config.vms.values() {
        if let Some(playbook) = &vm.playbook {
            files.push((playbook.value.clone(), playbook.at.clone(), None));
        }
    }
    files
}

/// The (platform, target) pairs to build: those the topology runs, and every target for a
/// platform no VM runs (so `farm build` of a library of platforms builds them all).
pub fn wanted_platforms(config: &Config, topology: &Topology) -> Vec<DrvId> {
    let used = topology.platform_targets();
    let used_platforms: BTreeSet<&String> = used.iter().map(|(p, _)| p).collect();
    let mut wanted: Vec<DrvId> = used
        .iter()
        .map(|(platform, target)| DrvId::Platform {
            platform: platform.clone(),
            target: target.clone(),
        })
        .collect();
    for platform in config.platforms.keys() {
        if used_platforms.contains(platform) {
            continue;
        }
        for target in config.targets.keys() {
            wanted.push(DrvId::Platform {
                platform: platform.clone(),
                target: target.clone(),
            });
        }
    }
    wanted
}

/// Computes the derivations of every wanted platform, their ancestors, and every image.
/// `inputs` must hold the content hash of every file from [`referenced_files`].
pub fn derive_all(
    config: &Config,
    wanted: &[DrvId],
    inputs: &InputHashes,
) -> Result<DrvGraph, Vec<Diagnostic>> {
    let mut graph = DrvGraph::default();
    let mut problems = Vec::new();
    for id in wanted {
        if let Err(d) = derive(config, id, inputs, &mut graph) {
            problems.push(d);
        }
    }
    // Images no platform uses are still realised, so `farm build` fetches them.
    let arches: BTreeSet<Arch> = config.targets.values().map(|t| t.arch).collect();
    for (name, image) in &config.images {
        let ids: Vec<DrvId> = match &image.source {
            source if source.is_per_arch() => arches
                .iter()
                .map(|a| DrvId::Image {
                    image: name.clone(),
                    arch: Some(*a),
                })
                .collect(),
            _ => vec![DrvId::Image {
                image: name.clone(),
                arch: None,
            }],
        };
        for id in ids {
            if let Err(d) = derive(config, &id, inputs, &mut graph) {
                problems.push(d);
            }
        }
    }
    if problems.is_empty() {
        Ok(graph)
    } else {
        Err(problems)
    }
}

fn derive(
    config: &Config,
    id: &DrvId,
    inputs: &InputHashes,
    graph: &mut DrvGraph,
) -> Result<DrvHash, Diagnostic> {
    if let Some(node) = graph.nodes.get(id) {
        return Ok(node.hash);
    }
    let content = |path: &Path, at: &Origin| {
        inputs.get(path).copied().ok_or_else(|| {
            Diagnostic::new(
                format!("The file `{}` was not read before hashing", path.display()),
                at.clone(),
            )
        })
    };
    let (name, recipe, parent, make) = match id {
        DrvId::Image { image, arch } => {
            let img = &config.images[image];
            let (recipe, make) = match &img.source {
                ImageSource::Url { url, hash } => (
                    Recipe::FixedImage {
                        hash: hash.clone(),
                        format: img.format,
                    },
                    Make::Fetch {
                        url: url.value.clone(),
                        hash: hash.clone(),
                        format: img.format,
                    },
                ),
                ImageSource::Path { path, hash } => (
                    match hash {
                        Some(hash) => Recipe::FixedImage {
                            hash: hash.clone(),
                            format: img.format,
                        },
                        None => Recipe::LocalImage {
                            content: content(&path.value, &path.at)?,
                            format: img.format,
                        },
                    },
                    Make::Import {
                        path: path.value.clone(),
                        hash: hash.clone(),
                        format: img.format,
                    },
                ),
                ImageSource::Debian(spec) => {
                    let arch = arch.expect("Debian image ids carry an arch");
                    let packages: BTreeSet<String> = spec.packages.iter().cloned().collect();
                    let recipe = Recipe::DebianImage {
                        suite: spec.suite.clone(),
                        variant: spec.variant.clone(),
                        packages: packages.into_iter().collect(),
                        arch,
                        init: spec.init,
                        farm_parts: crate::model::build::debian_recipe::digest(arch, spec.init),
                    };
                    let make = Make::Debootstrap {
                        spec: spec.clone(),
                        arch,
                    };
                    (recipe, make)
                }
                ImageSource::Tiny => {
                    let arch = arch.expect("tiny image ids carry an arch");
                    let recipe = Recipe::TinyImage {
                        arch,
                        farm_parts: crate::model::build::tiny_recipe::digest(arch),
                    };
                    (recipe, Make::BuildTiny { arch })
                }
            };
            let name = match arch {
                Some(arch) => format!("{image}-{}", arch.debian_name()),
                None => image.clone(),
            };
            (name, recipe, None, make)
        }
        DrvId::Platform { platform, target } => {
            let p = &config.platforms[platform];
            let t = &config.targets[target];
            let parent_id = if config.platforms.contains_key(&p.from.value) {
                DrvId::Platform {
                    platform: p.from.value.clone(),
                    target: target.clone(),
                }
            } else {
                let image = &config.images[&p.from.value];
                DrvId::Image {
                    image: p.from.value.clone(),
                    arch: image.source.is_per_arch().then_some(t.arch),
                }
            };
            let parent_hash = derive(config, &parent_id, inputs, graph)?;
            let steps = &p.steps;
            let mut authorized_keys = steps
                .authorized_keys
                .iter()
                .map(|g| {
                    Ok(KeyInput {
                        user: g.user.clone(),
                        key: content(&g.key_file.value, &g.key_file.at)?,
                    })
                })
                .collect::<Result<Vec<_>, Diagnostic>>()?;
            authorized_keys.sort();
            authorized_keys.dedup();
            let packages: BTreeSet<String> = steps.packages.iter().cloned().collect();
            let files = steps
                .files
                .iter()
                .map(|(guest, local)| Ok((guest.clone(), content(&local.value, &local.at)?)))
                .collect::<Result<BTreeMap<_, _>, Diagnostic>>()?;
            let firmware = Some(crate::model::config::validate::firmware_of(
                config, platform, t.arch,
            ))
            .filter(|f| *f != Firmware::default_for(t.arch));
            let layer = LayerRecipe {
                parent: parent_hash,
                arch: t.arch,
                machine: t.machine.clone(),
                firmware,
                builder: steps.builder(),
                steps: StepInputs {
                    authorized_keys,
                    upgrade: steps.upgrade,
                    packages: packages.into_iter().collect(),
                    files,
                    run: steps.run.clone(),
                    playbook: match &steps.playbook {
                        Some(p) => Some(PlaybookInput {
                            playbook: content(&p.value, &p.at)?,
                            roles: inputs.get(&roles_dir(&p.value)).copied(),
                        }),
                        None => None,
                    },
                },
            };
            let make = match steps.count() {
                0 => Make::EmptyLayer,
                step_kinds => Make::Layer(Box::new(LayerMake {
                    platform: platform.clone(),
                    target: target.clone(),
                    step_kinds,
                    recipe: layer.clone(),
                })),
            };
            (
                format!("{platform}_{target}"),
                Recipe::Layer(layer),
                Some(parent_id),
                make,
            )
        }
    };
    let derivation = Derivation {
        format: FORMAT_VERSION,
        recipe,
    };
    let hash = derivation.hash();
    graph.nodes.insert(
        id.clone(),
        DrvNode {
            id: id.clone(),
            name,
            derivation,
            hash,
            parent,
            make,
        },
    );
    Ok(hash)
}
