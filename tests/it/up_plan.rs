//! `farm up`'s plan as snapshots: a farm.toml, what each site is observed to run, and the
//! plan the pure planner makes of them (actions, reasons, pushes, networks, problems).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use farm::config::{SourceFile, SourceKind, SourceMap, parse_sources};
use farm::model::build::qemu::{DirectBoot, ResolvedAccel};
use farm::model::config::Config;
use farm::model::config::topology::{Placement, Topology};
use farm::model::hash::{ContentHash, DrvHash};
use farm::model::lab::instance::{InstanceRecord, InstanceSpec, VmState};
use farm::model::lab::observation::{
    NetworkState, ObservedInstance, SiteObservation, TaggedProcess,
};
use farm::model::lab::up_plan::{Desired, LayerInfo, UpPlan, VmAction, plan_up};

const LAB: &str = r#"
[images.tiny]
tiny = true
[targets.amd64]
arch = "x86_64"
[platforms.plain]
from = "tiny"
memory = "256M"
[platforms.hv]
from = "tiny"
memory = "1G"
[networks.lab]
kind = "vde"
subnet = "10.0.0.0/24"
[vms.alpha]
platform = "plain"
ssh_port = 2202
[vms.beta]
platform = "plain"
[vms.hyper]
platform = "hv"
attach = { lab = "10.0.0.254/24" }
[vms.inner]
platform = "plain"
host = "hyper"
user_network = false
nics = [{ network = "lab", ip = "10.0.0.21/24" }]
"#;

fn load(text: &str) -> (Config, Topology) {
    let map = SourceMap::new(vec![SourceFile {
        path: PathBuf::from("/p/farm.toml"),
        text: text.to_string(),
    }]);
    parse_sources(&map, &[SourceKind::Main], Some(Path::new("/home/u")))
        .unwrap_or_else(|d| panic!("{}", map.render_all(&d)))
}

/// Layers as a build would leave them: hash byte `n` per platform.
fn layers(topology: &Topology, bytes: u8) -> BTreeMap<(String, String), LayerInfo> {
    let mut out = BTreeMap::new();
    for vm in topology.vms.values() {
        let name = format!("{}_{}", vm.platform, vm.target);
        let seed = vm.platform.len() as u8;
        out.insert(
            (vm.platform.clone(), vm.target.clone()),
            LayerInfo {
                drv_hash: DrvHash([seed; 32]),
                name: name.clone(),
                entry: format!("{seed:02}-{name}"),
                blake3: Some(ContentHash([bytes; 32])),
                virtual_size: Some(2 << 30),
                boot: Some(DirectBoot {
                    kernel: "00-tiny-amd64/boot/vmlinuz".into(),
                    initrd: None,
                    cmdline: "console=ttyS0".into(),
                }),
                closure: vec!["00-tiny-amd64".into(), format!("{seed:02}-{name}")],
            },
        );
    }
    out
}

fn desired<'a>(config: &'a Config, topology: &'a Topology) -> Desired<'a> {
    Desired {
        config,
        topology,
        selected: topology.vms.keys().cloned().collect(),
        layers: layers(topology, 7),
        accel: None,
        farm_key: Some("ssh-ed25519 AAAA farm".into()),
        local_state: "/p/.farm".into(),
        local_store: "/p/cache/store".into(),
    }
}

fn here() -> Placement {
    Placement::Host("local".into())
}

fn inside(vm: &str) -> Placement {
    Placement::Vm(vm.into())
}

/// A site farm looked at, with nothing on it but the facts.
fn site() -> SiteObservation {
    let mut o = SiteObservation {
        reached: true,
        ..SiteObservation::default()
    };
    o.facts.arch = Some(farm::model::values::Arch::X86_64);
    o
}

/// An instance found running `spec`, answering ssh.
fn running(spec: &InstanceSpec, pid: u32) -> ObservedInstance {
    ObservedInstance {
        record: Ok(InstanceRecord {
            ready: true,
            ..InstanceRecord::new(spec.clone())
        }),
        pid: Some(pid),
        answers: Some(true),
    }
}

