//! The kernel modules the tiny guest loads (virtio, FAT), with their dependencies read from
//! each module's `.modinfo`, in the order `insmod` needs.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};

use super::TinyImageError;
use crate::model::build::tiny_recipe::WANTED_MODULES;

/// The `depends=` field of a kernel module's `.modinfo` section: the modules it needs
/// loaded first. Read from the bytes, so the host needs no `modinfo` (kmod).
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"depends=";
    let mut at = 0;
    while let Some(pos) = ko[at..].windows(KEY.len()).position(|w| w == KEY) {
        let start = at + pos;
        at = start + KEY.len();
        // A field starts a NUL-separated string; `depends=` inside other text is not one.
        if start > 0 && ko[start - 1] != 0 {
            continue;
        }
        let end = ko[at..]
            .iter()
            .position(|&b| b == 0)
            .map_or(ko.len(), |e| at + e);
        return String::from_utf8_lossy(&ko[at..end])
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
    }
    Vec::new()
}

/// Every module file under `dir`, by module name (`-` and `_` are one in module names).
pub(super) fn index_modules(dir: &Path) -> io::Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![dir.join("kernel")];
    while let Some(path) = stack.pop() {
        for entry in fs_err::read_dir(&path)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
                && let Some(stem) = name.strip_suffix(".ko")
            {
                index.insert(stem.replace('-', "_"), path.clone());
            }
        }
    }
    Ok(index)
}

/// [`WANTED_MODULES`] and their dependencies, dependencies first: the order `insmod` needs.
pub(super) fn resolve_modules(dir: &Path) -> Result<Vec<String>, TinyImageError> {
    let index = index_modules(dir)?;
    let builtin: HashSet<String> = fs_err::read_to_string(dir.join("modules.builtin"))?
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko"))
        .map(|n| n.replace('-', "_"))
        .collect();
    let mut depends = BTreeMap::new();
    let mut queue: VecDeque<String> = WANTED_MODULES.iter().map(|m| m.replace('-', "_")).collect();
    while let Some(module) = queue.pop_front() {
        if depends.contains_key(&module) || builtin.contains(&module) {
            continue;
        }
        let path = index.get(&module).ok_or_else(|| TinyImageError::NoModule {
            module: module.clone(),
            dir: dir.to_path_buf(),
        })?;
        let deps: Vec<String> = module_depends(&fs_err::read(path)?)
            .into_iter()
            .map(|d| d.replace('-', "_"))
            .filter(|d| !builtin.contains(d))
            .collect();
        queue.extend(deps.iter().cloned());
        depends.insert(module, deps);
    }
    Ok(load_order(&depends))
}

/// A topological order of `depends` (name → names it needs): every module after its
/// dependencies; ties in the order the wanted list gives them, so the order is stable.
pub fn load_order(depends: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    fn visit(
        module: &str,
        depends: &BTreeMap<String, Vec<String>>,
        done: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !done.insert(module.to_string()) {
            return;
        }
        for dep in depends.get(module).into_iter().flatten() {
            visit(dep, depends, done, order);
        }
        if depends.contains_key(module) {
            order.push(module.to_string());
        }
    }
    let mut done = HashSet::new();
    let mut order = Vec::new();
    let roots = WANTED_MODULES
        .iter()
        .map(|m| m.replace('-', "_"))
        .chain(depends.keys().cloned())
        .collect::<Vec<_>>();
    for module in roots {
        visit(&module, depends, &mut done, &mut order);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_depends_from_modinfo() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=virtio_ring,virtio\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["virtio_ring", "virtio"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"no such field").is_empty());
    }

    #[test]
    fn dependencies_load_first() {
        let mut depends = BTreeMap::new();
        let mut add = |m: &str, d: &[&str]| {
            depends.insert(m.to_string(), d.iter().map(|s| s.to_string()).collect())
        };
        add("virtio_net", &["virtio_ring", "virtio", "net_failover"]);
        add("net_failover", &["failover"]);
        add("failover", &[]);
        add("virtio", &["virtio_ring"]);
        add("virtio_ring", &[]);
        add(
            "virtio_pci",
            &["virtio_ring", "virtio_pci_modern_dev", "virtio"],
        );
        add("virtio_pci_modern_dev", &[]);
        let order = load_order(&depends);
        let at = |m: &str| order.iter().position(|x| x == m).unwrap();
        assert_eq!(order.len(), depends.len());
        for (module, deps) in &depends {
            for dep in deps {
                assert!(at(dep) < at(module), "{dep} before {module}: {order:?}");
            }
        }
    }
}
