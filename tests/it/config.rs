//! farm.toml parsing and validation: the seed's topology, and each error as a named case
//! asserting its message and the line it points at.

use std::path::{Path, PathBuf};

use farm::config::{SourceFile, SourceKind, SourceMap, parse_sources};
use farm::model::config::topology::{Placement, Topology};

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
fn firmware_is_only_for_images_with_their_own_bootloader() {
    let rendered = assert_error(
        "[images.deb]\ndebian = { suite = \"bookworm\" }\nfirmware = \"uefi\"\n",
        "Image `deb` is one farm builds, which boots its kernel directly: `firmware` does not apply",
        3,
    );
    assert!(rendered.contains("hint: `firmware` is for images with their own bootloader"));
    assert_error(
        "[images.cloud]\nurl = \"http://127.0.0.1/x.qcow2\"\nsha256 = \"00\"\nfirmware = \"coreboot\"\n",
        "Unknown variant `coreboot`, expected `bios` or `uefi`",
        4,
    );
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
    let long = "v".repeat(65);
    let said = assert_error(
        &format!("[targets.{long}]\narch = \"x86_64\"\n"),
        &format!("The target name `{long}` is not allowed: it has 65 characters"),
        1,
    );
    assert!(said.contains("at most 64 characters"), "{said}");
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

// ---- What `farm check` refuses: one named case per class, with message, line and hint.

/// [`assert_error`] that also checks the hint.
fn assert_refused(text: &str, message: &str, line: usize, hint: &str) {
    let rendered = assert_error(text, message, line);
    // The hint is on its own `hint:` line, not merely somewhere in the message.
    assert!(
        rendered
            .lines()
            .any(|l| l.trim_start().starts_with("hint:") && l.contains(hint)),
        "expected hint `{hint}` on a `hint:` line in:\n{rendered}"
    );
}

/// IMAGE, a platform `p` and a VM `a` on it, with `vm` appended to its table (line 13 on).
fn vm_with(vm: &str) -> String {
    format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\n{vm}\n")
}

#[test]
fn a_bare_number_as_memory_is_refused_rather_than_read_as_bytes() {
    assert_refused(
        &vm_with("memory = \"1024\""),
        "`memory = 1024` has no unit",
        13,
        "write `memory = \"1024M\"`",
    );
    assert_refused(
        &vm_with("memory = 1024"),
        "`memory = 1024` has no unit",
        13,
        "1024M",
    );
    assert_refused(
        &vm_with("memory = \"0\""),
        "`memory = 0` has no unit",
        13,
        "M",
    );
}

#[test]
fn sizes_and_counts_out_of_bounds_are_refused() {
    assert_refused(
        &vm_with("memory = \"100T\""),
        "`memory = \"100T\"` is more than a VM can use",
        13,
        "memory goes from 64M to 16T",
    );
    assert_refused(
        &vm_with("disk_size = \"1K\""),
        "`disk_size = \"1K\"` is less than a VM can use",
        13,
        "disk_size goes from 64M to 64T",
    );
    assert_refused(
        &vm_with("cpus = 0"),
        "`cpus = 0` is not a number of vCPUs a VM can have",
        13,
        "cpus goes from 1 to 255",
    );
    assert_refused(
        &vm_with("cpus = 100000"),
        "`cpus = 100000` is not a number of vCPUs",
        13,
        "cpus goes from 1 to 255",
    );
    let platform = format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\nmemory = \"64K\"\n");
    assert_refused(&platform, "`memory = \"64K\"` is less than", 11, "64M");
}

#[test]
fn port_zero_is_refused() {
    assert_refused(
        &vm_with("ssh_port = 0"),
        "`ssh_port = 0` is not a port",
        13,
        "1 to 65535",
    );
    assert_refused(
        &vm_with("forwards = [{ host = 8080, guest = 0 }]"),
        "`forwards.guest = 0` is not a port",
        13,
        "1 to 65535",
    );
}

