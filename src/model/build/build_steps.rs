//! A platform layer's build as a list of steps (the shell each runs in the build VM and the
//! file it reads on stdin), and the key of the build disk after each prefix of them.
//!
//! Why keys per prefix: like a Dockerfile's lines, each step's result is kept as a
//! checkpoint (`crate::store::checkpoints`) under a key naming everything the disk depends
//! on at that point: the parent layer, the build VM's architecture, machine and firmware,
//! and every step so far, script and input bytes. Changing step N changes the keys of N and
//! what follows only, so a rebuild resumes from the checkpoint of step N-1.

use std::path::PathBuf;

use serde::Serialize;

use crate::model::build::derivation::{LayerRecipe, StepInputs};
use crate::model::config::Steps;
use crate::model::hash::{ContentHash, DrvHash};
use crate::model::shell::shell_quote;
use crate::model::values::{Arch, Builder, Firmware};

/// One step as the build VM runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildStep {
    /// How progress and errors name it (`run[0] \`make\``).
    pub label: String,
    /// The shell script, run as root.
    pub script: String,
    /// A local file given on stdin, with the content hash the derivation recorded.
    pub stdin: Option<StepInput>,
    /// An Ansible playbook farm runs on this machine against the build VM, instead of
    /// `script` in the guest.
    pub playbook: Option<StepInput>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepInput {
    pub path: PathBuf,
    pub hash: ContentHash,
}

/// apt's settings for unattended runs; `--force-confold` keeps the image's config files.
/// No translated descriptions: `update` would fetch and index ~6 MB of them for Debian
/// alone, and the layer's cleanup removes the package lists anyway.
const APT: &str = "export DEBIAN_FRONTEND=noninteractive; APT='apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold -o Acquire::Languages=none'";

/// The steps in the documented order: the root filesystem grown to the build disk, keys,
/// upgrade, packages, files, run. apt is required; dnf and apk are used when apt-get is
/// missing.
pub fn build_steps(platform: &Steps, inputs: &StepInputs) -> Vec<BuildStep> {
    let grow = match platform.builder() {
        // Images farm builds have ext4 directly on /dev/vda; cloud images grow themselves.
        Builder::Boot => {
            "if [ \"$(findmnt -no SOURCE /)\" = /dev/vda ] && command -v resize2fs >/dev/null; then resize2fs /dev/vda; fi"
        }
        // Nothing of the image runs in a chroot build, cloud-init's growpart neither.
        Builder::Chroot => crate::model::build::chroot::GROW_SCRIPT,
    };
    let mut out = vec![BuildStep {
        label: "grow root filesystem".into(),
        script: grow.into(),
        stdin: None,
        playbook: None,
    }];
    // The home from /etc/passwd with awk, and adduser where there is no useradd: busybox
    // images (farm's tiny image) have neither getent nor useradd.
    for (grant, key) in platform.authorized_keys.iter().zip(&inputs.authorized_keys) {
        let user = shell_quote(&grant.user);
        out.push(BuildStep {
            label: format!("authorized_keys for {}", grant.user),
            script: format!(
                "set -e; id -u {user} >/dev/null 2>&1 || useradd -m -s /bin/sh {user} 2>/dev/null || adduser -D -s /bin/sh {user}; \
                 home=$(awk -F: -v u={user} '$1 == u {{ print $6 }}' /etc/passwd); \
                 [ -n \"$home\" ] || {{ echo \"no home directory for {user} in /etc/passwd\" >&2; exit 1; }}; mkdir -p \"$home/.ssh\"; \
                 cat >> \"$home/.ssh/authorized_keys\"; \
                 chown -R {user}: \"$home/.ssh\"; chmod 700 \"$home/.ssh\"; chmod 600 \"$home/.ssh/authorized_keys\""
            ),
            stdin: Some(StepInput {
                path: grant.key_file.value.clone(),
                hash: key.key,
            }),
            playbook: None,
        });
    }
    if inputs.upgrade {
        out.push(BuildStep {
            label: "upgrade".into(),
            script: format!(
                "set -e; if command -v apt-get >/dev/null; then {APT}; $APT update && $APT dist-upgrade; \
                 elif command -v dnf >/dev/null; then dnf -y upgrade; \
                 elif command -v apk >/dev/null; then apk upgrade --update; \
                 else echo 'no supported package manager (apt-get, dnf, apk)' >&2; exit 127; fi"
            ),
            stdin: None,
            playbook: None,
        });
    }
    if !inputs.packages.is_empty() {
        let list: Vec<String> = inputs.packages.iter().map(|p| shell_quote(p)).collect();
        let list = list.join(" ");
        out.push(BuildStep {
            label: format!("packages ({})", inputs.packages.join(", ")),
            script: format!(
                "set -e; if command -v apt-get >/dev/null; then {APT}; $APT update && $APT install --no-install-recommends {list}; \
                 elif command -v dnf >/dev/null; then dnf -y install {list}; \
                 elif command -v apk >/dev/null; then apk add --update {list}; \
                 else echo 'no supported package manager (apt-get, dnf, apk)' >&2; exit 127; fi"
            ),
            stdin: None,
            playbook: None,
        });
    }
    for ((guest, local), hash) in platform.files.iter().zip(inputs.files.values()) {
        let path = shell_quote(guest);
        out.push(BuildStep {
            label: format!("file {guest}"),
            script: format!("set -e; mkdir -p \"$(dirname {path})\"; cat > {path}"),
            stdin: Some(StepInput {
                path: local.value.clone(),
                hash: *hash,
            }),
            playbook: None,
        });
    }
    for (i, command) in inputs.run.iter().enumerate() {
        out.push(BuildStep {
            label: format!("run[{i}] `{command}`"),
            script: format!("sh -ec {}", shell_quote(command)),
            stdin: None,
            playbook: None,
        });
    }
    if let (Some(local), Some(input)) = (&platform.playbook, &inputs.playbook) {
        let name = local
            .value
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        out.push(BuildStep {
            label: format!("playbook {name}"),
            // Not run: it names the roles tree, so a changed role changes the step's key.
            script: format!(
                "ansible-playbook {name} (roles {})",
                input
                    .roles
                    .map_or_else(|| "none".to_string(), |r| r.to_hex())
            ),
            stdin: None,
            playbook: Some(StepInput {
                path: local.value.clone(),
                hash: input.playbook,
            }),
        });
    }
    out
}

