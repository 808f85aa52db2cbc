//! Derivation hashes: pinned golden values (an accidental change to the encoding fails here),
//! and the properties farm's caching relies on.

use std::path::{Path, PathBuf};

use farm::config::{SourceFile, SourceKind, SourceMap, parse_sources};
use farm::model::build::derivation::{DrvGraph, DrvId, InputHashes, derive_all, wanted_platforms};
use farm::model::config::Config;
use farm::model::hash::ContentHash;

const BASE: &str = r#"
[images.deb]
url = "http://127.0.0.1/deb.qcow2"
sha256 = "1111111111111111111111111111111111111111111111111111111111111111"

[images.bookworm]
debian = { suite = "bookworm", packages = ["openssh-server", "linux-image-cloud-amd64"] }

[targets.amd64]
arch = "x86_64"

[platforms.base]
from = "deb"
memory = "1G"
authorized_keys = ["/keys/ci.pub"]
upgrade = true

[platforms.web]
from = "base"
packages = ["nginx", "curl"]
files = { "/etc/motd" = "/files/motd" }
run = ["systemctl enable nginx"]

[platforms.deb_tools]
from = "bookworm"
packages = ["qemu-utils"]
"#;

fn inputs(motd: &str) -> InputHashes {
    [
        (
            PathBuf::from("/keys/ci.pub"),
            ContentHash::of(b"ssh-ed25519 AAAA ci"),
        ),
        (
            PathBuf::from("/files/motd"),
            ContentHash::of(motd.as_bytes()),
        ),
    ]
    .into_iter()
    .collect()
}

fn config(text: &str) -> Config {
    let map = SourceMap::new(vec![SourceFile {
        path: PathBuf::from("/p/farm.toml"),
        text: text.to_string(),
    }]);
    let (config, _) = parse_sources(&map, &[SourceKind::Main], Some(Path::new("/home")))
        .unwrap_or_else(|d| panic!("{}", map.render_all(&d)));
    config
}

fn graph(text: &str, motd: &str) -> DrvGraph {
    let config = config(text);
    let map = SourceMap::new(vec![SourceFile {
        path: PathBuf::from("/p/farm.toml"),
        text: text.to_string(),
    }]);
    let (_, topology) = parse_sources(&map, &[SourceKind::Main], None).unwrap();
    let wanted = wanted_platforms(&config, &topology);
    derive_all(&config, &wanted, &inputs(motd)).unwrap()
}

fn hash_of(graph: &DrvGraph, entry_name: &str) -> String {
    graph
        .nodes
        .values()
        .find(|n| n.name == entry_name)
        .unwrap_or_else(|| panic!("no derivation named {entry_name}"))
        .hash
        .to_string()
}

/// If one of these changes, the encoding changed: every user's cache is invalidated.
/// Bump `FORMAT_VERSION` on purpose, then update the values.
#[test]
fn golden_hashes_are_stable() {
    let g = graph(BASE, "hello\n");
    let golden = [
        (
            "deb",
            "blake3-9624b8e44c137bfed7034dc7b7ccae530e2d23abf94777ecb0fab72040aa9d71",
        ),
        (
            "base_amd64",
            "blake3-9e85bf67fcd3f53f38025d1b7dec7029447336bc27c683f69655210de7d7f158",
        ),
        (
            "web_amd64",
            "blake3-9833b5fe8a0c153427d53c1347572965cd130e61623f27dfe0fcf40e8d138162",
        ),
    ];
    for (name, expected) in golden {
        assert_eq!(
            hash_of(&g, name),
            expected,
            "derivation hash of `{name}` changed"
        );
    }
}

/// Debian images also depend on what farm bakes in (agent, hooks), which changes with farm
/// itself: their hash is not pinned, but that input must be there.
#[test]
fn debian_images_depend_on_farms_own_parts() {
    let g = graph(BASE, "hello\n");
    let node = g
        .nodes
        .values()
        .find(|n| n.name == "bookworm-amd64")
        .unwrap();
    let text = String::from_utf8(node.derivation.canonical_bytes()).unwrap();
    let parts = farm::model::build::debian_recipe::digest(
        farm::model::values::Arch::X86_64,
        farm::model::config::DebianInit::Systemd,
    );
    assert!(
        text.contains(&format!("\"farm_parts\":\"{parts}\"")),
        "{text}"
    );
}

#[test]
fn canonical_encoding_sorts_keys_and_has_no_whitespace() {
    let g = graph(BASE, "hello\n");
    let node = g.nodes.values().find(|n| n.name == "web_amd64").unwrap();
    let text = String::from_utf8(node.derivation.canonical_bytes()).unwrap();
    assert!(
        text.starts_with("{\"arch\":\"x86_64\",\"format\":1,"),
        "{text}"
    );
    // Sorted keys and no whitespace between tokens: the text is exactly what a canonical
    // writer of its own value makes (spaces inside strings, such as a `run` command's, stay).
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(text, canonical_json(&value));
    assert!(text.contains("\"packages\":[\"curl\",\"nginx\"]"), "{text}");
}

/// JSON with object keys sorted and no whitespace between tokens, written here so the test does
/// not trust the encoder it checks.
fn canonical_json(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        serde_json::to_string(k).unwrap(),
                        canonical_json(&map[k])
                    )
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        serde_json::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", items.join(","))
        }
        scalar => serde_json::to_string(scalar).unwrap(),
    }
}

#[test]
fn unchanged_inputs_keep_their_hash_and_changed_file_content_changes_it() {
    let a = graph(BASE, "hello\n");
    let b = graph(BASE, "hello\n");
    let c = graph(BASE, "goodbye\n");
    assert_eq!(hash_of(&a, "web_amd64"), hash_of(&b, "web_amd64"));
    assert_ne!(hash_of(&a, "web_amd64"), hash_of(&c, "web_amd64"));
    // The parent does not depend on the child's files.
    assert_eq!(hash_of(&a, "base_amd64"), hash_of(&c, "base_amd64"));
}

