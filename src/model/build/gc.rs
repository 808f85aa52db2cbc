//! What `farm gc` keeps and removes, decided from a list of entries and the roots found for
//! them: pure, so every rule is a unit test and `--dry-run` prints exactly what would happen.
//!
//! Rules: every root's entry and its whole backing chain is kept. Of the rest, `--older-than`
//! spares entries built recently and `--max-size` removes only as much (oldest first) as
//! brings the store under the size. Whatever is spared is a kept entry too, so the entries
//! it backs onto are kept with it: nothing that is kept ever loses a backing file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

/// One store entry, as gc sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcEntry {
    pub dir_name: String,
    /// The entry its disk backs onto.
    pub parent: Option<String>,
    /// Bytes on disk (allocated), freed if it is removed.
    pub bytes: u64,
    pub built_at_unix: u64,
}

/// Why an entry stays.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeepReason {
    /// The farm.toml gc runs for wants it.
    ThisProject,
    /// Another project registered it (its farm.toml).
    Project(PathBuf),
    /// An instance of a project boots on it.
    Instance { vm: String, state_dir: PathBuf },
    /// A saved lab snapshot's disk backs onto it.
    Snapshot { name: String, state_dir: PathBuf },
    /// A running process (qemu) has its files open.
    OpenBy { pid: u32, command: String },
    /// Named with `--keep`.
    Asked,
    /// A kept entry backs onto it.
    BackingOf(String),
    /// Spared by `--older-than` or `--max-size`.
    Spared,
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::ThisProject => write!(f, "wanted by this farm.toml"),
            KeepReason::Project(config) => write!(f, "wanted by `{}`", config.display()),
            KeepReason::Instance { vm, state_dir } => {
                write!(f, "VM `{vm}` of `{}` boots on it", state_dir.display())
            }
            KeepReason::Snapshot { name, state_dir } => {
                write!(f, "snapshot `{name}` of `{}` needs it", state_dir.display())
            }
            KeepReason::OpenBy { pid, command } => write!(f, "open in {command} (pid {pid})"),
            KeepReason::Asked => write!(f, "--keep"),
            KeepReason::BackingOf(child) => write!(f, "`{child}` backs onto it"),
            KeepReason::Spared => write!(f, "spared by --older-than/--max-size"),
        }
    }
}

/// Limits on what may go, beyond being unreachable from a root.
#[derive(Clone, Copy, Debug, Default)]
pub struct GcLimits {
    /// Only entries built at least this many seconds ago may go.
    pub older_than_secs: Option<u64>,
    /// Remove (oldest first) only until the store holds at most this many bytes.
    pub max_size: Option<u64>,
    pub now_unix: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// Kept entries with the first reason found for each.
    pub keep: BTreeMap<String, KeepReason>,
    /// Entries to remove, children before their parents.
    pub remove: Vec<String>,
    pub freed_bytes: u64,
    /// Roots that name an entry the store does not have (nothing to keep for them).
    pub missing_roots: Vec<(String, KeepReason)>,
}

/// Decides what goes. `roots` may name an entry more than once; the first reason wins.
pub fn plan_gc(entries: &[GcEntry], roots: &[(String, KeepReason)], limits: GcLimits) -> GcPlan {
    let by_name: BTreeMap<&str, &GcEntry> =
        entries.iter().map(|e| (e.dir_name.as_str(), e)).collect();
    let mut plan = GcPlan::default();
    let keep = |name: &str, reason: KeepReason, keep_map: &mut BTreeMap<String, KeepReason>| {
        // Walk the backing chain; stop where an ancestor is already kept.
        let mut current = Some(name.to_string());
        let mut why = reason;
        while let Some(at) = current {
            let Some(entry) = by_name.get(at.as_str()) else {
                break;
            };
            if keep_map.contains_key(&at) {
                break;
            }
            keep_map.insert(at.clone(), why);
            why = KeepReason::BackingOf(at.clone());
            current = entry.parent.clone();
        }
    };
    for (name, reason) in roots {
        if by_name.contains_key(name.as_str()) {
            keep(name, reason.clone(), &mut plan.keep);
        } else {
            plan.missing_roots.push((name.clone(), reason.clone()));
        }
    }

    // Unreachable entries, oldest first: the order `--max-size` removes them in.
    let mut dead: Vec<&GcEntry> = entries
        .iter()
        .filter(|e| !plan.keep.contains_key(&e.dir_name))
        .collect();
    dead.sort_by_key(|e| (e.built_at_unix, e.dir_name.clone()));
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    let mut chosen: BTreeSet<&str> = BTreeSet::new();
    for entry in &dead {
        let young = limits
            .older_than_secs
            .is_some_and(|age| limits.now_unix.saturating_sub(entry.built_at_unix) < age);
        let small_enough = limits.max_size.is_some_and(|max| total <= max);
        if young || small_enough {
            continue;
        }
        chosen.insert(&entry.dir_name);
        total = total.saturating_sub(entry.bytes);
    }
    // What is spared is kept, with everything it backs onto.
    for entry in &dead {
        if !chosen.contains(entry.dir_name.as_str()) {
            keep(&entry.dir_name, KeepReason::Spared, &mut plan.keep);
        }
    }
    let mut remove: Vec<&GcEntry> = dead
        .into_iter()
        .filter(|e| !plan.keep.contains_key(&e.dir_name))
        .collect();
    // Children first: an entry goes before the one it backs onto.
    remove.sort_by_key(|e| std::cmp::Reverse(depth(e, &by_name)));
    plan.freed_bytes = remove.iter().map(|e| e.bytes).sum();
    plan.remove = remove.into_iter().map(|e| e.dir_name.clone()).collect();
    plan
}

