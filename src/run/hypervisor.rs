//! What a host needs before farm starts VMs on it, checked with one shell script: the
//! qemu system emulator for each target's architecture, qemu-img for overlays, b3sum to
//! verify pushed layers; which accelerator works there; and which TCP ports are taken
//! (for ssh forwards on a hypervisor VM, where farm cannot bind a port to test it).

use std::collections::BTreeSet;
use std::path::Path;

use crate::model::qemu::KvmFacts;
use crate::model::values::Arch;
use crate::run::host::{Host, HostError};

/// The Debian package that provides each tool farm checks for.
const TOOL_PACKAGES: [(&str, &str); 4] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-system-aarch64", "qemu-system-arm"),
    ("qemu-img", "qemu-utils"),
    ("b3sum", "b3sum"),
];

/// Where farm picks ssh forward ports on hypervisor VMs when farm.toml fixes none.
const PORT_RANGE: std::ops::Range<u16> = 20000..30000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HypervisorFacts {
    /// Tools the host lacks.
    pub missing: Vec<String>,
    pub kvm: KvmFacts,
    pub arch: Option<Arch>,
}

/// The tools needed to run VMs of `arches` on a host.
pub fn required_tools(arches: &BTreeSet<Arch>) -> Vec<&'static str> {
    let mut tools: Vec<&'static str> = arches
        .iter()
        .map(|a| match a {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        })
        .collect();
    tools.extend(["qemu-img", "b3sum"]);
    tools
}

/// Debian packages providing `tools`, for the hint of a failed check.
pub fn packages_for(tools: &[String]) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = tools
        .iter()
        .filter_map(|t| TOOL_PACKAGES.iter().find(|(tool, _)| tool == t))
        .map(|(_, p)| *p)
        .collect();
    packages.dedup();
    packages
}

/// Runs the check on `host`.
pub fn probe(host: &dyn Host, arches: &BTreeSet<Arch>) -> Result<HypervisorFacts, HostError> {
    let tools = required_tools(arches).join(" ");
    let script = format!(
        "for t in {tools}; do command -v $t >/dev/null 2>&1 || echo \"missing $t\"; done; \
         [ -r /dev/kvm ] && [ -w /dev/kvm ] && echo kvm-device; \
         {{ [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }} && echo kvm-hardware; \
         echo \"arch $(uname -m)\"; true"
    );
    let out = host.run(&script)?;
    Ok(parse_probe(&String::from_utf8_lossy(&out.stdout)))
}

pub fn parse_probe(text: &str) -> HypervisorFacts {
    let mut facts = HypervisorFacts {
        missing: Vec::new(),
        kvm: KvmFacts {
            device_usable: false,
            hardware_module: false,
        },
        arch: None,
    };
    for line in text.lines() {
        match line.trim().split_once(' ') {
            Some(("missing", tool)) => facts.missing.push(tool.to_string()),
            Some(("arch", "x86_64")) => facts.arch = Some(Arch::X86_64),
            Some(("arch", "aarch64")) => facts.arch = Some(Arch::Aarch64),
            _ => match line.trim() {
                "kvm-device" => facts.kvm.device_usable = true,
                "kvm-hardware" => facts.kvm.hardware_module = true,
                _ => {}
            },
        }
    }
    facts
}

/// TCP ports something listens on, from `/proc/net/tcp` and `/proc/net/tcp6`.
pub fn listening_ports(host: &dyn Host) -> Result<BTreeSet<u16>, HostError> {
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Some(bytes) = host.get(Path::new(table))? {
            ports.extend(parse_listening(&String::from_utf8_lossy(&bytes)));
        }
    }
    Ok(ports)
}

/// The local ports of sockets in state `0A` (LISTEN) in a `/proc/net/tcp` table.
pub fn parse_listening(table: &str) -> BTreeSet<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state) = (fields.get(1)?, fields.get(3)?);
            if *state != "0A" {
                return None;
            }
            u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
        })
        .collect()
}

/// A free port for `vm`: stable for a name (the same VM gets the same port while it is
/// free), skipping ports in use and ports already given to other VMs.
pub fn pick_port(vm: &str, used: &BTreeSet<u16>, taken: &BTreeSet<u16>) -> Option<u16> {
    let span = (PORT_RANGE.end - PORT_RANGE.start) as u32;
    let hash = blake3::hash(vm.as_bytes());
    let start = u32::from_le_bytes(hash.as_bytes()[..4].try_into().expect("4 bytes")) % span;
    (0..span)
        .map(|i| PORT_RANGE.start + ((start + i) % span) as u16)
        .find(|p| !used.contains(p) && !taken.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_output_is_parsed() {
        let facts = parse_probe("missing b3sum\nmissing qemu-img\nkvm-device\narch x86_64\n");
        assert_eq!(facts.missing, ["b3sum", "qemu-img"]);
        assert!(facts.kvm.device_usable && !facts.kvm.hardware_module);
        assert_eq!(facts.arch, Some(Arch::X86_64));
        assert_eq!(
            packages_for(&facts.missing),
            ["b3sum", "qemu-utils"],
            "hints name packages"
        );
    }

    #[test]
    fn listening_ports_come_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
           0: 0100007F:089A 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1\n\
           1: 0F02000A:0016 0202000A:C350 01 00000000:00000000 00:00000000 00000000 0 0 2\n";
        assert_eq!(parse_listening(table), BTreeSet::from([2202]));
    }

    #[test]
    fn picked_ports_are_stable_and_avoid_taken_ones() {
        let none = BTreeSet::new();
        let first = pick_port("l2", &none, &none).unwrap();
        assert_eq!(pick_port("l2", &none, &none), Some(first));
        assert!(PORT_RANGE.contains(&first));
        let next = pick_port("l2", &BTreeSet::from([first]), &none).unwrap();
        assert_ne!(next, first);
        assert_ne!(
            pick_port("l2", &none, &BTreeSet::from([first])),
            Some(first)
        );
    }
}
