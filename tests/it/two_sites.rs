//! Two hypervisor VMs, each running a VM of its own: the sites are independent, so farm
//! boots both hypervisors, pushes into both and starts both guests at the same time instead
//! of one site after the other. It boots its L1s rather than restoring a snapshot: their
//! side-by-side boot is what it tests.

use crate::support::labs;
use crate::support::project;
use crate::support::skip::require_vm;
use crate::support::test_home::shared_store;

use project::Project;

/// Two hypervisor VMs on the tests' L1 platform (`debian_vs`, the nested lab's too: one layer
/// in the test store), a tiny guest in each. One vCPU each: two of them side by side on two
/// cores under TCG (measured: up 41 s and 73 CPU-s, against 57 s and 106 CPU-s with two).
const VMS: &str = r#"
[vms.hv_a]
platform = "debian_vs"
cpus = 1

[vms.hv_b]
platform = "debian_vs"
cpus = 1

[vms.a1]
platform = "leaf"
host = "hv_a"

[vms.b1]
platform = "leaf"
host = "hv_b"
"#;

/// The index of the first line of `log` containing every one of `words`.
fn line_of(log: &str, words: &[&str]) -> usize {
    log.lines()
        .position(|l| words.iter().all(|w| l.contains(w)))
        .unwrap_or_else(|| panic!("no line with {words:?} in:\n{log}"))
}

#[test]
fn two_hypervisor_sites_come_up_side_by_side() {
    if !require_vm("two_sites", &[]) {
        return;
    }
    let p = Project::with_store(&labs::hypervisor_lab(VMS), &shared_store());
    let up = p.ok(&["up"]);
    let log = String::from_utf8_lossy(&up.stderr).into_owned();
    // Both hypervisors start before either answers; each site's push and guest go ahead
    // without waiting for the other site's guest.
    let started_b = line_of(&log, &["starting hv_b"]);
    let started_a = line_of(&log, &["starting hv_a"]);
    assert!(
        started_a.max(started_b) < line_of(&log, &["ready hv_"]),
        "{log}"
    );
    let pushed_a = line_of(&log, &["pushed", "to hv_a"]);
    let pushed_b = line_of(&log, &["pushed", "to hv_b"]);
    let first_guest = line_of(&log, &["ready a1"]).min(line_of(&log, &["ready b1"]));
    assert!(pushed_a.max(pushed_b) < first_guest, "{log}");

    for (vm, hypervisor) in [("a1", "hv_a"), ("b1", "hv_b")] {
        let out = p.ok(&["ssh", vm, "--", "hostname"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), vm);
        let rows: serde_json::Value =
            serde_json::from_slice(&p.ok(&["status", "--json"]).stdout).unwrap();
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == vm)
            .unwrap();
        assert_eq!(row["host"], hypervisor);
        assert_eq!(row["state"], "running");
    }
    // The table is a tree: each hypervisor right above its guest.
    let table = String::from_utf8_lossy(&up.stdout).into_owned();
    let at = |name: &str| line_of(&table, &[name]);
    assert!(
        at("  hv_a") + 1 == at("    a1") && at("  hv_b") + 1 == at("    b1"),
        "{table}"
    );
    p.ok(&["down"]);
}
