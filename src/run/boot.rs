//! A VM on a site (this machine, a remote host, a hypervisor VM) as the boot driver sees
//! it: its qemu's liveness through its pidfile and process tag, its console and qemu's log
//! read where they are, a restart through its backend.

use std::time::Duration;

use crate::model::build::boot_watch::Qemu;
use crate::model::lab::instance::InstanceSpec;
use crate::model::shell::quote_path;
use crate::run::backend;
use crate::run::host::Host;
use crate::run::instance::{self, InstanceError};
use crate::sys::boot_wait::BootTarget;

/// A VM of `up` while it boots.
pub struct SiteVm<'a> {
    pub host: &'a dyn Host,
    pub spec: &'a InstanceSpec,
}

impl BootTarget for SiteVm<'_> {
    type Error = InstanceError;

    fn qemu(&mut self) -> Qemu {
        match instance::is_running(self.host, &self.spec.paths, &self.spec.name) {
            Ok(true) => Qemu::Running,
            Ok(false) => Qemu::Gone,
            Err(_) => Qemu::Unknown,
        }
    }

    fn console_from(&mut self, offset: u64) -> Vec<u8> {
        let path = self.spec.paths.serial_log();
        let script = format!(
            "tail -c +{} {} 2>/dev/null; true",
            offset + 1,
            quote_path(&path)
        );
        self.host
            .run(&script)
            .map(|out| out.stdout)
            .unwrap_or_default()
    }

    fn qemu_log(&mut self) -> String {
        instance::qemu_log_tail(self.host, self.spec, 6)
    }

    fn restart(&mut self) -> Result<(), InstanceError> {
        backend::stop_spec(self.host, self.spec, Duration::ZERO, None)?;
        backend::start(self.host, self.spec)
    }
}
