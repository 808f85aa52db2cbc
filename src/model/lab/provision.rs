//! A VM's own playbook (`[vms.NAME] playbook = "…"`), the seed's `guest_provision` phase:
//! when `farm up` applies it, and what Ansible's recap says about each host.
//!
//! Pure: the marker's text and ansible-playbook's output come in, decisions come out.

use std::collections::BTreeSet;

use crate::model::hash::ContentHash;

/// Why a VM's playbook runs, or `None` when it already ran with this content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProvisionReason {
    /// No marker: the VM's overlay is new (first boot, or replaced).
    FirstBoot,
    /// It ran with other content: the playbook or its `roles/` changed since.
    Changed,
}

impl std::fmt::Display for ProvisionReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProvisionReason::FirstBoot => "not applied to this VM yet",
            ProvisionReason::Changed => "the playbook changed",
        })
    }
}

/// The marker farm writes once a VM's playbook succeeded: the content hash it ran with.
pub fn marker_text(hash: &ContentHash) -> String {
    format!("{hash}\n")
}

/// Whether the playbook with content `hash` must run, given the VM's marker (if any).
pub fn reason(marker: Option<&str>, hash: &ContentHash) -> Option<ProvisionReason> {
    match marker {
        None => Some(ProvisionReason::FirstBoot),
        Some(text) if text.trim() == hash.to_string() => None,
        Some(_) => Some(ProvisionReason::Changed),
    }
}

/// The hosts `PLAY RECAP` shows with nothing failed and nothing unreachable: those whose
/// playbook ran through, even when the run as a whole failed on another host.
pub fn succeeded_hosts(output: &str) -> BTreeSet<String> {
    let Some((_, recap)) = output.rsplit_once("PLAY RECAP") else {
        return BTreeSet::new();
    };
    recap
        .lines()
        .filter_map(|line| {
            let (host, counts) = line.split_once(" : ")?;
            let count = |name: &str| -> Option<u64> {
                counts
                    .split_whitespace()
                    .find_map(|c| c.strip_prefix(name)?.strip_prefix('='))?
                    .parse()
                    .ok()
            };
            let clean = count("ok").is_some()
                && count("failed") == Some(0)
                && count("unreachable") == Some(0);
            clean.then(|| host.trim().to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_first_boot_and_when_changed_only() {
        let hash = ContentHash::from_blake3(blake3::hash(b"- hosts: all\n"));
        assert_eq!(reason(None, &hash), Some(ProvisionReason::FirstBoot));
        assert_eq!(reason(Some(&marker_text(&hash)), &hash), None);
        let other = ContentHash::from_blake3(blake3::hash(b"other"));
        assert_eq!(
            reason(Some(&marker_text(&other)), &hash),
            Some(ProvisionReason::Changed)
        );
    }

    #[test]
    fn recap_names_the_hosts_that_went_through() {
        let out = "TASK [x] ***\nok: [a]\n\nPLAY RECAP *********\n\
                   a                          : ok=3    changed=2    unreachable=0    failed=0    skipped=0    rescued=0    ignored=0\n\
                   b                          : ok=1    changed=0    unreachable=0    failed=1    skipped=0    rescued=0    ignored=0\n\
                   c                          : ok=0    changed=0    unreachable=1    failed=0    skipped=0    rescued=0    ignored=0\n";
        assert_eq!(succeeded_hosts(out).into_iter().collect::<Vec<_>>(), ["a"]);
        assert!(succeeded_hosts("ERROR! the playbook could not be found").is_empty());
    }
}
