//! The libvirt backend's parts against a real libvirtd, started by the test when none runs
//! (no systemd here: `virtlogd -d`, `libvirtd -d`, as ENVIRONMENT.md describes) and stopped
//! after it: farm's tiny image defined from farm's domain XML boots and answers ssh with its
//! pinned host key, `virsh` shows farm's metadata, the console is in the file `farm logs`
//! reads, a domain that is not farm's is never touched (its name is refused), and the
//! domain shuts down and is undefined. Then the same through `farm up` with
//! `backend = "libvirt"`: up, ssh, a no-op up, a changed `memory` applied, `virsh` showing the
//! domain with farm's metadata, a NIC on a libvirt network reached over its bridge, `farm logs`, and `down`, which leaves a domain defined by
//! someone else alone.

use crate::support::guest;
use crate::support::libvirtd;
use crate::support::project;
use crate::support::skip::require_vm;
use crate::support::test_home::shared_store;

use std::time::Duration;

use farm::build::layer::BootFiles;
use farm::model::build::boot_watch::{BootRules, Qemu};
use farm::model::lab::libvirt::{DomainMeta, METADATA_NS, domain_xml};
use farm::sys::boot_wait::{self, BootTarget, SshRoute};
use farm::sys::libvirt::{DomainStopped, Libvirt, LibvirtError};
use guest::{keygen, prepare};
use libvirtd::{Libvirtd, URI, virsh};
use project::Project;

const TINY: &str = "[images.tiny]\ntiny = true\n[targets.amd64]\narch = \"x86_64\"\n";

#[test]
fn a_tiny_guest_runs_as_a_libvirt_domain_and_other_domains_are_left_alone() {
    if !require_vm("libvirt", &[]) {
        return;
    }
    let _daemon = Libvirtd::ensure();
    let p = Project::with_store(TINY, &shared_store());
    p.ok(&["build"]);
    let entry = p.entry("tiny-amd64");
    let boot = BootFiles::in_dir(&entry.join("boot")).expect("the tiny image has boot files");
    let keys = tempfile::tempdir().unwrap();
    let client = keygen(keys.path(), "client");
    let mut prepared = prepare(&entry, Some(boot), &client, true, 256, Vec::new());
    let name = format!("farm-test-{}", std::process::id());
    prepared.vm.name = name.clone();
    let meta = DomainMeta {
        project: prepared.work.path().display().to_string(),
        vm: name.clone(),
        spec: "blake3-test".into(),
    };
    let lv = Libvirt::connect(URI).unwrap();

    // Someone else's domain with the name farm wants: refused, and left as it was.
    let foreign = prepared.work.path().join("foreign.xml");
    fs_err::write(
        &foreign,
        format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
        ),
    )
    .unwrap();
    let defined = virsh(&["define", &foreign.display().to_string()]);
    assert!(defined.status.success(), "{}", project::text(&defined));
    let xml = domain_xml(&prepared.vm, &meta, true);
    match lv.define(&name, &xml, &meta) {
        Err(LibvirtError::Taken { .. }) => {}
        other => panic!("a foreign domain's name was not refused: {other:?}"),
    }
    assert!(
        !lv.farm_domains().unwrap().iter().any(|d| d.name == name),
        "the foreign domain is not farm's"
    );
    assert!(virsh(&["undefine", &name]).status.success());

    // farm's domain: defined, started, answering ssh with its pinned host key.
    lv.define(&name, &xml, &meta).unwrap();
    lv.start(&name, &meta).unwrap();
    let mut domain = Domain {
        lv: &lv,
        name: &name,
        meta: &meta,
        serial_log: &prepared.vm.serial_log,
    };
    let route = SshRoute {
        config: &prepared.config,
        alias: "guest",
        jump: None,
        probe: farm::sys::boot_wait::Probe::Shell,
    };
    let rules = BootRules {
        timeout: Duration::from_secs(300),
        direct_boot: true,
        kvm_inside_tcg: None,
        may_restart: false,
    };
    let (ssh, _) = boot_wait::wait_for_ssh(&mut domain, route, rules, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("the libvirt domain: {e}"));
    let out = ssh.run("hostname", None).unwrap();
    assert_eq!(out.text().trim(), "test-guest");
    drop(ssh);

    // virsh lists it with farm's metadata; farm finds it, and only by that.
    let list = String::from_utf8_lossy(&virsh(&["list", "--name"]).stdout).into_owned();
    assert!(list.lines().any(|l| l.trim() == name), "{list}");
    let dumped = String::from_utf8_lossy(&virsh(&["dumpxml", &name]).stdout).into_owned();
    assert!(dumped.contains(METADATA_NS), "{dumped}");
    let ours = lv.farm_domains().unwrap();
    let found = ours.iter().find(|d| d.name == name).expect("farm's domain");
    assert_eq!(found.meta, meta);
    assert!(found.active);
    let console = fs_err::read_to_string(&prepared.vm.serial_log).unwrap();
    assert!(console.contains("farm-seed:"), "{console}");

    // Down: ACPI and `poweroff` over ssh (busybox init has no ACPI daemon), then undefined.
    let config = prepared.config.clone();
    let poweroff = move || farm::run::apply::ssh_poweroff(&config, "guest");
    let stopped = lv
        .stop(&name, &meta, Duration::from_secs(60), Some(&poweroff))
        .unwrap();
    assert!(matches!(stopped, DomainStopped::ShutDown(_)), "{stopped:?}");
    assert_eq!(lv.is_active(&name, &meta).unwrap(), Some(false));
    lv.undefine(&name, &meta).unwrap();
    assert_eq!(lv.is_active(&name, &meta).unwrap(), None);
    assert!(!virsh(&["dominfo", &name]).status.success());
}