/// The plan for a lab nothing runs of yet, and the specs it would start.
fn fresh(d: &Desired) -> UpPlan {
    plan_up(d, &BTreeMap::from([(here(), site())]))
}

fn spec(plan: &UpPlan, vm: &str) -> InstanceSpec {
    plan.vm(vm).unwrap().spec.clone()
}

/// Everything running as planned.
fn steady(d: &Desired) -> BTreeMap<Placement, SiteObservation> {
    let plan = fresh(d);
    let mut local = site();
    for (pid, vm) in ["alpha", "beta", "hyper"].into_iter().enumerate() {
        local
            .instances
            .insert(vm.into(), running(&spec(&plan, vm), 100 + pid as u32));
    }
    local.listening.extend(spec(&plan, "alpha").site_ports());
    local.listening.extend(spec(&plan, "beta").site_ports());
    local.listening.extend(spec(&plan, "hyper").site_ports());
    let mut hv = site();
    hv.instances
        .insert("inner".into(), running(&spec(&plan, "inner"), 7));
    hv.entries
        .extend(["00-tiny-amd64".to_string(), "05-plain_amd64".to_string()]);
    hv.networks.insert(
        "lab".into(),
        NetworkState {
            switch: true,
            tap: true,
        },
    );
    BTreeMap::from([(here(), local), (inside("hyper"), hv)])
}

#[test]
fn a_fresh_lab_creates_everything_and_plans_the_inside_of_hypervisors_later() {
    let (config, topology) = load(LAB);
    let d = desired(&config, &topology);
    let plan = fresh(&d);
    assert_eq!(
        plan.render(),
        "local (this machine):
  create   alpha  new
  create   beta   new
  create   hyper  new
inside VM hyper (planned again once hyper is up):
  push     00-tiny-amd64
  push     05-plain_amd64
  network  lab: start vde_switch, start tap 10.0.0.254/24
  create   inner  new
"
    );
    let alpha = spec(&plan, "alpha");
    assert_eq!(alpha.ssh_port(), Some(2202));
    assert_eq!(alpha.hw.memory_mib, 256);
    assert_eq!(alpha.hw.accel, ResolvedAccel::Tcg);
    assert_eq!(
        alpha.layer.disk,
        Path::new("/p/cache/store/05-plain_amd64/disk.qcow2")
    );
    assert_eq!(
        alpha.boot.as_ref().unwrap().kernel,
        Path::new("/p/cache/store/00-tiny-amd64/boot/vmlinuz")
    );
    assert_eq!(alpha.paths.dir, Path::new("/p/.farm/vms/alpha"));
    let inner = spec(&plan, "inner");
    assert_eq!(inner.paths.dir, Path::new("/var/lib/farm/state/vms/inner"));
    assert_eq!(
        inner.layer.disk,
        Path::new("/var/lib/farm/cache/store/05-plain_amd64/disk.qcow2")
    );
    assert_eq!(
        inner.vde_nics[0].plug,
        "/var/lib/farm/state/networks/lab/ctl"
    );
    assert!(inner.user_net.is_none());
    assert!(plan.changes() && plan.problems().is_empty());
}

#[test]
fn a_lab_running_as_planned_is_kept() {
    let (config, topology) = load(LAB);
    let d = desired(&config, &topology);
    let plan = plan_up(&d, &steady(&d));
    assert!(!plan.changes(), "{}", plan.render());
    assert_eq!(plan.summary(), "");
    assert!(plan.render().contains("  keep     alpha\n"));
    let beta = plan.vm("beta").unwrap();
    assert_eq!(beta.state(), VmState::Running);
    // An auto port stays the one it has.
    assert_eq!(
        beta.spec.ssh_port(),
        fresh(&d).vm("beta").unwrap().spec.ssh_port()
    );
}