#[test]
fn host_names_that_are_not_rfc_1123_are_refused() {
    assert_refused(
        &vm_with("hostname = \"bad_host name!\""),
        "`bad_host name!` is not a valid host name",
        13,
        "labels of 1 to 63 letters, digits and inner `-`",
    );
    let long = "x".repeat(300);
    assert_refused(
        &vm_with(&format!("hostname = \"{long}\"")),
        "is not a valid host name",
        13,
        "253 characters at most",
    );
}

#[test]
fn vm_names_that_make_no_valid_host_name_are_refused() {
    let text =
        format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[vms.\"web.\"]\nplatform = \"p\"\n");
    assert_refused(
        &text,
        "The VM name `web.` makes the host name `web-`, which is not valid",
        11,
        "give `[vms.web.]` a `hostname = \"…\"`",
    );
    let long = "v".repeat(64);
    let text = format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[vms.{long}]\nplatform = \"p\"\n");
    assert_refused(&text, "which is not valid", 11, "or rename it");
    // With a hostname of its own, a long name is fine.
    parse(&format!("{text}hostname = \"short\"\n")).unwrap();
}

#[test]
fn names_a_deploy_generates_are_held_to_the_same_limits() {
    let platform = "p".repeat(40);
    let target = "t".repeat(30);
    let text = format!(
        "[images.deb]\nurl = \"http://127.0.0.1/deb.qcow2\"\nsha256 = \"{}\"\n[targets.{target}]\narch = \"x86_64\"\n[platforms.{platform}]\nfrom = \"deb\"\n[hosts.L0]\ndeploy = {{ targets = [\"{target}\"], platforms = [\"{platform}\"] }}\n",
        "0".repeat(64)
    );
    assert_refused(
        &text,
        "this deploy makes has 71 characters, more than 64",
        9,
        "shorten the platform or target name",
    );
}