/// A VM on libvirt with user networking (ssh) and a NIC on the libvirt network `network`.
fn lab(vm: &str, memory: &str, port: u16, network: &str) -> String {
    format!(
        "{TINY}[platforms.plain]\nfrom = \"tiny\"\n[hosts.L0]\nbackend = \"libvirt\"\n\
         [vms.{vm}]\nplatform = \"plain\"\nhost = \"L0\"\nmemory = \"{memory}\"\nssh_port = {port}\n\
         nics = [{{ libvirt_network = \"{network}\", ip = \"{LIBVIRT_NET_GUEST}/24\" }}]\n"
    )
}

/// An isolated libvirt network (a bridge with this machine at .1, no DHCP or DNS, so no
/// dnsmasq), defined for the test and removed after it.
struct LibvirtNetwork(String);

const LIBVIRT_NET_GUEST: &str = "192.168.213.21";

impl LibvirtNetwork {
    fn start(dir: &std::path::Path) -> LibvirtNetwork {
        let name = format!("farmt{}", std::process::id());
        let xml = dir.join("network.xml");
        fs_err::write(
            &xml,
            format!(
                "<network><name>{name}</name><bridge name='fbr{}'/><dns enable='no'/><ip address='192.168.213.1' netmask='255.255.255.0'/></network>",
                std::process::id() % 100_000
            ),
        )
        .unwrap();
        let defined = virsh(&["net-define", &xml.display().to_string()]);
        assert!(defined.status.success(), "{}", project::text(&defined));
        let started = virsh(&["net-start", &name]);
        assert!(started.status.success(), "{}", project::text(&started));
        LibvirtNetwork(name)
    }
}

impl Drop for LibvirtNetwork {
    fn drop(&mut self) {
        virsh(&["net-destroy", &self.0]);
        virsh(&["net-undefine", &self.0]);
    }
}

