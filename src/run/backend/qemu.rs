//! The qemu backend: farm runs the instance's qemu itself, detached and tagged, and stops
//! it through QMP (ACPI, then `quit`), ssh `poweroff`, and a signal as the last resort.

use std::time::{Duration, Instant};

use crate::model::lab::instance::{InstancePaths, InstanceSpec};
use crate::model::shell::{quote_path, shell_quote};
use crate::run::host::{Host, HostError, process_alive_test};
use crate::run::instance::{InstanceError, SSH_POWEROFF_AGAIN, Stopped, check, is_running};

/// Starts the instance's qemu detached, with farm's process tag in its environment (it
/// outlives farm).
pub fn start(host: &dyn Host, spec: &InstanceSpec) -> Result<(), InstanceError> {
    start_vm(host, spec, &spec.qemu())
}

/// Starts `vm` (the spec's qemu, or a variant of it: waiting for a saved state) detached.
pub fn start_vm(
    host: &dyn Host,
    spec: &InstanceSpec,
    vm: &crate::model::build::qemu::QemuVm,
) -> Result<(), InstanceError> {
    let paths = &spec.paths;
    let env: Vec<String> = vm
        .tag
        .iter()
        .flat_map(|t| t.env())
        .map(|(k, v)| format!("{k}={}", shell_quote(&v)))
        .collect();
    let argv: Vec<String> = vm.argv().iter().map(|a| shell_quote(a)).collect();
    // A daemonizing qemu reports start-up errors before it detaches (its stderr is gone
    // afterwards); one that does not is detached by `setsid`, its stderr kept in the file
    // for whoever waits on it (loading a saved state can fail well after start).
    let (env, binary, argv) = (env.join(" "), vm.binary(), argv.join(" "));
    let stderr = quote_path(&paths.stderr_log());
    let launch = if vm.daemonize {
        format!("env {env} {binary} {argv} 2> {stderr} || {{ cat {stderr} >&2; exit 1; }}")
    } else {
        format!("setsid -f env {env} {binary} {argv} < /dev/null > /dev/null 2> {stderr}")
    };
    let script = format!(
        "rm -f {pid} {qmp}; : > {serial}; {wires}{launch}",
        wires = crate::model::lab::wire::start_script(spec),
        pid = quote_path(&paths.pidfile()),
        qmp = quote_path(&paths.qmp()),
        serial = quote_path(&paths.serial_log()),
    );
    check(host, &spec.name, "Starting qemu", &script)
        .map(drop)
        .map_err(|e| match e {
            InstanceError::Command {
                vm,
                host,
                what,
                status,
                output,
            } => InstanceError::Command {
                output: format!(
                    "{}\nhint: `farm logs {vm}` shows its console; if its disk is damaged, `farm down {vm}` discards it and `farm up` makes it anew",
                    output.trim_end()
                ),
                vm,
                host,
                what,
                status,
            },
            other => other,
        })
}

/// Stops the instance: an ACPI power-down through QMP (and `poweroff` over ssh when given:
/// minimal guests have no ACPI daemon), up to `timeout`; then QMP `quit`; then SIGKILL.
/// Its wires go with it.
pub fn stop(
    host: &dyn Host,
    paths: &InstancePaths,
    name: &str,
    timeout: Duration,
    ssh_poweroff: Option<&(dyn Fn() + Sync)>,
) -> Result<Stopped, InstanceError> {
    let stopped = stop_qemu(host, paths, name, timeout, ssh_poweroff)?;
    super::stop_wires(host, paths, name)?;
    Ok(stopped)
}

fn stop_qemu(
    host: &dyn Host,
    paths: &InstancePaths,
    name: &str,
    timeout: Duration,
    ssh_poweroff: Option<&(dyn Fn() + Sync)>,
) -> Result<Stopped, InstanceError> {
    if !is_running(host, paths, name)? {
        return Ok(Stopped::AlreadyDown);
    }
    let started = Instant::now();
    let deadline = started + timeout;
    // Asked again every SSH_POWEROFF_AGAIN: a nested guest's sshd now and then drops the
    // connection that carried `poweroff`.
    loop {
        host.qmp(&paths.qmp(), "system_powerdown")?;
        if let Some(poweroff) = ssh_poweroff {
            poweroff();
        }
        let next = (Instant::now() + SSH_POWEROFF_AGAIN).min(deadline);
        if wait_down(host, paths, name, next)? {
            return Ok(Stopped::PoweredOff(started.elapsed()));
        }
        if next >= deadline {
            break;
        }
    }
    host.qmp(&paths.qmp(), "quit")?;
    if wait_down(host, paths, name, Instant::now() + Duration::from_secs(10))? {
        return Ok(Stopped::Quit(timeout));
    }
    let kill = format!(
        "{alive} && kill -9 \"$pid\" && while kill -0 \"$pid\" 2>/dev/null; do sleep 0.1; done; true",
        alive = process_alive_test(
            &paths.pidfile(),
            &crate::model::build::qemu::qemu_name(name)
        )
    );
    check(host, name, "Killing qemu", &kill)?;
    Ok(Stopped::Killed(timeout))
}

fn wait_down(
    host: &dyn Host,
    paths: &InstancePaths,
    name: &str,
    deadline: Instant,
) -> Result<bool, HostError> {
    loop {
        if !is_running(host, paths, name)? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