#[test]
fn an_authorized_keys_user_must_be_a_login_name() {
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\nauthorized_keys = {{ \"Bad User\" = [\"k.pub\"] }}\n"
    );
    assert_refused(
        &text,
        "`Bad User` is not a login name",
        11,
        "lower-case letters",
    );
}

#[test]
fn network_and_broadcast_addresses_are_not_host_addresses() {
    let lab = "[networks.lab]\nkind = \"vde\"\nsubnet = \"10.0.0.0/24\"\n";
    let text = format!(
        "{lab}{}",
        vm_with("nics = [{ network = \"lab\", ip = \"10.0.0.0/24\" }]")
    );
    assert_refused(
        &text,
        "`10.0.0.0/24` is the network's own address, not a host's",
        16,
        "between the first and the last",
    );
    let text = format!(
        "{lab}{}",
        vm_with("nics = [{ network = \"lab\", ip = \"10.0.0.255/24\" }]")
    );
    assert_refused(
        &text,
        "is the subnet's broadcast address",
        16,
        "between the first",
    );
}

#[test]
fn a_prefix_other_than_the_networks_is_refused() {
    let text = format!(
        "[networks.lab]\nkind = \"vde\"\nsubnet = \"10.0.0.0/24\"\n{}",
        vm_with("nics = [{ network = \"lab\", ip = \"10.0.0.5/16\" }]")
    );
    assert_refused(
        &text,
        "Address 10.0.0.5/16 has prefix /16, but network `lab` is 10.0.0.0/24",
        16,
        "write it as 10.0.0.5/24",
    );
}

#[test]
fn a_gateway_outside_the_subnet_is_refused() {
    let text = format!(
        "[networks.lab]\nkind = \"vde\"\nsubnet = \"10.0.0.0/24\"\n{}",
        vm_with("nics = [{ network = \"lab\", ip = \"10.0.0.5/24\", gateway = \"10.9.0.1\" }]")
    );
    assert_refused(
        &text,
        "Gateway 10.9.0.1 is outside the NIC's subnet (10.0.0.5/24)",
        16,
        "reachable on the NIC's own subnet",
    );
}

#[test]
fn multicast_and_zero_macs_are_refused() {
    let lab = "[networks.lab]\nkind = \"vde\"\n";
    let text = format!(
        "{lab}{}",
        vm_with("nics = [{ network = \"lab\", mac = \"01:00:5e:00:00:01\" }]")
    );
    assert_refused(
        &text,
        "is a multicast address, which a NIC cannot have",
        15,
        "52:54:00",
    );
    let text = format!(
        "{lab}{}",
        vm_with("nics = [{ network = \"lab\", mac = \"00:00:00:00:00:00\" }]")
    );
    assert_refused(
        &text,
        "`00:00:00:00:00:00` is not a NIC's address",
        15,
        "52:54:00",
    );
}

#[test]
fn a_vde_url_must_be_a_vdeplug4_url() {
    let text = format!("{IMAGE}\n[networks.lab]\nkind = \"vde\"\nurl = \"http://234.0.0.1\"\n");
    assert_refused(
        &text,
        "`http://234.0.0.1` is not a vdeplug4 URL",
        11,
        "`vxvde://`",
    );
}

#[test]
fn vxvde_inside_two_hypervisor_vms_needs_a_shared_link() {
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[networks.lab]\nkind = \"vde\"\nurl = \"vxvde://234.0.0.1\"\n\
         [vms.h1]\nplatform = \"p\"\n[vms.h2]\nplatform = \"p\"\n\
         [vms.x1]\nplatform = \"p\"\nhost = \"h1\"\nnics = [{{ network = \"lab\", ip = \"10.0.0.1/24\" }}]\n\
         [vms.x2]\nplatform = \"p\"\nhost = \"h2\"\nnics = [{{ network = \"lab\", ip = \"10.0.0.2/24\" }}]\n"
    );
    assert_refused(
        &text,
        "Network `lab` (vxvde://234.0.0.1) is used inside hypervisor VMs `h1`, `h2`, which share no network its multicast could travel on",
        13,
        "`/if=nicN`",
    );
    // With a switch both hypervisors are on, farm routes the multicast over it.
    let shared = text
        .replace(
            "[vms.h1]\nplatform = \"p\"\n",
            "[networks.backbone]\nkind = \"vde\"\n[vms.h1]\nplatform = \"p\"\nnics = [{ network = \"backbone\" }]\n",
        )
        .replace(
            "[vms.h2]\nplatform = \"p\"\n",
            "[vms.h2]\nplatform = \"p\"\nnics = [{ network = \"backbone\" }]\n",
        );
    parse(&shared).unwrap();
}

#[test]
fn images_are_downloaded_over_http_only() {
    let text = format!(
        "[images.deb]\nurl = \"ftp://example.org/deb.qcow2\"\nsha256 = \"{}\"\n",
        "0".repeat(64)
    );
    assert_refused(
        &text,
        "`ftp://example.org/deb.qcow2` is a `ftp` URL; farm downloads http and https",
        2,
        "`path = \"…\"`",
    );
}

#[test]
fn a_machine_type_of_another_architecture_is_refused() {
    let text = "[targets.arm]\narch = \"aarch64\"\nmachine = \"q35\"\n";
    assert_refused(
        text,
        "qemu has no machine type `q35` for aarch64",
        3,
        "leave `machine` out for the default (virt)",
    );
}