#[test]
fn changed_hardware_ports_and_names_restart_with_reasons() {
    let (config, topology) = load(LAB);
    let d = desired(&config, &topology);
    let observed = steady(&d);
    let changed = LAB.replace(
        "[vms.alpha]\nplatform = \"plain\"\nssh_port = 2202",
        "[vms.alpha]\nplatform = \"plain\"\nssh_port = 2203\nmemory = \"512M\"\nhostname = \"a2\"",
    );
    let (config2, topology2) = load(&changed);
    let d2 = desired(&config2, &topology2);
    let plan = plan_up(&d2, &observed);
    let alpha = plan.vm("alpha").unwrap();
    assert_eq!(alpha.action, VmAction::Restart);
    assert_eq!(
        plan.summary(),
        "local (this machine):
  restart  alpha  hostname alpha → a2; memory 256M → 512M; ssh_port 2202 → 2203
  keep     2 VM(s) as they are
"
    );
    assert_eq!(alpha.state(), VmState::Changed);
    assert_eq!(alpha.running, Some(100));
    assert!(plan.problems().is_empty());
}

#[test]
fn a_new_platform_or_other_layer_bytes_replace_and_kept_disks_are_not_discarded() {
    let (config, topology) = load(LAB);
    let mut d = desired(&config, &topology);
    let observed = steady(&d);
    // The layer was rebuilt with other bytes under the same derivation.
    d.layers = layers(&topology, 9);
    let plan = plan_up(&d, &observed);
    let beta = plan.vm("beta").unwrap();
    assert_eq!(beta.action, VmAction::Replace);
    assert_eq!(
        beta.reasons[0].to_string(),
        "base layer bytes differ (its overlay was made on blake3-070707070707…, the store has blake3-090909090909…)"
    );
    // Stopped with `down --keep`: farm refuses to throw the disk away.
    let mut kept = observed.clone();
    let local = kept.get_mut(&here()).unwrap();
    let beta_found = local.instances.get_mut("beta").unwrap();
    beta_found.pid = None;
    beta_found.answers = None;
    if let Ok(record) = beta_found.record.as_mut() {
        record.kept = true;
    }
    let plan = plan_up(&d, &kept);
    assert_eq!(plan.problems().len(), 1, "{}", plan.render());
    assert!(plan.problems()[0].starts_with(
        "VM `beta` was stopped with `farm down --keep`, and replacing it would discard its disk"
    ));
    // Another platform.
    let other = LAB.replace(
        "[vms.beta]\nplatform = \"plain\"",
        "[vms.beta]\nplatform = \"hv\"",
    );
    let (config3, topology3) = load(&other);
    let d3 = desired(&config3, &topology3);
    let plan = plan_up(&d3, &steady(&desired(&config, &topology)));
    assert_eq!(
        plan.vm("beta").unwrap().reasons[0].to_string(),
        "platform `plain_amd64` → `hv_amd64`"
    );
}

#[test]
fn stopped_silent_and_unusable_instances_are_restarted_or_replaced() {
    let (config, topology) = load(LAB);
    let d = desired(&config, &topology);
    let mut observed = steady(&d);
    let local = observed.get_mut(&here()).unwrap();
    local.instances.get_mut("alpha").unwrap().pid = None;
    let beta = local.instances.get_mut("beta").unwrap();
    beta.answers = Some(false);
    if let Ok(r) = beta.record.as_mut() {
        r.ready = false;
    }
    local.instances.get_mut("hyper").unwrap().record = Err("written by an older farm".into());
    let plan = plan_up(&d, &observed);
    assert_eq!(
        plan.render().lines().take(4).collect::<Vec<_>>().join("\n"),
        "local (this machine):
  restart  alpha  qemu not running
  restart  beta   never answered ssh
  replace  hyper  its state is written by an older farm"
    );
    assert_eq!(plan.vm("alpha").unwrap().state(), VmState::Stopped);
    assert_eq!(plan.vm("beta").unwrap().state(), VmState::Unreachable);
    // The inside of a replaced hypervisor is planned from scratch once it runs again.
    let hv = plan.site(&inside("hyper")).unwrap();
    assert_eq!(hv.basis, farm::model::lab::up_plan::Basis::Fresh);
    assert_eq!(hv.vm("inner").unwrap().action, VmAction::Create);
}

