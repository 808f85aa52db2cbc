//! A VM's instance spec on its site: everything farm.toml, the store and the site decide,
//! resolved.

use std::path::Path;

use super::{Desired, SiteLayout};
use crate::model::build::qemu::{DirectBoot, MachineSpec, ProcessTag, choose_accel};
use crate::model::config::network::{SiteNetwork, vde_nics};
use crate::model::config::topology::VmNode;
use crate::model::lab::instance::{
    InstancePaths, InstanceSpec, LayerRef, LibvirtNicSpec, UserNet, VdeNicSpec,
};
use crate::model::lab::observation::{SiteFacts, SiteObservation};
use crate::model::values::mac_for;

/// The first MAC index of libvirt NICs: clear of the user NIC (0) and VDE NICs (1…).
const LIBVIRT_NIC_BASE: usize = 64;

/// Memory of a VM whose platform and table say nothing.
pub const DEFAULT_MEMORY_MIB: u64 = 1024;

/// Points `spec`'s layer and boot files at the entries the site already has for the same
/// derivations under other names (see [`SiteObservation::entry_for`]): a layer pushed
/// there for another platform of the same recipe is that layer, and a VM running on it
/// has not seen its layer move.
pub(super) fn use_site_entries(
    spec: &mut InstanceSpec,
    layout: &SiteLayout,
    seen: &SiteObservation,
) {
    let Some(there) = seen
        .entry_for(&spec.layer.entry)
        .filter(|e| *e != spec.layer.entry)
    else {
        return;
    };
    spec.layer.entry = there.to_string();
    spec.layer.disk = layout
        .store_entries
        .join(there)
        .join(crate::model::build::cache_record::DISK_FILE);
    if let Some(boot) = &mut spec.boot {
        let rename = |path: &mut std::path::PathBuf| {
            let Ok(relative) = path.strip_prefix(&layout.store_entries) else {
                return;
            };
            let mut parts = relative.components();
            let Some(entry) = parts.next().and_then(|c| c.as_os_str().to_str()) else {
                return;
            };
            if let Some(found) = seen.entry_for(entry).filter(|f| *f != entry) {
                *path = layout.store_entries.join(found).join(parts.as_path());
            }
        };
        rename(&mut boot.kernel);
        if let Some(initrd) = &mut boot.initrd {
            rename(initrd);
        }
    }
}

/// The spec of `vm` on a site laid out as `layout` with `facts`.
pub(super) fn resolve(
    desired: &Desired,
    layout: &SiteLayout,
    vm: &VmNode,
    facts: &SiteFacts,
    ssh_port: Option<u16>,
    networks: &[SiteNetwork],
) -> InstanceSpec {
    let target = &desired.config.targets[&vm.target];
    let layer = desired.layer_of(vm);
    let on_site = |relative: &Path| layout.store_entries.join(relative);
    let accel = choose_accel(
        desired.accel.unwrap_or(target.accel),
        facts.kvm,
        facts.arch.unwrap_or(target.arch),
        target.arch,
    );
    InstanceSpec {
        name: vm.name.clone(),
        hostname: vm.hostname.clone(),
        platform: layer.name.clone(),
        drv_hash: layer.drv_hash,
        layer: LayerRef {
            entry: layer.entry.clone(),
            disk: on_site(
                &Path::new(&layer.entry).join(crate::model::build::cache_record::DISK_FILE),
            ),
            blake3: layer.blake3,
        },
        boot: layer.boot.as_ref().map(|b| DirectBoot {
            kernel: on_site(&b.kernel),
            initrd: b.initrd.as_deref().map(on_site),
            cmdline: b.cmdline.clone(),
        }),
        uefi: layer.boot.is_none()
            && crate::model::config::validate::firmware_of(
                desired.config,
                &vm.platform,
                target.arch,
            ) == crate::model::values::Firmware::Uefi,
        hw: MachineSpec {
            arch: target.arch,
            machine: target.machine.clone(),
            cpu: target.cpu.clone(),
            accel,
            memory_mib: vm
                .resources
                .memory
                .map(|m| m.mib())
                .unwrap_or(DEFAULT_MEMORY_MIB),
            cpus: vm.resources.cpus.unwrap_or(1),
        },
        disk_size: vm.resources.disk_size.map(|s| s.0),
        user_net: match (vm.user_network, ssh_port) {
            (true, Some(port)) => Some(UserNet {
                mac: mac_for(&vm.name, 0),
                ssh_port: port,
                forwards: vm.forwards.iter().map(|f| (f.host, f.guest)).collect(),
            }),
            _ => None,
        },
        vde_nics: vde_nics(vm)
            .into_iter()
            .map(|nic| {
                let plug = networks
                    .iter()
                    .find(|n| n.name == nic.network)
                    .map(|n| n.plug(&layout.state_dir))
                    .unwrap_or_default();
                VdeNicSpec {
                    network: nic.network,
                    mac: nic.mac,
                    address: nic.address,
                    gateway: nic.gateway,
                    plug,
                }
            })
            .collect(),
        libvirt_nics: vm
            .libvirt_nics
            .iter()
            .enumerate()
            .map(|(i, nic)| LibvirtNicSpec {
                network: nic.network.clone(),
                mac: nic
                    .mac
                    .unwrap_or_else(|| mac_for(&vm.name, LIBVIRT_NIC_BASE + i)),
                address: nic.ip,
                gateway: nic.gateway,
            })
            .collect(),
        authorized_keys: desired.farm_key.iter().cloned().collect(),
        paths: InstancePaths::new(&layout.state_dir, &vm.name),
        tag: ProcessTag::vm(&desired.project_tag(), &vm.name),
        backend: desired.topology.backend_on(&vm.placement),
    }
}