#[test]
fn guest_paths_of_files_must_be_absolute() {
    let text =
        format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\nfiles = {{ \"etc/motd\" = \"motd\" }}\n");
    assert_refused(
        &text,
        "The guest path `etc/motd` is relative",
        11,
        "`/etc/motd`",
    );
    let text = format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\nfiles = {{ \"\" = \"motd\" }}\n");
    assert_refused(
        &text,
        "A `files` entry has an empty guest path",
        11,
        "absolute path",
    );
}

#[test]
fn a_remote_host_address_may_not_look_like_an_option() {
    let text = "[hosts.lab]\naddress = \"-oProxyCommand=sh\"\n";
    let rendered = assert_error(text, "it starts with `-`, which ssh reads as an option", 2);
    assert!(rendered.contains("expected `user@server`"), "{rendered}");
}

#[test]
fn without_targets_platforms_are_for_this_machine() {
    let text = "[images.deb]\npath = \"deb.qcow2\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\n";
    let topology = parse(text).unwrap();
    assert_eq!(
        topology.vms["a"].target,
        farm::config::implicit_target_name()
    );
}

#[test]
fn a_vm_placed_on_itself_says_so() {
    assert_refused(
        &vm_with("host = \"a\""),
        "VM `a` is placed on itself",
        13,
        "`host` names a host or another VM",
    );
}

#[test]
fn an_undefined_platform_is_reported_with_a_verb() {
    let text = format!("{IMAGE}\n[vms.a]\nplatform = \"nope\"\n");
    assert_refused(
        &text,
        "VM `a` runs the platform `nope`, which is not defined",
        10,
        "defined platforms",
    );
}

#[test]
fn a_placement_cycle_is_one_error_showing_the_cycle() {
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nhost = \"b\"\n[vms.b]\nplatform = \"p\"\nhost = \"c\"\n[vms.c]\nplatform = \"p\"\nhost = \"a\"\n"
    );
    let rendered = assert_error(
        &text,
        "VMs `a`, `b` and `c` are placed inside each other in a cycle: a → b → c → a",
        13,
    );
    assert_eq!(rendered.matches("error:").count(), 1, "{rendered}");
    assert!(
        rendered.contains("hint: place one of them on a host"),
        "{rendered}"
    );
}

#[test]
fn diagnostics_come_in_line_order() {
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\nmemory = \"1\"\n[vms.z]\nplatform = \"p\"\nssh_port = 0\n[vms.a]\nplatform = \"p\"\ncpus = 0\n"
    );
    let rendered = parse(&text).unwrap_err();
    let lines: Vec<usize> = rendered
        .lines()
        .filter_map(|l| l.trim().strip_prefix("--> farm.toml:"))
        .map(|l| l.split(':').next().unwrap().parse().unwrap())
        .collect();
    assert!(lines.len() >= 3, "{rendered}");
    assert!(
        lines.windows(2).all(|w| w[0] <= w[1]),
        "{lines:?}\n{rendered}"
    );
}

/// A project directory holding `farm.toml` and the named files, loaded as every command
/// loads it; the rendered error if it is refused.
fn load_project(farm_toml: &[u8], files: &[(&str, &[u8])]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(dir.path().join("farm.toml"), farm_toml).unwrap();
    for (name, bytes) in files {
        fs_err::write(dir.path().join(name), bytes).unwrap();
    }
    let options = farm::project::ProjectOptions {
        config: dir.path().join("farm.toml"),
        store: Some(dir.path().join("cache")),
    };
    match farm::project::Project::load(&options) {
        Ok(_) => Ok(()),
        Err(farm::config::ConfigError::Invalid { rendered, .. }) => Err(rendered),
        Err(other) => Err(other.to_string()),
    }
}

const PRIVATE_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n-----END OPENSSH PRIVATE KEY-----\n";
const PUBLIC_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBn6Yq3mQ3l0y2U4b1m5sZkz1v0Yb0m1nYQK3cQ0m3xQ me@lab\n";