#[test]
fn a_hypervisor_that_restarts_restarts_what_runs_inside_it() {
    let (config, topology) = load(LAB);
    let d = desired(&config, &topology);
    let mut observed = steady(&d);
    observed
        .get_mut(&here())
        .unwrap()
        .instances
        .get_mut("hyper")
        .unwrap()
        .pid = None;
    let plan = plan_up(&d, &observed);
    let hv = plan.site(&inside("hyper")).unwrap();
    assert_eq!(hv.basis, farm::model::lab::up_plan::Basis::AfterRestart);
    assert_eq!(
        hv.vm("inner").unwrap().reasons[0].to_string(),
        "its hypervisor restarts"
    );
    assert!(hv.push.is_empty(), "its store kept the layers");
    assert!(hv.networks[0].start_switch && hv.networks[0].start_tap);
}

#[test]
fn ports_in_use_orphans_and_missing_tools_are_problems_before_anything_starts() {
    let (config, topology) = load(LAB);
    let d = desired(&config, &topology);
    let mut local = site();
    local.listening.insert(2202);
    local.tagged.push(TaggedProcess {
        pid: 4242,
        what: "vm:beta".into(),
    });
    local.tagged.push(TaggedProcess {
        pid: 4343,
        what: "vm:gone".into(),
    });
    local.facts.missing = vec!["qemu-img".into()];
    let plan = plan_up(&d, &BTreeMap::from([(here(), local)]));
    let problems = plan.problems();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems.contains(
        &"Port 2202 on 127.0.0.1 of host `local`, wanted by VM `alpha`, is already in use\nhint: stop what uses it, or change `ssh_port`/`forwards` of `alpha` in farm.toml"
    ));
    assert!(problems.contains(
        &"VM `beta` already runs on `local` (qemu pid 4242), but farm has no state for that copy (was `.farm/` deleted?)\nhint: `farm down beta` stops it, then `farm up`"
    ));
    assert!(problems.contains(
        &"Host `local` cannot run its VMs: it lacks qemu-img\nhint: run ./scripts/setup.sh, or `apt-get install qemu-utils`"
    ));
    let warnings = &plan.site(&here()).unwrap().warnings;
    assert!(
        warnings[0].starts_with("qemu pid 4343 on `local` is farm's VM `gone`"),
        "{warnings:?}"
    );
    // Its own running qemu holds the port: a restart may reuse it.
    let mut observed = steady(&d);
    let alpha = observed
        .get_mut(&here())
        .unwrap()
        .instances
        .get_mut("alpha")
        .unwrap();
    alpha.answers = Some(false);
    assert!(plan_up(&d, &observed).problems().is_empty());
}

#[test]
fn a_hypervisor_vm_without_the_tools_is_told_which_packages_to_add() {
    let (config, topology) = load(LAB);
    let d = desired(&config, &topology);
    let mut observed = steady(&d);
    let hv = observed.get_mut(&inside("hyper")).unwrap();
    hv.facts.missing = vec!["b3sum".into(), "vde_switch".into()];
    hv.instances.clear();
    let plan = plan_up(&d, &observed);
    assert_eq!(
        plan.site(&inside("hyper")).unwrap().problems,
        [
            "Host `hyper` cannot run its VMs: it lacks b3sum, vde_switch\nhint: add `packages = [\"b3sum\", \"vde2\"]` to the platform of `hyper`"
        ]
    );
}