#[test]
fn vm_sizing_and_source_urls_do_not_change_hashes() {
    let a = graph(BASE, "x");
    let resized = BASE.replace("memory = \"1G\"", "memory = \"4G\"\ncpus = 4");
    let moved = BASE.replace(
        "http://127.0.0.1/deb.qcow2",
        "http://127.0.0.1/mirror/deb.qcow2",
    );
    for variant in [resized, moved] {
        let b = graph(&variant, "x");
        for name in ["deb", "base_amd64", "web_amd64"] {
            assert_eq!(hash_of(&a, name), hash_of(&b, name), "{name}");
        }
    }
}

#[test]
fn package_order_does_not_matter_but_run_order_does() {
    let a = graph(BASE, "x");
    let reordered = graph(
        &BASE.replace("[\"nginx\", \"curl\"]", "[\"curl\", \"nginx\"]"),
        "x",
    );
    assert_eq!(hash_of(&a, "web_amd64"), hash_of(&reordered, "web_amd64"));
    let two_runs = BASE.replace(
        "run = [\"systemctl enable nginx\"]",
        "run = [\"echo a\", \"echo b\"]",
    );
    let swapped = BASE.replace(
        "run = [\"systemctl enable nginx\"]",
        "run = [\"echo b\", \"echo a\"]",
    );
    assert_ne!(
        hash_of(&graph(&two_runs, "x"), "web_amd64"),
        hash_of(&graph(&swapped, "x"), "web_amd64")
    );
}

#[test]
fn changing_a_parent_changes_every_descendant() {
    let a = graph(BASE, "x");
    let b = graph(&BASE.replace("upgrade = true", "upgrade = false"), "x");
    assert_eq!(hash_of(&a, "deb"), hash_of(&b, "deb"));
    assert_ne!(hash_of(&a, "base_amd64"), hash_of(&b, "base_amd64"));
    assert_ne!(hash_of(&a, "web_amd64"), hash_of(&b, "web_amd64"));
}

#[test]
fn closure_orders_parents_first() {
    let g = graph(BASE, "x");
    let web = DrvId::Platform {
        platform: "web".into(),
        target: "amd64".into(),
    };
    let names: Vec<&str> = g.closure(&[web]).iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["deb", "base_amd64", "web_amd64"]);
}

/// The tiny image is per architecture and keyed by what farm bakes into it; platforms on it
/// are ordinary layers.
/// `init = "busybox"` is part of the key; images that never say keep theirs (no `init` in
/// the encoding).
#[test]
fn a_debian_images_init_is_part_of_its_key() {
    let g = graph(BASE, "hello\n");
    let systemd = g
        .nodes
        .values()
        .find(|n| n.name == "bookworm-amd64")
        .unwrap();
    let encoded = String::from_utf8(systemd.derivation.canonical_bytes()).unwrap();
    assert!(!encoded.contains("\"init\""), "{encoded}");
    let busybox_text = BASE.replacen(
        "suite = \"bookworm\"",
        "suite = \"bookworm\", init = \"busybox\"",
        1,
    );
    assert_ne!(busybox_text, BASE);
    let g2 = graph(&busybox_text, "hello\n");
    let busybox = g2
        .nodes
        .values()
        .find(|n| n.name == "bookworm-amd64")
        .unwrap();
    let encoded = String::from_utf8(busybox.derivation.canonical_bytes()).unwrap();
    assert!(encoded.contains("\"init\":\"busybox\""), "{encoded}");
    assert_ne!(systemd.hash, busybox.hash);
}

#[test]
fn tiny_images_are_per_arch_and_depend_on_farms_own_parts() {
    let text = "[images.tiny]\ntiny = true\n[targets.amd64]\narch = \"x86_64\"\n\
                [platforms.small]\nfrom = \"tiny\"\nrun = [\"true\"]\n";
    let g = graph(text, "hello\n");
    let node = g.nodes.values().find(|n| n.name == "tiny-amd64").unwrap();
    let encoded = String::from_utf8(node.derivation.canonical_bytes()).unwrap();
    let parts = farm::model::build::tiny_recipe::digest(farm::model::values::Arch::X86_64);
    assert!(
        encoded.contains(&format!("\"farm_parts\":\"{parts}\"")),
        "{encoded}"
    );
    let layer = g.nodes.values().find(|n| n.name == "small_amd64").unwrap();
    assert_eq!(layer.derivation.parent(), Some(node.hash));
}

/// A chroot build is another output (no first boot happened in it): its key differs from
/// the booted build's, and saying `builder = "boot"` is the same as not saying.
#[test]
fn the_builder_is_part_of_a_layers_key_and_boot_is_the_default() {
    let plain = graph(BASE, "hello\n");
    let with = |builder: &str| {
        let text = BASE.replace(
            "[platforms.web]\nfrom = \"base\"\n",
            &format!("[platforms.web]\nfrom = \"base\"\nbuilder = \"{builder}\"\n"),
        );
        assert_ne!(text, BASE);
        graph(&text, "hello\n")
    };
    assert_eq!(
        hash_of(&with("boot"), "web_amd64"),
        hash_of(&plain, "web_amd64")
    );
    let chroot = with("chroot");
    assert_ne!(hash_of(&chroot, "web_amd64"), hash_of(&plain, "web_amd64"));
    // Only the platform that says so: its parent keeps its key.
    assert_eq!(
        hash_of(&chroot, "base_amd64"),
        hash_of(&plain, "base_amd64")
    );
}