#[test]
fn a_private_key_in_authorized_keys_is_refused_before_it_reaches_a_layer() {
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\nauthorized_keys = {{ root = [\"id\"] }}\n"
    );
    let rendered = load_project(text.as_bytes(), &[("id", PRIVATE_KEY.as_bytes())]).unwrap_err();
    assert!(rendered.contains("/id` is a private key"), "{rendered}");
    assert!(rendered.contains("farm.toml:11:"), "{rendered}");
    assert!(
        rendered.contains("hint: `authorized_keys` takes public keys"),
        "{rendered}"
    );

    load_project(text.as_bytes(), &[("id", PUBLIC_KEY.as_bytes())])
        .expect("a public key is accepted");
    let rendered = load_project(text.as_bytes(), &[("id", b"hello world\n")]).unwrap_err();
    assert!(
        rendered.contains("/id` holds no OpenSSH public key") && rendered.contains("farm.toml:11:"),
        "{rendered}"
    );
    assert!(rendered.contains("hint:"), "{rendered}");
}

#[test]
fn a_remote_hosts_identity_file_and_known_hosts_must_exist() {
    let text = format!(
        "{IMAGE}\n[hosts.lab]\naddress = \"root@server\"\nidentity_file = \"keys/lab\"\nknown_hosts = \"lab_known_hosts\"\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\nhost = \"lab\"\n"
    );
    let rendered = load_project(text.as_bytes(), &[]).unwrap_err();
    assert!(
        rendered.contains("The identity_file `keys/lab` of host `lab` does not exist"),
        "{rendered}"
    );
    assert!(rendered.contains("farm.toml:11:"), "{rendered}");
    assert!(
        rendered.contains("The known_hosts `lab_known_hosts` of host `lab` does not exist"),
        "{rendered}"
    );
    assert!(rendered.contains("farm.toml:12:"), "{rendered}");
    assert!(
        rendered.contains("hint: give a file with the host's key"),
        "{rendered}"
    );

    load_project(text.as_bytes(), &[("lab_known_hosts", b"")]).unwrap_err();
    let dir_files: &[(&str, &[u8])] = &[("lab_known_hosts", b"")];
    let rendered =
        load_project(text.replace("keys/lab", "lab_key").as_bytes(), dir_files).unwrap_err();
    assert!(!rendered.contains("known_hosts `"), "{rendered}");
}

#[test]
fn a_byte_that_is_not_utf8_is_reported_once_at_its_line_and_column() {
    let mut text = format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n").into_bytes();
    text.extend_from_slice(b"packages = [\"caf\xe9\"]\n");
    let rendered = load_project(&text, &[]).unwrap_err();
    assert!(
        rendered.contains("is not UTF-8 text: the byte here does not begin a UTF-8 character"),
        "{rendered}"
    );
    assert!(rendered.contains("farm.toml:11:17"), "{rendered}");
    assert_eq!(rendered.matches("error:").count(), 1, "{rendered}");
    assert!(
        rendered.contains("hint: save the file as UTF-8"),
        "{rendered}"
    );
}

#[test]
fn packages_apt_cannot_install_are_refused() {
    for (bad, col) in [
        ("vim; rm -rf /", 13),
        ("-oAPT::Get::Yes=false", 13),
        ("Vim", 13),
    ] {
        let text = format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\npackages = [\"{bad}\"]\n");
        let rendered = assert_error(&text, &format!("`{bad}` is not a Debian package"), 11);
        assert!(
            rendered.contains(&format!("farm.toml:11:{col}")),
            "{rendered}"
        );
        assert!(
            rendered.contains("hint: write a package name"),
            "{rendered}"
        );
    }
    for good in [
        "qemu-utils",
        "libstdc++6",
        "g++",
        "vim=2:9.0.1378-2",
        "nginx/bookworm-backports",
        "libc6:amd64",
    ] {
        let text = format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\npackages = [\"{good}\"]\n");
        parse(&text).unwrap_or_else(|e| panic!("`{good}` is a package: {e}"));
    }
}

#[test]
fn a_debian_image_needs_a_readable_mirror_a_suite_and_a_known_variant() {
    let image = |fields: &str| {
        format!(
            "[images.deb]\ndebian = {{ suite = \"bookworm\"{fields} }}\n[targets.amd64]\narch = \"x86_64\"\n"
        )
    };
    assert_refused(
        &image(", mirror = \"ftp://ftp.debian.org/debian\""),
        "`ftp://ftp.debian.org/debian` is not a mirror mmdebstrap can read",
        2,
        "file:///srv/mirror/debian",
    );
    assert_refused(
        &image(", variant = \"huge\""),
        "`huge` is not an mmdebstrap variant",
        2,
        "`minbase`",
    );
    assert_refused(
        "[images.deb]\ndebian = { suite = \"book worm\" }\n",
        "`book worm` is not a Debian suite name",
        2,
        "`bookworm`",
    );
    parse(&image(
        ", mirror = \"file:///srv/mirror/debian\", variant = \"apt\"",
    ))
    .unwrap();
}

#[test]
fn an_image_url_must_name_a_host_and_a_valid_port() {
    let image = |url: &str| {
        format!(
            "[images.deb]\nurl = \"{url}\"\nsha256 = \"{}\"\n",
            "0".repeat(64)
        )
    };
    assert_refused(
        &image("http://"),
        "`http://` is not a URL",
        2,
        "https://host/path",
    );
    assert_refused(
        &image("http://127.0.0.1:99999/x"),
        "`http://127.0.0.1:99999/x` is not a URL: invalid port number",
        2,
        "https://host/path",
    );
}

#[test]
fn one_vm_forwarding_a_port_twice_is_told_so() {
    assert_refused(
        &vm_with("ssh_port = 2222\nforwards = [{ host = 2222, guest = 80 }]"),
        "Port 2222 on `local` is forwarded twice by `a`",
        14,
        "give each of its forwards its own host port",
    );
}

#[test]
fn the_tiny_image_serves_aarch64_targets_too() {
    let text = "[images.tiny]\ntiny = true\n[targets.arm64]\narch = \"aarch64\"\n[platforms.p]\nfrom = \"tiny\"\n";
    assert!(load_project(text.as_bytes(), &[]).is_ok());
}

#[test]
fn substituters_must_be_http_https_or_file_urls() {
    assert_error(
        &format!("substituters = [\"ftp://cache.example/farm\"]\n{IMAGE}"),
        "`ftp://cache.example/farm` is a `ftp` URL; farm reads caches over http, https, s3, oci and file",
        1,
    );
    assert_error(
        &format!("substituters = [\"https://ok.example/c\", \"oci://registry.example\"]\n{IMAGE}"),
        "`oci://registry.example` names no registry or repository",
        1,
    );
    assert_error(
        &format!("substituters = [\n  \"file:///\",\n]\n{IMAGE}"),
        "`file:///` names no host or path",
        2,
    );
}

#[test]
fn a_trusted_public_key_must_be_name_colon_base64_of_an_ed25519_key() {
    let rendered = assert_error(
        &format!("trusted-public-keys = [\"ci-1 AAAA\"]\n{IMAGE}"),
        "`ci-1 AAAA` is not a public key: a key is `NAME:BASE64`",
        1,
    );
    assert!(
        rendered.contains("hint: copy the line from the `.public` file"),
        "{rendered}"
    );
    assert_error(
        &format!("trusted-public-keys = [\"ci-1:AAAA\"]\n{IMAGE}"),
        "its key part is not base64 of 32 bytes",
        1,
    );
}

/// The seed's lab as an Ansible inventory: groups by level, hypervisor, platform, target
/// and network; host variables; only the VMs the states list; every format renders them.
#[test]
fn the_seed_lab_as_an_ansible_inventory() {
    let topology = parse(SEED).unwrap();
    let running = |vm: &str| (vm != "debian_vs_user_amd64").then(|| "running".to_string());
    let inv = farm::model::lab::inventory::inventory(&topology, &running, "/lab/.farm/ssh config");
    let group = |name: &str| -> Vec<&str> {
        inv.groups
            .get(name)
            .map(|h| h.iter().map(String::as_str).collect())
            .unwrap_or_default()
    };
    assert_eq!(group("level_1"), ["debian_vs_amd64"]);
    assert_eq!(group("level_2"), ["debian_vs_vde_amd64"]);
    assert_eq!(group("hypervisors"), ["debian_vs_amd64"]);
    assert_eq!(group("on_L0"), ["debian_vs_amd64"]);
    assert_eq!(group("on_debian_vs_amd64"), ["debian_vs_vde_amd64"]);
    assert_eq!(group("network_lab"), ["debian_vs_vde_amd64"]);
    assert_eq!(group("platform_debian_vs_vde"), ["debian_vs_vde_amd64"]);
    assert_eq!(group("target_amd64").len(), 2);
    // Not listed: not running.
    assert!(!inv.hostvars.contains_key("debian_vs_user_amd64"));
    let vars = &inv.hostvars["debian_vs_vde_amd64"];
    assert_eq!(vars["farm_level"], 2);
    assert_eq!(vars["farm_hypervisor"], "debian_vs_amd64");
    assert_eq!(vars["farm_addresses"]["lab"], "10.0.0.21");
    assert_eq!(vars["farm_state"], "running");
    // The ssh_config path is quoted for the shell Ansible hands it to.
    assert_eq!(
        inv.vars["ansible_ssh_common_args"],
        "-F '/lab/.farm/ssh config'"
    );
    // No ControlMaster of Ansible's own, whose socket two labs' `hv` would share: ssh shares
    // connections through farm's ssh_config, a socket per VM of this project.
    assert_eq!(inv.vars["ansible_ssh_args"], "");

    let list = inv.to_json();
    assert_eq!(
        list["_meta"]["hostvars"]["debian_vs_amd64"]["farm_level"],
        1
    );
    assert_eq!(list["level_2"]["hosts"][0], "debian_vs_vde_amd64");
    assert!(
        list["all"]["children"]
            .as_array()
            .unwrap()
            .contains(&"hypervisors".into())
    );
    assert_eq!(inv.host_json("debian_vs_amd64")["farm_level"], 1);
    assert_eq!(inv.host_json("nope"), serde_json::json!({}));
    let yaml = inv.to_yaml();
    assert!(
        yaml.contains("    level_2:\n      hosts:\n        debian_vs_vde_amd64:\n"),
        "{yaml}"
    );
    let ini = inv.to_ini();
    assert!(ini.contains("\n[level_2]\ndebian_vs_vde_amd64\n"), "{ini}");
    assert!(ini.contains("debian_vs_amd64 farm_addresses="), "{ini}");
    assert!(ini.contains(" farm_level=1 "), "{ini}");
    assert!(yaml.contains("    ansible_ssh_args: \"\"\n"), "{yaml}");
    assert!(ini.contains("\nansible_ssh_args=''\n"), "{ini}");
}

#[test]
fn backends_are_read_per_host_and_hypervisor_vm() {
    use farm::model::config::backend::Backend;
    use farm::model::config::topology::Placement;
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[hosts.L0]\nbackend = \"libvirt\"\n\
         [vms.hv]\nplatform = \"p\"\nhost = \"L0\"\nbackend = \"libvirt\"\nlibvirt_uri = \"qemu:///session\"\n\
         [vms.inner]\nplatform = \"p\"\nhost = \"hv\"\n"
    );
    let topology = parse(&text).unwrap();
    assert_eq!(
        topology.backend_on(&Placement::Host("L0".into())),
        Backend::Libvirt {
            uri: "qemu:///system".into()
        }
    );
    assert_eq!(
        topology.backend_on(&Placement::Vm("hv".into())),
        Backend::Libvirt {
            uri: "qemu:///session".into()
        }
    );
    let plain = format!("{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[vms.a]\nplatform = \"p\"\n");
    let topology = parse(&plain).unwrap();
    assert_eq!(
        topology.backend_on(&topology.vms["a"].placement),
        Backend::Qemu
    );
}

#[test]
fn an_unknown_backend_or_uri_is_rejected_with_its_line() {
    let text = format!("{IMAGE}\n[hosts.L0]\nbackend = \"xen\"\n");
    let rendered = assert_error(&text, "Unknown backend `xen`", 10);
    assert!(rendered.contains("hint: use \"qemu\""), "{rendered}");
    let text = format!(
        "{IMAGE}\n[hosts.L0]\nbackend = \"libvirt\"\nlibvirt_uri = \"qemu+ssh://root@far/system\"\n"
    );
    let rendered = assert_error(
        &text,
        "Unsupported libvirt_uri `qemu+ssh://root@far/system`",
        11,
    );
    assert!(
        rendered.contains("declare it as a host with `address`"),
        "{rendered}"
    );
    let text = format!("{IMAGE}\n[hosts.L0]\nlibvirt_uri = \"qemu:///session\"\n");
    assert_error(
        &text,
        "`libvirt_uri` is set but `backend` is not \"libvirt\"",
        10,
    );
}

#[test]
fn a_backend_on_a_vm_that_runs_no_vms_is_rejected() {
    let text = format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\n[hosts.L0]\n[vms.a]\nplatform = \"p\"\nhost = \"L0\"\nbackend = \"libvirt\"\n"
    );
    let rendered = assert_error(&text, "VM `a` sets `backend` but runs no VMs", 15);
    assert!(
        rendered.contains(
            "hint: to run `a` itself under libvirt (qemu:///system), set `backend` on `L0`"
        ),
        "{rendered}"
    );
}