#[test]
fn new_ports_are_stable_free_and_distinct() {
    let (config, topology) = load(LAB);
    let d = desired(&config, &topology);
    let first = spec(&fresh(&d), "beta").ssh_port().unwrap();
    let mut busy = site();
    busy.listening.insert(first);
    let plan = plan_up(&d, &BTreeMap::from([(here(), busy)]));
    let second = spec(&plan, "beta").ssh_port().unwrap();
    assert_ne!(first, second);
    assert!((20000..30000).contains(&second));
    let hyper = spec(&plan, "hyper").ssh_port().unwrap();
    let ports: BTreeSet<u16> = [2202, second, hyper].into();
    assert_eq!(ports.len(), 3);
}

#[test]
fn a_disk_size_smaller_than_the_layer_is_refused_before_the_overlay_is_made() {
    let small = LAB.replace(
        "[vms.beta]\nplatform = \"plain\"\n",
        "[vms.beta]\nplatform = \"plain\"\ndisk_size = \"1G\"\n",
    );
    let (config, topology) = load(&small);
    let d = desired(&config, &topology);
    let plan = fresh(&d);
    assert_eq!(
        plan.problems(),
        vec![
            "VM `beta` has `disk_size = \"1G\"`, smaller than the 2G disk of its layer `plain_amd64`: the guest would see its disk cut off\nhint: make `disk_size` at least \"2G\", or leave it out to get the layer's size"
        ]
    );

    let (config, topology) = load(&small.replace("\"1G\"", "\"4G\""));
    assert!(fresh(&desired(&config, &topology)).problems().is_empty());
}

/// `down`'s plan over the steady lab: what `look` would have seen on each site.
fn down_looks(
    d: &Desired,
    hyper_running: bool,
) -> BTreeMap<Placement, farm::model::lab::down_plan::SiteLook> {
    use farm::model::lab::down_plan::SiteLook;
    let mut observed = steady(d);
    observed
        .get_mut(&here())
        .unwrap()
        .tagged
        .push(TaggedProcess {
            pid: 999,
            what: "vm:gone".into(),
        });
    let mut looks = BTreeMap::new();
    let local = observed.remove(&here()).unwrap();
    looks.insert(
        here(),
        SiteLook::Observed {
            observation: local,
            domains: Vec::new(),
        },
    );
    let inside_hyper = if hyper_running {
        SiteLook::Observed {
            observation: observed.remove(&inside("hyper")).unwrap(),
            domains: Vec::new(),
        }
    } else {
        SiteLook::HypervisorDown {
            hypervisor: "hyper".into(),
            known: vec!["inner".into()],
        }
    };
    looks.insert(inside("hyper"), inside_hyper);
    looks
}

#[test]
fn down_plans_the_deepest_site_first_with_its_networks_and_orphans() {
    use farm::model::lab::down_plan::{DownRequest, plan_down, sites_to_visit, with_descendants};
    let (config, topology) = load(LAB);
    let d = desired(&config, &topology);
    let all = DownRequest {
        wanted: with_descendants(&topology, &[]),
        everything: true,
        keep: false,
    };
    let visit = sites_to_visit(&d, &all);
    assert_eq!(visit, vec![(1, inside("hyper")), (0, here())]);
    let plan = plan_down(&d, &all, &visit, &down_looks(&d, true));
    assert_eq!(
        plan.render(),
        "down, deepest site first (overlays removed):
  1. inside hyper (depth 1):
       stop inner (power off)
       tear down network lab
  2. host local (depth 0):
       stop alpha (power off)
       stop beta (power off)
       stop hyper (power off)
       stop gone (qemu pid 999, which farm has no state for)
"
    );

    // Naming the hypervisor takes what runs inside it and leaves the rest; the orphan of
    // a VM that was not named stays.
    let hyper = DownRequest {
        wanted: with_descendants(&topology, &["hyper".to_string()]),
        everything: false,
        keep: true,
    };
    assert_eq!(
        hyper.wanted,
        BTreeSet::from(["hyper".to_string(), "inner".to_string()])
    );
    let visit = sites_to_visit(&d, &hyper);
    let plan = plan_down(&d, &hyper, &visit, &down_looks(&d, true));
    assert_eq!(
        plan.render(),
        "down, deepest site first (overlays kept):
  1. inside hyper (depth 1):
       stop inner (power off)
       tear down network lab
  2. host local (depth 0):
       stop hyper (power off)
"
    );

    // A hypervisor that is not running took its VMs with it: they are forgotten.
    let plan = plan_down(&d, &all, &sites_to_visit(&d, &all), &down_looks(&d, false));
    assert!(
        plan.render().starts_with(
            "down, deepest site first (overlays removed):
  1. inside hyper (depth 1):
       forget inner (it stopped with hyper, which is not running)
  2. host local (depth 0):"
        ),
        "{}",
        plan.render()
    );

    // Nothing observed anywhere: nothing to do.
    let mut empty = BTreeMap::new();
    empty.insert(
        here(),
        farm::model::lab::down_plan::SiteLook::Observed {
            observation: site(),
            domains: Vec::new(),
        },
    );
    let plan = plan_down(&d, &all, &[(0, here())], &empty);
    assert!(plan.is_noop());
    assert_eq!(
        plan.render(),
        "nothing to stop: no VM of this lab is running or has state\n"
    );
}

