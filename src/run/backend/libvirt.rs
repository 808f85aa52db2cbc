//! The libvirt backend on a site: an instance's overlay and seed are made as for the qemu
//! backend (`run::instance`), then its domain is defined from the same `QemuVm` and started
//! by the site's libvirtd, which `virsh` and virt-manager see.
//!
//! farm talks to libvirtd with its C API (`sys::libvirt`): on this machine directly, on a
//! remote host or inside a hypervisor VM through libvirtd's socket forwarded by farm's own
//! ssh connection (the same jump chain as everything else). The domain's qemu carries
//! farm's process tag, `-name` and QMP socket, and its pid (found by that tag) goes into
//! the instance's pidfile, so observing, `status` and waiting for ssh are the same code for
//! both backends.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::model::config::backend::{Backend, is_session};
use crate::model::lab::instance::{InstancePaths, InstanceSpec};
use crate::model::lab::libvirt::{DomainMeta, domain_xml};
use crate::model::shell::{quote_path, shell_quote};
use crate::run::host::Host;
use crate::run::instance::{InstanceError, SSH_POWEROFF_AGAIN, Stopped, is_running};
use crate::sys::libvirt::{Libvirt, LibvirtError};

/// Runs `with` on a connection to the libvirtd at `uri` as seen on `host`. On a site
/// reached over ssh, libvirtd is started first if it is installed and nothing runs it (a
/// hypervisor VM whose platform installs `libvirt-daemon-system` without systemd).
pub fn with_libvirt<T>(
    host: &dyn Host,
    uri: &str,
    with: impl FnOnce(&Libvirt) -> Result<T, LibvirtError>,
) -> Result<T, InstanceError> {
    if host.is_local() {
        return Ok(with(&Libvirt::connect(uri)?)?);
    }
    let socket = ensure_daemon(host, uri)?;
    let scheme = if is_session(uri) { "session" } else { "system" };
    let mut with = Some(with);
    let mut result = None;
    host.with_socket(Path::new(&socket), &mut |local| {
        let forwarded = format!("qemu+unix:///{scheme}?socket={}", local.display());
        let outcome = Libvirt::connect(&forwarded)
            .map_err(|e| rename_unreachable(e, uri, host.name()))
            .and_then(|lv| with.take().map_or(Err(already_used(uri)), |f| f(&lv)));
        result = Some(outcome);
    })?;
    Ok(result.unwrap_or_else(|| Err(already_used(uri)))?)
}

fn already_used(uri: &str) -> LibvirtError {
    LibvirtError::Unreachable {
        uri: uri.to_string(),
        message: "the forwarded connection was not made".into(),
    }
}

/// A forwarded socket's URI means nothing to the user: the error names the site's.
fn rename_unreachable(e: LibvirtError, uri: &str, host: &str) -> LibvirtError {
    match e {
        LibvirtError::Unreachable { message, .. } => LibvirtError::Unreachable {
            uri: format!("{uri} on `{host}`"),
            message,
        },
        other => other,
    }
}

