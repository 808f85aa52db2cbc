//! `farm.lock`: what each image and platform of a farm.toml was built from (its derivation
//! hash) and what it produced (its output hash), written by `farm build` beside farm.toml.
//!
//! With it, `farm build --locked` refuses to build anything the lock does not describe —
//! a CI job fails instead of quietly building a different lab — and says *what* changed:
//! every derivation field is recorded as a short hash, so a difference names the field
//! (`steps.packages`, `parent`) rather than only "the hash differs". Pure: reading and
//! writing the file is the caller's.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::build::derivation::{DrvId, DrvNode};
use crate::model::hash::{ContentHash, DrvHash};

/// The lock file format this farm writes and reads.
pub const LOCK_VERSION: u32 = 1;

/// The file name, beside farm.toml.
pub const LOCK_FILE: &str = "farm.lock";

const HEADER: &str = "\
# farm.lock: what `farm build` built from farm.toml — each derivation's hash and its output's.
# Written by `farm build`; checked by `farm build --locked` and `farm build --check`.
# Keep it in version control next to farm.toml. Do not edit it by hand.
";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    pub version: u32,
    /// By store name (`debian-bookworm-amd64`, `web_amd64`).
    #[serde(default)]
    pub derivations: BTreeMap<String, Locked>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locked {
    pub drv: DrvHash,
    /// blake3 of the disk it produced, when it has been built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<ContentHash>,
    /// Each top-level field of the derivation (one level into `steps`), as a short hash.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
}

impl Locked {
    pub fn of(node: &DrvNode, output: Option<ContentHash>) -> Locked {
        Locked {
            drv: node.hash,
            output,
            inputs: input_digests(node),
        }
    }
}

/// Field path → 16 hex characters of blake3 over the field's canonical JSON.
pub fn input_digests(node: &DrvNode) -> BTreeMap<String, String> {
    let value = serde_json::to_value(&node.derivation).expect("derivations serialize");
    let mut out = BTreeMap::new();
    if let serde_json::Value::Object(fields) = value {
        for (key, field) in fields {
            match field {
                serde_json::Value::Object(inner) if key == "steps" => {
                    for (sub, v) in inner {
                        out.insert(format!("{key}.{sub}"), digest(&v));
                    }
                }
                other => {
                    out.insert(key, digest(&other));
                }
            }
        }
    }
    out
}

fn digest(value: &serde_json::Value) -> String {
    let bytes = serde_json::to_vec(value).expect("JSON values encode");
    blake3::hash(&bytes).to_hex()[..16].to_string()
}

/// Why a derivation does not match the lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drift {
    /// The lock has no derivation of this name.
    NotLocked { id: DrvId, name: String },
    /// It differs; `fields` are the derivation fields that changed (`parent` when what it
    /// is built on changed).
    Changed {
        id: DrvId,
        name: String,
        fields: Vec<String>,
    },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::NotLocked { id, name } => {
                write!(f, "{} (`{name}`) is not in farm.lock", describe(id))
            }
            Drift::Changed { id, name, fields } => {
                write!(f, "{} (`{name}`) differs from farm.lock: ", describe(id))?;
                let said: Vec<String> = fields
                    .iter()
                    .map(|field| match field.as_str() {
                        "parent" => "what it is built on changed".to_string(),
                        other => format!("`{other}` changed"),
                    })
                    .collect();
                match said.is_empty() {
                    true => write!(f, "its derivation hash changed"),
                    false => write!(f, "{}", said.join(", ")),
                }
            }
        }
    }
}

/// "platform `web` for target `amd64`", "image `debian-bookworm`".
pub fn describe(id: &DrvId) -> String {
    match id {
        DrvId::Image { image, .. } => format!("image `{image}`"),
        DrvId::Platform { platform, target } => {
            format!("platform `{platform}` for target `{target}`")
        }
    }
}

/// The derivations among `nodes` that the lock does not describe exactly.
pub fn drift<'a>(lock: &LockFile, nodes: impl IntoIterator<Item = &'a DrvNode>) -> Vec<Drift> {
    let mut out = Vec::new();
    for node in nodes {
        match lock.derivations.get(&node.name) {
            None => out.push(Drift::NotLocked {
                id: node.id.clone(),
                name: node.name.clone(),
            }),
            Some(locked) if locked.drv == node.hash => {}
            Some(locked) => {
                let now = input_digests(node);
                let mut fields: Vec<String> = now
                    .iter()
                    .filter(|(k, v)| locked.inputs.get(*k) != Some(*v))
                    .map(|(k, _)| k.clone())
                    .chain(
                        locked
                            .inputs
                            .keys()
                            .filter(|k| !now.contains_key(*k))
                            .cloned(),
                    )
                    .collect();
                fields.sort();
                fields.dedup();
                out.push(Drift::Changed {
                    id: node.id.clone(),
                    name: node.name.clone(),
                    fields,
                });
            }
        }
    }
    out
}

