//! How a site runs its VMs: the qemu backend (farm's own detached qemu) or the libvirt
//! backend (a domain of the site's libvirtd), chosen per instance by its spec. What both
//! share (an instance's files, its errors, how it went down) is `run::instance`'s.

use std::time::Duration;

use crate::model::config::backend::Backend;
use crate::model::lab::instance::InstanceSpec;
use crate::model::lab::libvirt::DomainMeta;
use crate::run::host::Host;
use crate::run::instance::{InstanceError, Stopped};

pub mod libvirt;
pub mod qemu;

/// Starts the instance on its backend: qemu detached with farm's process tag in its
/// environment (it outlives farm), or its libvirt domain.
pub fn start(host: &dyn Host, spec: &InstanceSpec) -> Result<(), InstanceError> {
    match &spec.backend {
        Backend::Qemu => qemu::start(host, spec),
        Backend::Libvirt { uri } => libvirt::start(host, spec, uri),
    }
}

/// Runs again an instance whose qemu holds it paused, and says in which state it was:
/// qemu pauses a guest whose disk write found no space (`io-error`) rather than lose the
/// write, and a `snapshot save` killed half way leaves its VMs paused (`paused`,
/// `postmigrate`). `None` when it was not paused. A guest whose disk is still full pauses
/// again at its next write: that is an error that says so. Through the QMP socket farm
/// gives every instance's qemu, a libvirt domain's too: libvirt takes the resume as its own
/// event, as it does a guest's.
pub fn resume_if_paused(
    host: &dyn Host,
    spec: &InstanceSpec,
) -> Result<Option<String>, InstanceError> {
    let failed = |output: String| InstanceError::Command {
        vm: spec.name.clone(),
        host: host.name().to_string(),
        what: "Asking its qemu whether it paused the VM".to_string(),
        status: None,
        output,
    };
    use crate::sys::qmp::{Held, resume_held};
    crate::run::host::with_qmp(
        host,
        &spec.paths.qmp(),
        Duration::from_secs(2),
        |qmp| match resume_held(qmp, &["paused", "io-error", "postmigrate"]).map_err(failed)? {
            Held::No => Ok(None),
            Held::Resumed(was) => Ok(Some(was)),
            Held::StillFull(was) => Err(failed(format!(
                "qemu paused it ({was}): a write to its disk found no space, and again after it was resumed\nhint: free space on the filesystem that holds `{}`, then `farm up` again",
                spec.paths.disk().display()
            ))),
        },
        failed,
    )
}

/// Stops the instance `spec` describes (its last record's) on its backend.
pub fn stop_spec(
    host: &dyn Host,
    spec: &InstanceSpec,
    timeout: Duration,
    ssh_poweroff: Option<&(dyn Fn() + Sync)>,
) -> Result<Stopped, InstanceError> {
    match &spec.backend {
        Backend::Qemu => qemu::stop(host, &spec.paths, &spec.name, timeout, ssh_poweroff),
        Backend::Libvirt { uri } => libvirt::stop(
            host,
            &spec.paths,
            &DomainMeta::owner(&spec.tag.project, &spec.name),
            uri,
            timeout,
            ssh_poweroff,
        ),
    }
}

/// Stops the wires of the instance in `paths` (see `model::lab::wire`), once its qemu is gone.
fn stop_wires(
    host: &dyn Host,
    paths: &crate::model::lab::instance::InstancePaths,
    name: &str,
) -> Result<(), InstanceError> {
    crate::run::instance::check(
        host,
        name,
        "Stopping its wires",
        &crate::model::lab::wire::stop_script(paths),
    )
    .map(drop)
}

/// Removes the libvirt domain `old` was defined as, when `new` (if any) is not a libvirt
/// domain of the same daemon: the instance is replaced, removed, or moves to qemu.
pub fn retire_domain(
    host: &dyn Host,
    old: &InstanceSpec,
    new: Option<&InstanceSpec>,
) -> Result<(), InstanceError> {
    let Backend::Libvirt { uri } = &old.backend else {
        return Ok(());
    };
    if new.is_some_and(|n| n.backend == old.backend) {
        return Ok(());
    }
    libvirt::undefine(host, &DomainMeta::owner(&old.tag.project, &old.name), uri)
}
