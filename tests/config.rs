//! farm.toml parsing and validation: the seed's topology, and each error as a named case
//! asserting its message and the line it points at.

use std::path::{Path, PathBuf};

use farm::config::{SourceFile, SourceKind, SourceMap, parse_sources};
use farm::model::topology::{Placement, Topology};

const IMAGE: &str = r#"
[images.deb]
url = "http://127.0.0.1/deb.qcow2"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"

[targets.amd64]
arch = "x86_64"
"#;

fn sources(files: &[(&str, SourceKind, &str)]) -> (SourceMap, Vec<SourceKind>) {
    let map = SourceMap::new(
        files
            .iter()
            .map(|(path, _, text)| SourceFile {
                path: PathBuf::from(path),
                text: text.to_string(),
            })
            .collect(),
    );
    (map, files.iter().map(|(_, k, _)| *k).collect())
}

fn parse(text: &str) -> Result<Topology, String> {
    parse_files(&[("farm.toml", SourceKind::Main, text)])
}

fn parse_files(files: &[(&str, SourceKind, &str)]) -> Result<Topology, String> {
    let (map, kinds) = sources(files);
    parse_sources(&map, &kinds, Some(Path::new("/home/u")))
        .map(|(_, topology)| topology)
        .map_err(|d| map.render_all(&d))
}

/// The rendered error, checked to contain `message` and to point at `farm.toml:line:`.
fn assert_error(text: &str, message: &str, line: usize) -> String {
    let rendered = parse(text).expect_err("the configuration must be rejected");
    assert!(
        rendered.contains(message),
        "expected `{message}` in:\n{rendered}"
    );
    assert!(
        rendered.contains(&format!("--> farm.toml:{line}:")),
        "expected line {line} in:\n{rendered}"
    );
    rendered
}

const SEED: &str = r#"
[images.debian-bookworm]
debian = { suite = "bookworm" }

[targets.amd64]
arch = "x86_64"

[platforms.debian_vs]
from = "debian-bookworm"
upgrade = true
packages = ["qemu-system-x86", "qemu-utils", "vde2"]
memory = "2G"

[platforms.debian_vs_user]
from = "debian-bookworm"

[platforms.debian_vs_vde]
from = "debian-bookworm"

[networks.lab]
kind = "vde"
url = "vxvde://234.0.0.1"
subnet = "10.0.0.0/24"

[hosts.L0]
deploy = { targets = ["amd64"], platforms = ["debian_vs"] }

[vms.debian_vs_amd64]
ssh_port = 2201
attach = { lab = "10.0.0.254/24" }
deploy = { targets = ["amd64"], platforms = ["debian_vs_vde", "debian_vs_user"] }

[vms.debian_vs_user_amd64]
ssh_port = 2202

[vms.debian_vs_vde_amd64]
user_network = false
nics = [{ network = "lab", ip = "10.0.0.21/24" }]
"#;

#[test]
fn seed_topology_expands_permutations_into_nested_vms() {
    let topology = parse(SEED).unwrap();
    let names: Vec<&String> = topology.vms.keys().collect();
    assert_eq!(
        names,
        [
            "debian_vs_amd64",
            "debian_vs_user_amd64",
            "debian_vs_vde_amd64"
        ]
    );
    let l1 = &topology.vms["debian_vs_amd64"];
    assert_eq!(l1.placement, Placement::Host("L0".into()));
    assert_eq!(
        (l1.level, l1.ssh_port, l1.is_hypervisor),
        (1, Some(2201), true)
    );
    assert_eq!(l1.resources.memory.unwrap().mib(), 2048);
    assert_eq!(l1.hostname, "debian-vs-amd64");
    let vde = &topology.vms["debian_vs_vde_amd64"];
    assert_eq!(vde.placement, Placement::Vm("debian_vs_amd64".into()));
    assert_eq!(vde.level, 2);
    assert!(!vde.user_network);
    assert_eq!(vde.nics[0].ip.unwrap().to_string(), "10.0.0.21/24");
    assert_eq!(
        topology.chain("debian_vs_user_amd64"),
        [
            Placement::Host("L0".into()),
            Placement::Vm("debian_vs_amd64".into())
        ]
    );
}