/// The converged snapshot may be restored or saved only by an `up` that creates every VM on
/// the hosts anew; one that keeps or restarts any is not from nothing.
#[test]
fn only_an_up_that_creates_every_vm_anew_is_from_nothing() {
    use farm::model::lab::converged::from_nothing;
    let (config, topology) = load(LAB);
    let d = desired(&config, &topology);
    assert!(from_nothing(&fresh(&d)));
    assert!(!from_nothing(&plan_up(&d, &steady(&d))));
    // One VM still running (the others gone) is not nothing either.
    let mut observed = steady(&d);
    let local = observed.get_mut(&here()).unwrap();
    local.instances.remove("beta");
    local.instances.remove("hyper");
    assert!(!from_nothing(&plan_up(&d, &observed)));
}

/// The converged snapshot's key: the same lab, however farm.toml is laid out, has the same
/// key; a layer's bytes, a VM's memory, a playbook or farm's version make another.
#[test]
fn the_converged_key_follows_what_the_lab_is_made_of_and_not_how_farm_toml_is_written() {
    use farm::model::lab::converged::converged_key;
    let playbooks = BTreeMap::from([("alpha".to_string(), "blake3-aa".to_string())]);
    let key_of = |text: &str, bytes: u8, playbooks: &BTreeMap<String, String>, version: &str| {
        let (config, topology) = load(text);
        let mut d = desired(&config, &topology);
        d.layers = layers(&topology, bytes);
        converged_key(&d, playbooks, version)
    };
    let key = key_of(LAB, 7, &playbooks, "1.0");
    assert_eq!(key, key_of(LAB, 7, &playbooks, "1.0"));
    // Comments and blank lines move every span; the key stays.
    let commented = format!(
        "# the lab\n\n{}",
        LAB.replace("[vms.alpha]", "# A\n[vms.alpha]")
    );
    assert_eq!(key_of(&commented, 7, &playbooks, "1.0"), key);
    // What the lab is made of changes it.
    assert_ne!(key_of(LAB, 8, &playbooks, "1.0"), key);
    let bigger = LAB.replace(
        "[vms.beta]\nplatform = \"plain\"",
        "[vms.beta]\nplatform = \"plain\"\nmemory = \"512M\"",
    );
    assert_ne!(key_of(&bigger, 7, &playbooks, "1.0"), key);
    let platform = LAB.replace("memory = \"256M\"", "memory = \"320M\"");
    assert_ne!(key_of(&platform, 7, &playbooks, "1.0"), key);
    let other_playbook = BTreeMap::from([("alpha".to_string(), "blake3-bb".to_string())]);
    assert_ne!(key_of(LAB, 7, &other_playbook, "1.0"), key);
    assert_ne!(key_of(LAB, 7, &playbooks, "1.1"), key);
}
