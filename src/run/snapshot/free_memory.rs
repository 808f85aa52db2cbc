//! Before a save, each running VM of the snapshot drops its clean page cache, and the
//! memory that frees goes back to the VM's host by free page reporting
//! (`model::build::qemu::FREE_PAGE_REPORTING`). A machine state then holds the memory the
//! guests use, not what they last read or freed: the bundle's L1 wrote 449 MB of state as
//! it ran and 288 MB after this, and its state loads in 0.5-0.6 s instead of 0.8-0.9 s.
//!
//! Best-effort: a VM that does not answer within `ANSWER`, or cannot report, is saved as it
//! is. A lab saved because something in it broke must still be saved.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::config::topology::{Placement, Topology};
use crate::model::lab::instance::InstanceRecord;
use crate::run::host::Host;
use crate::sys::ssh::Ssh;

/// How long a VM is given to answer and drop its cache.
const ANSWER: Duration = Duration::from_secs(5);

/// The kernel reports freed memory 2 s after it was freed (`PAGE_REPORTING_DELAY`).
const REPORTING_DELAY: Duration = Duration::from_secs(2);

/// How long a top-level VM's qemu is watched at most while its guest reports.
const REPORTING_LIMIT: Duration = Duration::from_secs(6);

/// Reporting is over when the qemu's resident memory has not fallen for this long.
const SETTLED: Duration = Duration::from_millis(750);

/// Less than this freed is not worth waiting for.
const WORTH_WAITING_KIB: u64 = 64 * 1024;

/// In the guest: write out dirty pages, drop the clean cache, and say how much memory that
/// freed (KiB) and whether the guest reports free memory to its host.
const DROP_CACHES: &str = "sync; \
    before=$(awk '/^MemFree:/{print $2}' /proc/meminfo); \
    echo 3 > /proc/sys/vm/drop_caches; \
    after=$(awk '/^MemFree:/{print $2}' /proc/meminfo); \
    reporting=0; ls /sys/bus/virtio/drivers/virtio_balloon 2>/dev/null | grep -q '^virtio' && reporting=1; \
    echo \"$((after - before)) $reporting\"";

/// A top-level VM whose qemu is watched while its guest hands memory back.
pub(super) struct TopQemu<'a> {
    pub name: &'a str,
    pub host: &'a Arc<dyn Host>,
    pub pidfile: &'a Path,
}

/// Drops the page caches of `top` and, through the connections to them, of the VMs
/// `inside` them (outermost first), then waits while the top-level VMs' guests report what
/// was freed. Returns how much the guests freed (KiB).
pub(super) fn free_before_save(
    config: &Path,
    topology: &Topology,
    top: &[TopQemu<'_>],
    inside: &[Vec<String>],
    records: &BTreeMap<String, InstanceRecord>,
) -> u64 {
    let mut sessions: BTreeMap<String, Ssh> = BTreeMap::new();
    let mut freed: BTreeMap<String, (u64, bool)> = BTreeMap::new();
    let mut levels: Vec<Vec<String>> = vec![top.iter().map(|vm| vm.name.to_string()).collect()];
    levels.extend(inside.iter().cloned());
    for level in &levels {
        let jumps: Vec<(String, Option<std::path::PathBuf>)> = level
            .iter()
            .filter(|vm| records.contains_key(*vm))
            .map(|vm| {
                let jump = match topology.vms.get(vm).map(|node| &node.placement) {
                    Some(Placement::Vm(parent)) => match sessions.get(parent) {
                        Some(session) => Some(session.control_socket()),
                        None => return (vm.clone(), None),
                    },
                    _ => None,
                };
                (vm.clone(), jump)
            })
            .collect();
        let dropped = crate::run::parallel::each(&jumps, |(vm, jump)| {
            let ssh = Ssh::connect_through(config, vm, ANSWER, jump.as_deref()).ok()?;
            let out = ssh.run_within(DROP_CACHES, ANSWER).ok()?;
            let said = parse_freed(&String::from_utf8_lossy(&out.stdout));
            Some((vm.clone(), ssh, said))
        });
        for (vm, ssh, said) in dropped.into_iter().flatten() {
            if let Some(said) = said {
                freed.insert(vm.clone(), said);
            }
            sessions.insert(vm, ssh);
        }
    }
    let watched: Vec<&TopQemu<'_>> = top
        .iter()
        .filter(|vm| {
            freed
                .get(vm.name)
                .is_some_and(|&(kib, reporting)| reporting && kib >= WORTH_WAITING_KIB)
        })
        .collect();
    crate::run::parallel::each(&watched, |vm| wait_for_reporting(vm));
    freed.values().map(|(kib, _)| kib).sum()
}

/// `"<KiB freed> <0|1>"`, as `DROP_CACHES` says it.
pub(crate) fn parse_freed(said: &str) -> Option<(u64, bool)> {
    let mut words = said.split_whitespace();
    let kib: i64 = words.next()?.parse().ok()?;
    let reporting = words.next()? == "1";
    Some((kib.max(0) as u64, reporting))
}

/// Waits, up to `REPORTING_LIMIT`, until the qemu of `vm` has stopped shrinking: its guest
/// has reported what it freed and qemu has given those pages back.
fn wait_for_reporting(vm: &TopQemu<'_>) {
    let started = Instant::now();
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    while started.elapsed() < REPORTING_LIMIT {
        let Some(resident) = resident_kib(&**vm.host, vm.pidfile) else {
            return;
        };
        let now = Instant::now();
        samples.push((now, resident));
        if started.elapsed() > REPORTING_DELAY && settled(&samples, now) {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Sampled for at least `SETTLED`, and no fall of more than 2 MiB in the resident memory
/// over the last `SETTLED`.
fn settled(samples: &[(Instant, u64)], now: Instant) -> bool {
    let (Some(&(first, _)), Some(&(_, latest))) = (samples.first(), samples.last()) else {
        return false;
    };
    now.duration_since(first) >= SETTLED
        && samples
            .iter()
            .filter(|(at, _)| now.duration_since(*at) <= SETTLED)
            .all(|&(_, kib)| kib <= latest + 2048)
}

/// The resident memory (KiB) of the qemu whose pid `pidfile` holds, on `host`.
fn resident_kib(host: &dyn Host, pidfile: &Path) -> Option<u64> {
    let script = format!(
        "awk '/^VmRSS:/{{print $2}}' /proc/$(cat {})/status",
        crate::model::shell::shell_quote(&pidfile.to_string_lossy())
    );
    let out = host.run(&script).ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_answer_is_read_and_a_negative_free_is_none_freed() {
        assert_eq!(parse_freed("524288 1\n"), Some((524288, true)));
        assert_eq!(parse_freed("-300 0"), Some((0, false)));
        assert_eq!(parse_freed("sh: awk: not found"), None);
        assert_eq!(parse_freed(""), None);
    }

    #[test]
    fn memory_has_settled_when_it_stopped_falling_for_the_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let falling = [(at(0), 900_000), (at(500), 700_000), (at(1000), 500_000)];
        assert!(!settled(&falling, at(1000)));
        let flat = [
            (at(0), 900_000),
            (at(500), 500_000),
            (at(1000), 499_000),
            (at(1500), 499_500),
        ];
        assert!(settled(&flat, at(1500)));
        // One sample is no window.
        assert!(!settled(&[(at(0), 1)], at(0)));
    }
}