#[test]
fn a_platform_runs_with_the_vm_defaults_of_the_platform_it_is_built_from() {
    let text = format!(
        "{IMAGE}\n[platforms.hv]\nfrom = \"deb\"\nmemory = \"2G\"\ncpus = 2\n\
         [platforms.hv_more]\nfrom = \"hv\"\ncpus = 3\n[vms.a]\nplatform = \"hv_more\"\n"
    );
    let topology = parse(&text).unwrap();
    let vm = &topology.vms["a"];
    assert_eq!(vm.resources.memory.map(|m| m.mib()), Some(2048));
    assert_eq!(vm.resources.cpus, Some(3));
}

#[test]
fn a_chroot_build_with_a_playbook_is_refused_at_the_builder_line() {
    let rendered = assert_error(
        &format!(
            "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\nplaybook = \"site.yml\"\nbuilder = \"chroot\"\n"
        ),
        "Platform `p` runs its steps in a chroot (`builder = \"chroot\"`), but a playbook needs the image booted",
        IMAGE.lines().count() + 5,
    );
    assert!(
        rendered.contains("hint: remove `builder = \"chroot\"`"),
        "{rendered}"
    );
}

#[test]
fn an_unknown_builder_is_refused_with_the_choices() {
    let rendered = parse(&format!(
        "{IMAGE}\n[platforms.p]\nfrom = \"deb\"\nbuilder = \"docker\"\n"
    ))
    .expect_err("an unknown builder must be refused");
    assert!(
        rendered.contains("boot") && rendered.contains("chroot"),
        "{rendered}"
    );
}