#[test]
fn platforms_and_images_may_live_in_their_own_files() {
    let main = "[targets.amd64]\narch = \"x86_64\"\n[vms.web]\nplatform = \"web\"\n";
    let topology = parse_files(&[
        ("farm.toml", SourceKind::Main, main),
        (
            "images/deb.toml",
            SourceKind::Image,
            "debian = { suite = \"bookworm\" }\n",
        ),
        (
            "platforms/web.toml",
            SourceKind::Platform,
            "from = \"deb\"\npackages = [\"nginx\"]\n",
        ),
    ])
    .unwrap();
    let web = &topology.vms["web"];
    assert_eq!(web.placement, Placement::Host("local".into()));
    assert_eq!(web.target, "amd64");
}

#[test]
fn unknown_key_is_rejected_with_its_line() {
    let text = format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\nmemroy = \"2G\"\n");
    assert_error(&text, "Unknown field `memroy`", 11);
}

#[test]
fn unknown_top_level_table_is_rejected() {
    assert_error("[imagez.x]\nurl = \"u\"\n", "Unknown field `imagez`", 1);
}

#[test]
fn toml_syntax_error_points_at_the_line() {
    assert_error("[targets.amd64]\narch = \"x86_64\n", "string", 2);
}

#[test]
fn from_an_undefined_image_is_rejected_with_a_hint() {
    let text = format!("{IMAGE}\n[platforms.p]\nfrom = \"debain\"\n");
    let rendered = assert_error(
        &text,
        "Platform `p` is built `from` `debain`, which is neither an image nor a platform",
        10,
    );
    assert!(rendered.contains("hint: images: `deb`"), "{rendered}");
}

#[test]
fn from_cycle_is_rejected() {
    let text = format!(
        "{IMAGE}\n[platforms.a]\nfrom = \"b\"\n[platforms.b]\nfrom = \"c\"\n[platforms.c]\nfrom = \"a\"\n"
    );
    assert_error(
        &text,
        "Platforms build `from` each other in a cycle: a → b → c → a",
        10,
    );
}

#[test]
fn deploy_of_an_undefined_platform_is_rejected() {
    let text = format!(
        "{IMAGE}\n[hosts.L0]\ndeploy = {{ targets = [\"amd64\"], platforms = [\"nope\"] }}\n"
    );
    assert_error(
        &text,
        "Host `L0` deploys the platform `nope`, which is not defined",
        10,
    );
}