/// What the build disk depends on besides the steps.
#[derive(Serialize)]
struct BuildBase<'a> {
    parent: DrvHash,
    arch: Arch,
    machine: &'a Option<String>,
    firmware: &'a Option<Firmware>,
    /// Absent for `boot`, so the keys of checkpoints kept before it existed stay valid.
    #[serde(skip_serializing_if = "Builder::is_boot")]
    builder: Builder,
}

/// Bumped when the way checkpoints are taken changes, so old ones are never resumed from.
const KEY_CONTEXT: &str = "farm 2026-11 build step checkpoint v1";

/// The key of the build disk after each step of `steps` (one key per step, in order), for
/// a layer `recipe`. A key covers its step and every step before it.
pub fn checkpoint_keys(recipe: &LayerRecipe, steps: &[BuildStep]) -> Vec<ContentHash> {
    let base = BuildBase {
        parent: recipe.parent,
        arch: recipe.arch,
        machine: &recipe.machine,
        firmware: &recipe.firmware,
        builder: recipe.builder,
    };
    let mut hasher = blake3::Hasher::new_derive_key(KEY_CONTEXT);
    hasher.update(&serde_json::to_vec(&base).expect("the build base serializes"));
    let mut keys = Vec::with_capacity(steps.len());
    for step in steps {
        let field = |h: &mut blake3::Hasher, bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(&mut hasher, step.label.as_bytes());
        field(&mut hasher, step.script.as_bytes());
        let input = step
            .stdin
            .as_ref()
            .map(|s| s.hash.to_hex())
            .unwrap_or_default();
        field(&mut hasher, input.as_bytes());
        // Each key is the running hash so far: a prefix's key never depends on what follows.
        let key = ContentHash::from_blake3(hasher.clone().finalize());
        keys.push(key);
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(run: &[&str], parent: u8) -> (LayerRecipe, Vec<BuildStep>) {
        let inputs = StepInputs {
            upgrade: true,
            packages: vec!["curl".into()],
            run: run.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let recipe = LayerRecipe {
            parent: DrvHash([parent; 32]),
            arch: Arch::X86_64,
            machine: None,
            firmware: None,
            builder: Builder::Boot,
            steps: inputs.clone(),
        };
        (recipe, build_steps(&Steps::default(), &inputs))
    }

    #[test]
    fn steps_come_in_the_documented_order() {
        let (_, steps) = layer(&["make", "make install"], 1);
        let labels: Vec<&str> = steps.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "grow root filesystem",
                "upgrade",
                "packages (curl)",
                "run[0] `make`",
                "run[1] `make install`"
            ]
        );
    }

    #[test]
    fn a_playbook_comes_last_and_its_roles_are_in_its_key() {
        use crate::model::build::derivation::PlaybookInput;
        use crate::model::config::Located;
        let platform = Steps {
            playbook: Some(Located::new(
                PathBuf::from("ansible/site.yml"),
                crate::model::config::Origin::default(),
            )),
            ..Default::default()
        };
        let with_roles = |roles: u8| {
            let inputs = StepInputs {
                run: vec!["true".into()],
                playbook: Some(PlaybookInput {
                    playbook: ContentHash([7; 32]),
                    roles: Some(ContentHash([roles; 32])),
                }),
                ..Default::default()
            };
            let recipe = LayerRecipe {
                parent: DrvHash([1; 32]),
                arch: Arch::X86_64,
                machine: None,
                firmware: None,
                builder: Builder::Boot,
                steps: inputs.clone(),
            };
            let steps = build_steps(&platform, &inputs);
            (checkpoint_keys(&recipe, &steps), steps)
        };
        let (keys, steps) = with_roles(1);
        assert_eq!(steps.last().unwrap().label, "playbook site.yml");
        assert_eq!(
            steps.last().unwrap().playbook.as_ref().unwrap().hash,
            ContentHash([7; 32])
        );
        let (other, _) = with_roles(2);
        assert_eq!(keys[..2], other[..2]);
        assert_ne!(keys[2], other[2]);
    }

    #[test]
    fn changing_a_step_changes_its_key_and_the_keys_after_it_only() {
        let (recipe, steps) = layer(&["make", "make install"], 1);
        let keys = checkpoint_keys(&recipe, &steps);
        assert_eq!(keys.len(), steps.len());
        let (recipe2, steps2) = layer(&["make", "make check"], 1);
        let keys2 = checkpoint_keys(&recipe2, &steps2);
        assert_eq!(keys[..4], keys2[..4]);
        assert_ne!(keys[4], keys2[4]);
        // An appended step keeps every key before it.
        let (recipe3, steps3) = layer(&["make", "make install", "true"], 1);
        assert_eq!(keys[..], checkpoint_keys(&recipe3, &steps3)[..5]);
        // Another parent changes them all.
        let (recipe4, steps4) = layer(&["make", "make install"], 2);
        let keys4 = checkpoint_keys(&recipe4, &steps4);
        assert!(keys.iter().zip(&keys4).all(|(a, b)| a != b));
    }
}