fn mem_total_kib(p: &Project, vm: &str) -> u64 {
    let out = p.ok(&["ssh", vm, "--", "grep", "MemTotal", "/proc/meminfo"]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {}", project::text(&out)))
}

#[test]
fn farm_up_converges_libvirt_domains_and_down_leaves_other_domains() {
    if !require_vm("libvirt_lifecycle", &[]) {
        return;
    }
    let _daemon = Libvirtd::ensure();
    let vm = format!("lv-{}", std::process::id());
    let foreign = format!("not-farms-{}", std::process::id());
    let port = farm::sys::hostinfo::free_local_port().unwrap();
    let p = Project::with_store(TINY, &shared_store());
    let network = LibvirtNetwork::start(p.path());
    fs_err::write(
        p.path().join("farm.toml"),
        lab(&vm, "256M", port, &network.0),
    )
    .unwrap();

    // A domain someone else defined on the same libvirtd.
    let xml = p.path().join("foreign.xml");
    fs_err::write(
        &xml,
        format!(
            "<domain type='qemu'><name>{foreign}</name><memory unit='MiB'>64</memory><os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
        ),
    )
    .unwrap();
    assert!(
        virsh(&["define", &xml.display().to_string()])
            .status
            .success()
    );

    let up = p.ok(&["up"]);
    assert!(project::text(&up).contains(&vm), "{}", project::text(&up));
    let out = p.ok(&["ssh", &vm, "--", "echo kept > /root/mark; sync; hostname"]);
    assert!(!project::text(&out).trim().is_empty());
    let before = mem_total_kib(&p, &vm);

    // Its NIC on the libvirt network answers from this machine, over libvirt's bridge.
    let address = std::net::SocketAddr::new(LIBVIRT_NET_GUEST.parse().unwrap(), 22);
    assert!(
        farm::sys::ssh::tcp_banner(address, Duration::from_secs(10)),
        "no ssh banner from {address} over the libvirt network"
    );

    // virsh sees farm's domain, with farm's metadata naming this project.
    let list = project::text(&virsh(&["list", "--name"]));
    assert!(list.lines().any(|l| l.trim() == vm), "{list}");
    let dumped = project::text(&virsh(&["dumpxml", &vm]));
    assert!(dumped.contains(METADATA_NS), "{dumped}");
    let state = p.path().join(".farm").display().to_string();
    assert!(
        dumped.contains(&format!("<farm:project>{state}</farm:project>")),
        "{dumped}"
    );

    // A second `up` changes nothing: the same qemu keeps running.
    let pidfile = p.path().join(".farm/vms").join(&vm).join("qemu.pid");
    let pid = fs_err::read_to_string(&pidfile).unwrap();
    let again = project::text(&p.ok(&["up"]));
    assert!(
        !again.contains("starting") && !again.contains("restarting"),
        "{again}"
    );
    assert_eq!(fs_err::read_to_string(&pidfile).unwrap(), pid);

    // A domain paused (here by libvirt itself; by qemu on a full disk, or by a killed
    // `snapshot save`) is resumed by `up`, the same qemu, and libvirt sees it run.
    assert!(virsh(&["suspend", &vm]).status.success());
    let resumed = project::text(&p.ok(&["up"]));
    assert!(
        resumed.contains(&format!("resumed {vm} (its qemu held it paused: paused)")),
        "{resumed}"
    );
    assert_eq!(fs_err::read_to_string(&pidfile).unwrap(), pid);
    let state = project::text(&virsh(&["domstate", &vm]));
    assert!(state.contains("running"), "{state}");

    // A changed `memory` restarts the domain with it, on the same disk.
    fs_err::write(
        p.path().join("farm.toml"),
        lab(&vm, "384M", port, &network.0),
    )
    .unwrap();
    let changed = project::text(&p.ok(&["up"]));
    assert!(changed.contains("memory 256M → 384M"), "{changed}");
    let after = mem_total_kib(&p, &vm);
    assert!(
        after > before + 100 * 1024,
        "MemTotal {before} → {after} kB"
    );
    let mark = p.ok(&["ssh", &vm, "--", "cat", "/root/mark"]);
    assert_eq!(String::from_utf8_lossy(&mark.stdout).trim(), "kept");
    let dominfo = project::text(&virsh(&["dominfo", &vm]));
    assert!(dominfo.contains("393216 KiB"), "{dominfo}");

    // The console is where `farm logs` reads it.
    let logs = project::text(&p.ok(&["logs", &vm]));
    assert!(logs.contains("farm-seed:"), "{logs}");

    // Down: farm's domain goes; the other stays defined.
    p.ok(&["down"]);
    assert!(
        !virsh(&["dominfo", &vm]).status.success(),
        "farm's domain is undefined"
    );
    assert!(
        virsh(&["dominfo", &foreign]).status.success(),
        "a domain that is not farm's survives `farm down`"
    );
    assert!(virsh(&["undefine", &foreign]).status.success());
}

/// A libvirt domain of the test, as the boot driver looks at it (never restarted).
struct Domain<'a> {
    lv: &'a Libvirt,
    name: &'a str,
    meta: &'a DomainMeta,
    serial_log: &'a std::path::Path,
}

impl BootTarget for Domain<'_> {
    type Error = String;

    fn qemu(&mut self) -> Qemu {
        match self.lv.is_active(self.name, self.meta) {
            Ok(Some(true)) => Qemu::Running,
            Ok(_) => Qemu::Gone,
            Err(_) => Qemu::Unknown,
        }
    }

    fn console_from(&mut self, offset: u64) -> Vec<u8> {
        boot_wait::read_from(self.serial_log, offset)
    }

    fn qemu_log(&mut self) -> String {
        String::new()
    }

    fn restart(&mut self) -> Result<(), String> {
        Err("the test never restarts its domain".into())
    }
}