#[test]
fn deploy_on_an_undefined_target_is_rejected() {
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[hosts.L0]\ndeploy = {{ targets = [\"arm\"], platforms = [\"p\"] }}\n"
    );
    let rendered = assert_error(
        &text,
        "Host `L0` deploys the target `arm`, which is not defined",
        12,
    );
    assert!(
        rendered.contains("add a `[targets.arm]` table"),
        "{rendered}"
    );
}

#[test]
fn nic_on_an_undefined_network_is_rejected() {
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nnics = [{{ network = \"lan\" }}]\n"
    );
    assert_error(
        &text,
        "A NIC of VM `a` refers to the network `lan`, which is not defined",
        13,
    );
}

#[test]
fn vm_on_an_undefined_host_is_rejected() {
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[hosts.L0]\n[vms.a]\nplatform = \"p\"\nhost = \"L9\"\n"
    );
    assert_error(
        &text,
        "VM `a` runs on `L9`, which is neither a host nor a VM",
        14,
    );
}

#[test]
fn vm_without_platform_or_deploy_is_rejected() {
    let text = format!("{IMAGE}\n[vms.lonely]\nssh_port = 2200\n");
    assert_error(
        &text,
        "VM `lonely` is not generated by any `deploy` and names no `platform`",
        9,
    );
}

#[test]
fn duplicate_vm_names_from_two_deploys_are_rejected() {
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[hosts.L0]\ndeploy = {{ targets = [\"amd64\"], platforms = [\"p\"] }}\n[hosts.L1]\ndeploy = {{ targets = [\"amd64\"], platforms = [\"p\"] }}\n"
    );
    let rendered = assert_error(&text, "The VM `p_amd64` is generated twice", 12);
    assert!(rendered.contains("first generated here"), "{rendered}");
}

#[test]
fn duplicate_definition_across_files_is_rejected() {
    let main = format!("{IMAGE}\n[platforms.web]\nfrom = \"deb\"\n");
    let rendered = parse_files(&[
        ("farm.toml", SourceKind::Main, &main),
        (
            "platforms/web.toml",
            SourceKind::Platform,
            "from = \"deb\"\n",
        ),
    ])
    .unwrap_err();
    assert!(
        rendered.contains("The platform `web` is defined twice"),
        "{rendered}"
    );
    assert!(
        rendered.contains("--> platforms/web.toml:1:1"),
        "{rendered}"
    );
    assert!(rendered.contains("--> farm.toml:9:"), "{rendered}");
}

#[test]
fn two_vms_forwarding_the_same_port_on_one_hypervisor_are_rejected() {
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[platforms.q]\nfrom = \"deb\"\n[hosts.L0]\ndeploy = {{ targets = [\"amd64\"], platforms = [\"p\", \"q\"] }}\n[vms.p_amd64]\nssh_port = 2201\n[vms.q_amd64]\nssh_port = 2201\n"
    );
    let rendered = assert_error(
        &text,
        "Port 2201 on `L0` is forwarded to both `p_amd64` and `q_amd64`",
        18,
    );
    assert!(rendered.contains("`p_amd64` takes it here"), "{rendered}");
}

#[test]
fn same_port_on_different_hypervisors_is_fine() {
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[platforms.q]\nfrom = \"deb\"\n[hosts.L0]\ndeploy = {{ targets = [\"amd64\"], platforms = [\"p\"] }}\n[vms.p_amd64]\nssh_port = 2201\ndeploy = {{ targets = [\"amd64\"], platforms = [\"q\"] }}\n[vms.q_amd64]\nssh_port = 2201\n"
    );
    parse(&text).unwrap();
}

#[test]
fn malformed_size_is_rejected() {
    let text = format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\nmemory = \"2 gigs\"\n");
    assert_error(&text, "Invalid size `2 gigs`", 11);
}

#[test]
fn malformed_cidr_is_rejected() {
    let text = format!("{IMAGE}\n[networks.lab]\nkind = \"vde\"\nsubnet = \"10.0.0.0\"\n");
    assert_error(
        &text,
        "Invalid address `10.0.0.0`: expected CIDR notation",
        11,
    );
}

#[test]
fn malformed_ip_in_a_nic_is_rejected() {
    let text = format!(
        "{IMAGE}\n[networks.lab]\nkind = \"vde\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nnics = [{{ network = \"lab\", ip = \"10.0.0.300/24\" }}]\n"
    );
    assert_error(&text, "`10.0.0.300` is not an IP address", 15);
}

#[test]
fn malformed_mac_is_rejected() {
    let text = format!(
        "{IMAGE}\n[networks.lab]\nkind = \"vde\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nnics = [{{ network = \"lab\", mac = \"52:54:00\" }}]\n"
    );
    assert_error(&text, "Invalid MAC address `52:54:00`", 15);
}

#[test]
fn malformed_hash_is_rejected() {
    let text = "[images.deb]\nurl = \"http://127.0.0.1/x\"\nsha512 = \"abc123\"\n";
    assert_error(
        text,
        "Image `deb` has a malformed sha512: A sha512 digest has 128 hex characters, this one has 6",
        3,
    );
}

#[test]
fn download_without_a_hash_is_rejected() {
    let rendered = assert_error(
        "[images.deb]\nurl = \"http://127.0.0.1/x\"\n",
        "Image `deb` is downloaded from a URL but declares no hash",
        2,
    );
    assert!(rendered.contains("hint: add `sha256"), "{rendered}");
}

#[test]
fn image_with_two_sources_is_rejected() {
    assert_error(
        "[images.deb]\nurl = \"http://127.0.0.1/x\"\npath = \"x.qcow2\"\n",
        "Image `deb` must have exactly one source",
        3,
    );
}

#[test]
fn tiny_false_is_no_source_at_all() {
    let rendered = assert_error(
        "[images.small]\ntiny = false\n",
        "Image `small` must have exactly one source: `url`, `path`, `debian` or `tiny = true`",
        1,
    );
    assert!(rendered.contains("hint:"), "{rendered}");
}

#[test]
fn address_outside_the_network_subnet_is_rejected() {
    let text = format!(
        "{IMAGE}\n[networks.lab]\nkind = \"vde\"\nsubnet = \"10.0.0.0/24\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nnics = [{{ network = \"lab\", ip = \"10.1.0.5/24\" }}]\n"
    );
    assert_error(
        &text,
        "Address 10.1.0.5/24 is outside the subnet 10.0.0.0/24 of network `lab`",
        16,
    );
}

#[test]
fn duplicate_address_on_a_network_is_rejected() {
    let text = format!(
        "{IMAGE}\n[networks.lab]\nkind = \"vde\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nnics = [{{ network = \"lab\", ip = \"10.0.0.5/24\" }}]\n[vms.b]\nplatform = \"p\"\nnics = [{{ network = \"lab\", ip = \"10.0.0.5/24\" }}]\n"
    );
    assert_error(&text, "Address 10.0.0.5 is used twice on network `lab`", 18);
}

#[test]
fn image_for_another_architecture_is_rejected() {
    let text = "[images.deb]\nurl = \"http://127.0.0.1/x\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\narch = \"aarch64\"\n[targets.amd64]\narch = \"x86_64\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\n";
    assert_error(
        text,
        "VM `a` runs platform `p` on target `amd64` (x86_64), but its image `deb` is for aarch64",
        9,
    );
}

#[test]
fn invalid_names_are_rejected() {
    assert_error(
        "[targets.\"amd 64\"]\narch = \"x86_64\"\n",
        "The target name `amd 64` is not allowed",
        1,
    );
}

#[test]
fn unknown_arch_is_rejected() {
    assert_error(
        "[targets.t]\narch = \"sparc\"\n",
        "Unknown variant `sparc`",
        2,
    );
}

#[test]
fn three_level_nesting_is_expressible() {
    let text = format!(
        "{IMAGE}\n[platforms.hv]\nfrom = \"deb\"\n[platforms.tiny]\nfrom = \"deb\"\n\
         [hosts.L0]\ndeploy = {{ targets = [\"amd64\"], platforms = [\"hv\"] }}\n\
         [vms.hv_amd64]\nssh_port = 2201\n\
         [vms.l2]\nplatform = \"hv\"\nhost = \"hv_amd64\"\nssh_port = 2301\ndeploy = {{ targets = [\"amd64\"], platforms = [\"tiny\"] }}\n"
    );
    let topology = parse(&text).unwrap();
    assert_eq!(topology.vms["tiny_amd64"].level, 3);
    assert_eq!(
        topology.chain("tiny_amd64"),
        [
            Placement::Host("L0".into()),
            Placement::Vm("hv_amd64".into()),
            Placement::Vm("l2".into())
        ]
    );
    assert!(topology.vms["l2"].is_hypervisor);
}

#[test]
fn errors_are_all_reported_at_once() {
    let text = format!("{IMAGE}\n[platforms.a]\nfrom = \"nope\"\n[platforms.b]\nfrom = \"nada\"\n");
    let rendered = parse(&text).unwrap_err();
    assert!(rendered.contains("2 problems found"), "{rendered}");
}

/// A `[vms.NAME]` table may refine a VM that a standalone VM's `deploy` generates: it waits
/// for that deploy instead of being reported as lacking a platform.
#[test]
fn a_table_for_a_vm_generated_by_a_standalone_hypervisor_merges() {
    let text = format!(
        "{IMAGE}\n[platforms.hv]\nfrom = \"deb\"\n[platforms.leaf]\nfrom = \"deb\"\n\
         [vms.hv]\nplatform = \"hv\"\ndeploy = {{ targets = [\"amd64\"], platforms = [\"leaf\"] }}\n\
         [vms.leaf_amd64]\nhostname = \"deep-leaf\"\n"
    );
    let topology = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let leaf = &topology.vms["leaf_amd64"];
    assert_eq!(leaf.hostname, "deep-leaf");
    assert_eq!(leaf.level, 2);
}

#[test]
fn vde_only_vm_without_an_attached_address_is_rejected() {
    // `lab` is not attached by the host, so nothing could reach `a`.
    let text = format!(
        "{IMAGE}\n[networks.lab]\nkind = \"vde\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nuser_network = false\nnics = [{{ network = \"lab\", ip = \"10.0.0.5/24\" }}]\n"
    );
    let rendered = assert_error(
        &text,
        "VM `a` has no user networking and no static address on a network `local` attaches",
        13,
    );
    assert!(
        rendered.contains("hint: attach `local` to `lab`"),
        "{rendered}"
    );
}

#[test]
fn a_switched_network_on_two_hosts_is_rejected() {
    let text = format!(
        "{IMAGE}\n[networks.lab]\nkind = \"vde\"\n[platforms.p]\nfrom = \"deb\"\n[vms.hv]\nplatform = \"p\"\nnics = [{{ network = \"lab\" }}]\n[vms.inner]\nplatform = \"p\"\nhost = \"hv\"\nnics = [{{ network = \"lab\" }}]\n"
    );
    let rendered = assert_error(
        &text,
        "Network `lab` is a switch farm runs on one host, but `hv` (on `local`) and `inner` (on `hv`) both use it",
        9,
    );
    assert!(rendered.contains("vxvde"), "{rendered}");
}

#[test]
fn attach_on_a_vm_that_runs_no_vms_is_rejected() {
    let text = format!(
        "{IMAGE}\n[networks.lab]\nkind = \"vde\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nattach = {{ lab = \"10.0.0.1/24\" }}\n"
    );
    let rendered = assert_error(&text, "VM `a` attaches to `lab` but runs no VMs", 15);
    assert!(rendered.contains("give it a NIC"), "{rendered}");
}

#[test]
fn malformed_remote_host_address_is_rejected_at_its_line() {
    let text = format!(
        "{IMAGE}\n[hosts.lab]\naddress = \"root@server:ssh\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nhost = \"lab\"\n"
    );
    assert_error(
        &text,
        "Invalid host address `root@server:ssh`: `ssh` is not a port number",
        10,
    );
}

#[test]
fn remote_host_settings_need_an_address_and_an_absolute_root() {
    let text = format!(
        "{IMAGE}\n[hosts.here]\nidentity_file = \"key\"\n[hosts.lab]\naddress = \"server\"\nroot = \"farm\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nhost = \"lab\"\n"
    );
    let rendered = assert_error(
        &text,
        "Host `here` has `identity_file` but no `address`",
        10,
    );
    assert!(
        rendered.contains("hint: add `address = \"user@server\"` to `[hosts.here]`"),
        "{rendered}"
    );
    assert!(
        rendered.contains("Host `lab` has a relative `root` `farm`")
            && rendered.contains("--> farm.toml:13:"),
        "{rendered}"
    );
}

#[test]
fn remote_host_named_like_a_vm_is_rejected() {
    let text = format!(
        "{IMAGE}\n[hosts.a]\naddress = \"server\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nhost = \"a\"\n"
    );
    assert_error(
        &text,
        "Host `a` has the same name as a VM; both would be `a` in the generated ssh_config",
        9,
    );
}