#[test]
fn a_tests_timeout_and_start_are_checked_where_they_are_written() {
    let line_of = |text: &str, start: &str| {
        text.lines()
            .position(|l| l.starts_with(start))
            .map(|i| i + 1)
            .unwrap()
    };
    let text = format!("{IMAGE}\n[tests.smoke]\nscript = \"t.sh\"\ntimeout = \"5 minutes\"\n");
    let rendered = assert_error(
        &text,
        "`timeout = \"5 minutes\"` is not a duration farm takes",
        line_of(&text, "timeout"),
    );
    assert!(
        rendered.contains("hint: write seconds, minutes or hours"),
        "{rendered}"
    );
    let text = format!("{IMAGE}\n[tests.smoke]\nscript = \"t.sh\"\nstart = \"../up\"\n");
    assert_error(
        &text,
        "`start = \"../up\"` is not a snapshot's name",
        line_of(&text, "start"),
    );
    let text = format!("{IMAGE}\n[tests.smoke]\nscript = \"t.sh\"\nretries = 2\n");
    assert!(parse(&text).is_err());
    for fine in ["90s", "5m", "1h", "300"] {
        let text = format!("{IMAGE}\n[tests.smoke]\nscript = \"t.sh\"\ntimeout = \"{fine}\"\n");
        parse(&text).unwrap_or_else(|e| panic!("{fine}: {e}"));
    }
}