/// The lock after a build: every derivation of the configuration with its output when the
/// store has it; one not in the store keeps what `old` recorded if its hash is unchanged.
/// Derivations no longer in farm.toml are dropped.
pub fn updated<'a>(
    old: Option<&LockFile>,
    nodes: impl IntoIterator<Item = &'a DrvNode>,
    output_of: impl Fn(&DrvNode) -> Option<ContentHash>,
) -> LockFile {
    let mut derivations = BTreeMap::new();
    for node in nodes {
        let output = output_of(node).or_else(|| {
            old.and_then(|o| o.derivations.get(&node.name))
                .filter(|l| l.drv == node.hash)
                .and_then(|l| l.output)
        });
        derivations.insert(node.name.clone(), Locked::of(node, output));
    }
    LockFile {
        version: LOCK_VERSION,
        derivations,
    }
}

/// A derivation built from its locked recipe whose output differs from the lock's: it is
/// not bit-reproducible (an `upgrade` step is not), worth a warning, not an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputDiffers {
    pub name: String,
    pub built: ContentHash,
    pub locked: ContentHash,
}

/// Which of `nodes` (just built under `--locked`) have an output other than `lock` records.
pub fn outputs_differ<'a>(
    lock: &LockFile,
    nodes: impl IntoIterator<Item = &'a DrvNode>,
    output_of: impl Fn(&DrvNode) -> Option<ContentHash>,
) -> Vec<OutputDiffers> {
    nodes
        .into_iter()
        .filter_map(|node| {
            let locked = lock.derivations.get(&node.name)?.output?;
            let built = output_of(node)?;
            (locked != built).then(|| OutputDiffers {
                name: node.name.clone(),
                built,
                locked,
            })
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum LockParseError {
    #[error("{0}")]
    Toml(String),
    #[error("it is lock format {found}; this farm reads {LOCK_VERSION}")]
    Version { found: u32 },
}

pub fn parse(text: &str) -> Result<LockFile, LockParseError> {
    let lock: LockFile = toml::from_str(text).map_err(|e| LockParseError::Toml(e.to_string()))?;
    if lock.version != LOCK_VERSION {
        return Err(LockParseError::Version {
            found: lock.version,
        });
    }
    Ok(lock)
}

pub fn render(lock: &LockFile) -> String {
    let body = toml::to_string(lock).expect("lock files serialize");
    format!("{HEADER}\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::build::derivation::{
        Derivation, FORMAT_VERSION, LayerMake, LayerRecipe, Make, Recipe, StepInputs,
    };
    use crate::model::values::Arch;

    fn layer(packages: &[&str], parent: u8) -> DrvNode {
        let recipe = LayerRecipe {
            parent: DrvHash([parent; 32]),
            arch: Arch::X86_64,
            machine: None,
            firmware: None,
            builder: Default::default(),
            steps: StepInputs {
                packages: packages.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            },
        };
        let make = Make::Layer(Box::new(LayerMake {
            platform: "web".into(),
            target: "amd64".into(),
            step_kinds: 1,
            recipe: recipe.clone(),
        }));
        let derivation = Derivation {
            format: FORMAT_VERSION,
            recipe: Recipe::Layer(recipe),
        };
        DrvNode {
            id: DrvId::Platform {
                platform: "web".into(),
                target: "amd64".into(),
            },
            name: "web_amd64".into(),
            hash: derivation.hash(),
            derivation,
            parent: None,
            make,
        }
    }

    #[test]
    fn round_trips_and_an_unchanged_derivation_does_not_drift() {
        let node = layer(&["curl"], 1);
        let lock = updated(None, [&node], |_| Some(ContentHash([9; 32])));
        let text = render(&lock);
        assert!(text.starts_with("# farm.lock"), "{text}");
        assert!(text.contains("[derivations.web_amd64]"), "{text}");
        assert_eq!(parse(&text).unwrap(), lock);
        assert!(drift(&lock, [&node]).is_empty());
    }

    #[test]
    fn a_changed_step_and_a_changed_parent_are_named() {
        let lock = updated(None, [&layer(&["curl"], 1)], |_| None);
        let changed = layer(&["curl", "htop"], 2);
        let drifts = drift(&lock, [&changed]);
        assert_eq!(
            drifts,
            [Drift::Changed {
                id: changed.id.clone(),
                name: "web_amd64".into(),
                fields: vec!["parent".into(), "steps.packages".into()],
            }]
        );
        assert_eq!(
            drifts[0].to_string(),
            "platform `web` for target `amd64` (`web_amd64`) differs from farm.lock: \
             what it is built on changed, `steps.packages` changed"
        );
        let missing = drift(&LockFile::default(), [&changed]);
        assert_eq!(
            missing[0].to_string(),
            "platform `web` for target `amd64` (`web_amd64`) is not in farm.lock"
        );
    }

    #[test]
    fn an_update_keeps_a_recorded_output_only_for_the_same_derivation() {
        let node = layer(&["curl"], 1);
        let old = updated(None, [&node], |_| Some(ContentHash([9; 32])));
        let kept = updated(Some(&old), [&node], |_| None);
        assert_eq!(
            kept.derivations["web_amd64"].output,
            Some(ContentHash([9; 32]))
        );
        let other = layer(&["vim"], 1);
        let fresh = updated(Some(&old), [&other], |_| None);
        assert_eq!(fresh.derivations["web_amd64"].output, None);
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        assert!(matches!(
            parse("version = 2\n"),
            Err(LockParseError::Version { found: 2 })
        ));
        assert!(parse("version = \n").is_err());
        assert!(parse("version = 1\nextra = 3\n").is_err());
    }
}
