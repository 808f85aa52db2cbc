//! The qemu backend: an instance's overlay, seed and daemonized qemu, made from its
//! resolved `InstanceSpec`, through a `Host`, so it is the same on every site.

use std::time::Duration;

use crate::model::build::qemu_img::QemuImg;
use crate::model::build::seed::seed_image_bytes;
use crate::model::lab::instance::{InstancePaths, InstanceRecord, InstanceSpec};
use crate::model::shell::quote_path;
use crate::run::host::{Host, HostError, process_alive_test};

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("{what} for VM `{vm}` failed on host `{host}` (exit status {status:?}):\n{}", output.trim_end())]
    Command {
        vm: String,
        host: String,
        what: String,
        status: Option<i32>,
        output: String,
    },
    #[error(transparent)]
    Seed(#[from] crate::model::build::seed::SeedError),
    #[error(transparent)]
    Libvirt(#[from] crate::sys::libvirt::LibvirtError),
}

pub(crate) fn check(
    host: &dyn Host,
    vm: &str,
    what: &str,
    script: &str,
) -> Result<String, InstanceError> {
    let out = host.run(script)?;
    if !out.success() {
        return Err(InstanceError::Command {
            vm: vm.to_string(),
            host: host.name().to_string(),
            what: what.to_string(),
            status: out.status,
            output: out.said(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the instance's qemu runs: the pidfile's process is alive *and* is this VM's
/// qemu (pids are reused).
pub fn is_running(host: &dyn Host, paths: &InstancePaths, name: &str) -> Result<bool, HostError> {
    let script = process_alive_test(
        &paths.pidfile(),
        &crate::model::build::qemu::qemu_name(name),
    );
    Ok(host.run(&script)?.success())
}

/// The last `lines` of what the instance's qemu said (farm's file for its own qemu,
/// libvirt's log for a domain), headed by the log's path; why it stopped is usually there.
pub fn qemu_log_tail(host: &dyn Host, spec: &InstanceSpec, lines: usize) -> String {
    const ABSENT: i32 = 3;
    let log = spec
        .backend
        .qemu_log_shell(&spec.paths.stderr_log(), &spec.name);
    let script = format!(
        "f={log}; printf '%s\\n' \"$f\"; [ -e \"$f\" ] || exit {ABSENT}; tail -n {lines} \"$f\""
    );
    let out = match host.run(&script) {
        Ok(out) => out,
        Err(e) => return format!("(cannot read qemu's log on {}: {e})", host.name()),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (path, tail) = stdout.split_once('\n').unwrap_or((&stdout, ""));
    match out.status {
        Some(0) if tail.trim().is_empty() => {
            format!("qemu's log `{path}` on {} is empty", host.name())
        }
        Some(0) => format!(
            "qemu's log `{path}` on {} ends:\n{}",
            host.name(),
            tail.trim_end()
        ),
        Some(ABSENT) => format!("(no `{path}` on {})", host.name()),
        _ => format!(
            "(cannot read `{path}` on {}: {})",
            host.name(),
            out.said().trim()
        ),
    }
}

/// Makes the overlay on the layer, the seed and the record. Does not start it.
pub fn create(
    host: &dyn Host,
    spec: &InstanceSpec,
    host_key: (String, String),
) -> Result<InstanceRecord, InstanceError> {
    let paths = &spec.paths;
    let overlay = QemuImg::CreateOverlay {
        disk: &paths.disk(),
        backing: &spec.layer.disk,
        size: spec.disk_size,
    };
    check(
        host,
        &spec.name,
        "Creating the overlay",
        &format!(
            "mkdir -p {dir} && chmod 700 {dir} && {}",
            overlay.script(),
            dir = quote_path(&paths.dir),
        ),
    )?;
    write_seed_and_record(host, spec, host_key)
}

/// Before a restart: points the overlay at the layer's new place (same bytes), grows it,
/// and writes the seed and record for the new spec.
pub fn prepare_restart(
    host: &dyn Host,
    spec: &InstanceSpec,
    grow_to: Option<u64>,
    rebase: bool,
    host_key: (String, String),
) -> Result<InstanceRecord, InstanceError> {
    let disk = spec.paths.disk();
    if rebase {
        let rebase = QemuImg::RebaseUnsafe {
            disk: &disk,
            backing: &spec.layer.disk,
        };
        check(
            host,
            &spec.name,
            "Pointing the overlay at its layer's new place",
            &rebase.script(),
        )?;
    }
    if let Some(size) = grow_to {
        let resize = QemuImg::Resize { disk: &disk, size };
        check(host, &spec.name, "Growing the overlay", &resize.script())?;
    }
    write_seed_and_record(host, spec, host_key)
}

fn write_seed_and_record(
    host: &dyn Host,
    spec: &InstanceSpec,
    host_key: (String, String),
) -> Result<InstanceRecord, InstanceError> {
    let seed = spec.seed(host_key);
    host.put(&seed_image_bytes(&seed)?, &spec.paths.seed(), 0o600)?;
    if spec.uefi {
        // The guest's own boot entries live here from its first boot on: made once, kept.
        let (_, template) = crate::model::values::uefi_files(spec.hw.arch);
        check(
            host,
            &spec.name,
            "Giving the VM its UEFI variable store",
            &format!(
                "[ -e {vars} ] || {{ [ -e {template} ] || {{ echo \"no UEFI firmware at {template}; hint: install Debian's ovmf (x86_64) or qemu-efi-aarch64 (aarch64) on this host\" >&2; exit 1; }}; cp {template} {vars}; }}",
                vars = quote_path(&spec.paths.efi_vars()),
            ),
        )?;
    }
    let record = InstanceRecord::new(spec.clone());
    host.put(&record.to_json(), &spec.paths.record(), 0o600)?;
    // On the host's disk before qemu starts: a hypervisor VM that crashes must not come
    // back with an overlay whose header never left its page cache.
    check(
        host,
        &spec.name,
        "Syncing the instance's files",
        &format!(
            "sync -f {} 2>/dev/null || sync",
            quote_path(&spec.paths.dir)
        ),
    )?;
    Ok(record)
}

/// Writes `record` back (it became ready, or was stopped on purpose).
pub fn save(host: &dyn Host, record: &InstanceRecord) -> Result<(), InstanceError> {
    host.put(&record.to_json(), &record.spec.paths.record(), 0o600)?;
    Ok(())
}

/// How an instance went down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running.
    AlreadyDown,
    /// The guest powered off when asked (ACPI through QMP, and `poweroff` over ssh).
    PoweredOff(Duration),
    /// The guest did not power off in time; qemu was told to quit (it writes out its disk
    /// caches), so only what the guest had not synced is lost.
    Quit(Duration),
    /// Not even qemu answered: killed.
    Killed(Duration),
    /// The guest did not power off in time; libvirt destroyed the domain.
    Destroyed(Duration),
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::AlreadyDown => f.write_str("was not running"),
            Stopped::PoweredOff(d) => write!(f, "powered off in {:.1} s", d.as_secs_f64()),
            Stopped::Quit(d) => write!(
                f,
                "did not power off within {:.0} s; qemu quit (unsynced guest writes are lost)",
                d.as_secs_f64()
            ),
            Stopped::Killed(d) => write!(
                f,
                "did not power off within {:.0} s and qemu did not quit; killed",
                d.as_secs_f64()
            ),
            Stopped::Destroyed(d) => write!(
                f,
                "did not power off within {:.0} s; libvirt destroyed the domain (unsynced guest writes are lost)",
                d.as_secs_f64()
            ),
        }
    }
}

/// How often a VM being stopped is asked again to power off over ssh.
pub const SSH_POWEROFF_AGAIN: Duration = Duration::from_secs(15);

/// Stops processes farm has no state for (found by their tag): SIGTERM (qemu shuts down
/// cleanly on it), then SIGKILL after `timeout`.
pub fn stop_pids(host: &dyn Host, pids: &[u32], timeout: Duration) -> Result<(), HostError> {
    if pids.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let list = list.join(" ");
    let tenths = timeout.as_millis() / 100;
    host.run(&format!(
        "kill {list} 2>/dev/null; i=0; while [ $i -lt {tenths} ]; do alive=0; \
         for p in {list}; do kill -0 $p 2>/dev/null && alive=1; done; [ $alive = 0 ] && exit 0; \
         i=$((i+1)); sleep 0.1; done; kill -9 {list} 2>/dev/null; true"
    ))?;
    Ok(())
}

/// Removes the instance's directory (overlay, seed, logs).
pub fn remove(host: &dyn Host, paths: &InstancePaths, name: &str) -> Result<(), InstanceError> {
    check(
        host,
        name,
        "Removing the instance's state",
        &format!("rm -rf {}", quote_path(&paths.dir)),
    )
    .map(drop)
}