fn depth(entry: &GcEntry, by_name: &BTreeMap<&str, &GcEntry>) -> usize {
    let mut depth = 0;
    let mut current = entry.parent.as_deref();
    while let Some(name) = current {
        depth += 1;
        if depth > by_name.len() {
            break; // a cycle in damaged metadata must not hang gc
        }
        current = by_name.get(name).and_then(|e| e.parent.as_deref());
    }
    depth
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, parent: Option<&str>, bytes: u64, built: u64) -> GcEntry {
        GcEntry {
            dir_name: name.into(),
            parent: parent.map(Into::into),
            bytes,
            built_at_unix: built,
        }
    }

    /// image ← base ← web (live), image ← old (dead), lone (dead).
    fn store() -> Vec<GcEntry> {
        vec![
            entry("image", None, 100, 10),
            entry("base", Some("image"), 10, 20),
            entry("web", Some("base"), 5, 30),
            entry("old", Some("image"), 7, 15),
            entry("lone", None, 50, 5),
            entry("leaf", Some("old"), 3, 40),
        ]
    }

    #[test]
    fn roots_keep_their_backing_chains_and_the_rest_goes_children_first() {
        let plan = plan_gc(
            &store(),
            &[("web".into(), KeepReason::ThisProject)],
            GcLimits::default(),
        );
        assert_eq!(plan.keep["web"], KeepReason::ThisProject);
        assert_eq!(plan.keep["base"], KeepReason::BackingOf("web".into()));
        assert_eq!(plan.keep["image"], KeepReason::BackingOf("base".into()));
        assert_eq!(plan.remove, vec!["leaf", "old", "lone"]);
        assert_eq!(plan.freed_bytes, 60);
    }

    #[test]
    fn a_spared_entry_keeps_what_it_backs_onto() {
        let limits = GcLimits {
            older_than_secs: Some(20),
            now_unix: 50,
            ..GcLimits::default()
        };
        let plan = plan_gc(&store(), &[], limits);
        // `leaf` (built at 40) is young, so `old` and `image` under it stay too.
        assert_eq!(plan.keep["leaf"], KeepReason::Spared);
        assert_eq!(plan.keep["old"], KeepReason::BackingOf("leaf".into()));
        assert!(plan.keep.contains_key("image"));
        assert!(plan.remove.contains(&"lone".to_string()));
        assert!(!plan.remove.contains(&"image".to_string()));
    }

    #[test]
    fn max_size_removes_the_oldest_until_the_store_fits() {
        let limits = GcLimits {
            max_size: Some(130),
            ..GcLimits::default()
        };
        // 175 bytes in all; `lone` (50, oldest) brings it to 125.
        let plan = plan_gc(&store(), &[("web".into(), KeepReason::Asked)], limits);
        assert_eq!(plan.remove, vec!["lone"]);
        assert_eq!(plan.freed_bytes, 50);
    }

    #[test]
    fn a_root_without_an_entry_is_reported_and_keeps_nothing() {
        let plan = plan_gc(
            &store(),
            &[("gone-x".into(), KeepReason::Asked)],
            GcLimits::default(),
        );
        assert_eq!(plan.missing_roots.len(), 1);
        assert_eq!(plan.remove.len(), 6);
    }
}
