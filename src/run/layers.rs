//! The layer each VM's platform is realised as, as the plan needs it: the store entry, its
//! bytes' hash, its boot files and the entries a site must have to boot it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::build::layer::BootFiles;
use crate::model::build::derivation::{DrvGraph, DrvId};
use crate::model::build::qemu::DirectBoot;
use crate::model::config::topology::Topology;
use crate::model::lab::up_plan::LayerInfo;
use crate::store::{Entry, Store, StoreError, entry_dir_name};

/// Layers by `(platform, target)` for the `vms` given. `built` holds the entries a build
/// just realised; others are looked up in `store` (when there is one). A layer not built yet
/// (a dry run) has no hash and boots with the nearest built ancestor's files.
pub fn resolve(
    graph: &DrvGraph,
    topology: &Topology,
    vms: &BTreeSet<String>,
    built: &BTreeMap<DrvId, Entry>,
    store: Option<&Store>,
) -> Result<BTreeMap<(String, String), LayerInfo>, StoreError> {
    let mut layers = BTreeMap::new();
    for vm in topology.vms.values().filter(|vm| vms.contains(&vm.name)) {
        let key = (vm.platform.clone(), vm.target.clone());
        if layers.contains_key(&key) {
            continue;
        }
        let id = DrvId::Platform {
            platform: vm.platform.clone(),
            target: vm.target.clone(),
        };
        let entry_of = |id: &DrvId| -> Result<Option<Entry>, StoreError> {
            if let Some(entry) = built.get(id) {
                return Ok(Some(entry.clone()));
            }
            let node = &graph.nodes[id];
            match store {
                Some(store) => store.lookup(&node.hash, &node.name),
                None => Ok(None),
            }
        };
        let node = &graph.nodes[&id];
        // The directory an entry really has (it may carry another name for the same
        // derivation), or the one it will get when built.
        let dir_name =
            |n: &crate::model::build::derivation::DrvNode| -> Result<String, StoreError> {
                Ok(match entry_of(&n.id)? {
                    Some(entry) => entry.dir_name().to_string(),
                    None => entry_dir_name(&n.hash, &n.name),
                })
            };
        let closure: Vec<String> = graph
            .closure(std::slice::from_ref(&id))
            .into_iter()
            .map(dir_name)
            .collect::<Result<_, _>>()?;
        let mut boot = None;
        let mut current = Some(id.clone());
        while let Some(at) = current {
            if let Some(files) = entry_of(&at)?
                .and_then(|e| e.boot_dir())
                .and_then(|dir| BootFiles::in_dir(&dir))
            {
                boot = Some(relative_boot(&files));
                break;
            }
            current = graph.nodes.get(&at).and_then(|n| n.parent.clone());
        }
        let entry = entry_of(&id)?;
        let entry_dir = dir_name(node)?;
        let virtual_size = match &entry {
            Some(entry) => entry.virtual_size()?,
            None => None,
        };
        layers.insert(
            key,
            LayerInfo {
                drv_hash: node.hash,
                name: node.name.clone(),
                entry: entry_dir,
                blake3: entry.map(|e| e.meta.output_blake3),
                virtual_size,
                boot,
                closure,
            },
        );
    }
    Ok(layers)
}

/// Boot files with paths relative to the store's `store/` directory, so each site resolves
/// them in its own copy of the store.
fn relative_boot(files: &BootFiles) -> DirectBoot {
    let relative = |path: &Path| -> PathBuf {
        let mut parts = path.components().rev();
        let file = parts.next().map(|c| c.as_os_str().to_owned());
        let boot = parts.next().map(|c| c.as_os_str().to_owned());
        let entry = parts.next().map(|c| c.as_os_str().to_owned());
        [entry, boot, file].into_iter().flatten().collect()
    };
    DirectBoot {
        kernel: relative(&files.kernel),
        initrd: files.initrd.as_deref().map(relative),
        cmdline: files.cmdline.clone(),
    }
}