/// libvirtd's socket path on the site, after making sure something listens there.
fn ensure_daemon(host: &dyn Host, uri: &str) -> Result<String, InstanceError> {
    let socket = Backend::libvirt_socket_shell(uri);
    let start = if is_session(uri) {
        // The session daemon starts itself on a client's first connection.
        "virsh -c qemu:///session version >/dev/null 2>&1 || true".to_string()
    } else {
        format!(
            "if ! [ -S {socket} ]; then \
               command -v libvirtd >/dev/null || {{ echo 'libvirtd is not installed; hint: add `libvirt-daemon-system` to the platform'\"'\"'s packages' >&2; exit 1; }}; \
               mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/dnsmasq; \
               pgrep -x virtlogd >/dev/null || virtlogd -d; \
               pgrep -x libvirtd >/dev/null || libvirtd -d; \
               i=0; while ! [ -S {socket} ]; do i=$((i+1)); [ $i -gt 300 ] && {{ echo 'libvirtd started but did not listen within 30 s' >&2; exit 1; }}; sleep 0.1; done; \
             fi"
        )
    };
    let out = host.run(&format!("{start}; printf %s {socket}"))?;
    if !out.success() {
        return Err(LibvirtError::Unreachable {
            uri: format!("{uri} on `{}`", host.name()),
            message: out.said().trim().to_string(),
        }
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Defines `spec`'s domain (again, when it exists: its spec may have changed) and starts
/// it; its qemu's pid goes into the instance's pidfile.
pub fn start(host: &dyn Host, spec: &InstanceSpec, uri: &str) -> Result<(), InstanceError> {
    let paths = &spec.paths;
    let root = host.run("id -u")?.text().trim() == "0";
    // Root's session daemon, like the system one, would run qemu as `libvirt-qemu`.
    let run_as_root = root;
    let meta = DomainMeta::for_spec(spec);
    let xml = domain_xml(&spec.qemu(), &meta, run_as_root);
    host.put(xml.as_bytes(), &paths.dir.join("domain.xml"), 0o600)?;
    let prepare = format!(
        "rm -f {pid} {qmp}; : > {serial}; {wires}",
        wires = crate::model::lab::wire::start_script(spec),
        pid = quote_path(&paths.pidfile()),
        qmp = quote_path(&paths.qmp()),
        serial = quote_path(&paths.serial_log()),
    );
    crate::run::instance::check(host, &spec.name, "Preparing the domain's files", &prepare)?;
    with_libvirt(host, uri, |lv| {
        lv.define(&spec.name, &xml, &meta)?;
        lv.start(&spec.name, &meta)
    })
    .map_err(|e| with_start_hint(e, &spec.name, root || is_session(uri)))?;
    crate::run::instance::check(
        host,
        &spec.name,
        "Finding the domain's qemu",
        &pid_by_tag(spec, &paths.pidfile()),
    )?;
    Ok(())
}

/// A script writing the pid of `spec`'s qemu to `pidfile`, found by farm's tag in its
/// command line and environment: where libvirtd keeps its own pidfile depends on the
/// daemon (system, session, root's session), the tag does not.
fn pid_by_tag(spec: &InstanceSpec, pidfile: &Path) -> String {
    let name = shell_quote(&format!(
        "process={}",
        crate::model::build::qemu::process_title(&spec.name)
    ));
    let project = shell_quote(&format!(
        "{}={}",
        crate::model::build::qemu::TAG_PROJECT,
        spec.tag.project
    ));
    format!(
        "for d in /proc/[0-9]*; do \
           grep -qaF -- {name} \"$d/cmdline\" 2>/dev/null && \
           tr '\\0' '\\n' < \"$d/environ\" 2>/dev/null | grep -qxF -- {project} && \
           {{ echo \"${{d#/proc/}}\" > {pidfile}; exit 0; }}; \
         done; echo 'libvirt started the domain, but its qemu is not to be found' >&2; exit 1",
        pidfile = quote_path(pidfile)
    )
}

/// What to do when libvirtd refuses to start a domain: its qemu log, and for a
/// permission problem, who must be able to read the store.
fn with_start_hint(e: InstanceError, vm: &str, root: bool) -> InstanceError {
    let InstanceError::Libvirt(LibvirtError::Call {
        what,
        name,
        uri,
        message,
    }) = e
    else {
        return e;
    };
    let hint = if message.contains("ermission denied") && !root {
        "hint: libvirt's system daemon runs qemu as its own user (`libvirt-qemu`), which must be able to read farm's store and the instance's directory; run farm as root, or use `libvirt_uri = \"qemu:///session\"`".to_string()
    } else {
        format!(
            "hint: `farm logs {vm}` shows its console and `/var/log/libvirt/qemu/{vm}.log` libvirt's qemu log"
        )
    };
    InstanceError::Libvirt(LibvirtError::Call {
        what,
        name,
        uri,
        message: format!("{message}\n{hint}"),
    })
}

/// Shuts the domain down: ACPI through libvirt (asked again every few seconds: a booting
/// guest may miss it) and `poweroff` over ssh (again every [`SSH_POWEROFF_AGAIN`]: a nested
/// guest's sshd now and then drops a connection), up to `timeout`; then destroyed. Its
/// wires go with it.
pub fn stop(
    host: &dyn Host,
    paths: &InstancePaths,
    owner: &DomainMeta,
    uri: &str,
    timeout: Duration,
    ssh_poweroff: Option<&(dyn Fn() + Sync)>,
) -> Result<Stopped, InstanceError> {
    let stopped = stop_domain(host, paths, owner, uri, timeout, ssh_poweroff)?;
    super::stop_wires(host, paths, &owner.vm)?;
    Ok(stopped)
}

fn stop_domain(
    host: &dyn Host,
    paths: &InstancePaths,
    owner: &DomainMeta,
    uri: &str,
    timeout: Duration,
    ssh_poweroff: Option<&(dyn Fn() + Sync)>,
) -> Result<Stopped, InstanceError> {
    let name = &owner.vm;
    if !is_running(host, paths, name)? {
        return Ok(Stopped::AlreadyDown);
    }
    let started = Instant::now();
    let mut asked = None::<Instant>;
    let mut asked_ssh = None::<Instant>;
    while started.elapsed() < timeout {
        if !is_running(host, paths, name)? {
            settle(host, owner, uri)?;
            return Ok(Stopped::PoweredOff(started.elapsed()));
        }
        if asked.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            with_libvirt(host, uri, |lv| lv.shutdown(name, owner))?;
            asked = Some(Instant::now());
        }
        if let Some(poweroff) = ssh_poweroff
            && asked_ssh.is_none_or(|t| t.elapsed() >= SSH_POWEROFF_AGAIN)
        {
            poweroff();
            asked_ssh = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    with_libvirt(host, uri, |lv| lv.destroy(name, owner))?;
    Ok(Stopped::Destroyed(timeout))
}

/// Waits (briefly) for libvirtd to see that the domain's qemu has gone: it may still call
/// it running for a moment, and would refuse to start it again.
fn settle(host: &dyn Host, owner: &DomainMeta, uri: &str) -> Result<(), InstanceError> {
    with_libvirt(host, uri, |lv| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while lv.is_active(&owner.vm, owner)? == Some(true) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    })
}

/// Removes the domain's definition (it no longer runs).
pub fn undefine(host: &dyn Host, owner: &DomainMeta, uri: &str) -> Result<(), InstanceError> {
    with_libvirt(host, uri, |lv| lv.undefine(&owner.vm, owner))
}
