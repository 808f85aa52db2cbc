//! Applying a plan to sites: checks, closure push, networks, then each VM brought to its
//! planned state (in parallel) and waited for until it answers ssh; the site inside a
//! hypervisor VM follows as soon as that VM answers, planned again if it (re)started.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::build::boot_watch::{BootFailure, BootFailureKind, BootRules};
use crate::model::build::qemu::ResolvedAccel;
use crate::model::config::topology::Placement;
use crate::model::lab::instance::{InstanceRecord, InstanceSpec};
use crate::model::lab::up_plan::{Basis, Desired, SitePlan, UpPlan, VmAction, VmStep, plan_site};
use crate::model::text::human_bytes;
use crate::progress::Reporter;
use crate::project::Project;
use crate::run::boot::SiteVm;
use crate::run::host::Host;
use crate::run::lab::{LabError, UpOptions, first_error, write_state_ssh_files};
use crate::run::observe::{Ask, observe_site};
use crate::run::site::Sites;
use crate::run::state::StateDir;
use crate::run::{backend, instance, parallel};
use crate::store::Entry;
use crate::sys::boot_wait::{self, BootError, SshRoute};

/// What applying the plan shares across sites and threads.
pub(crate) struct Apply<'a> {
    pub(crate) project: &'a Project,
    pub(crate) desired: &'a Desired<'a>,
    pub(crate) state: &'a StateDir,
    pub(crate) sites: &'a Sites<'a>,
    /// Local store entries by directory name, for pushes.
    pub(crate) entries: &'a BTreeMap<String, Entry>,
    pub(crate) options: &'a UpOptions,
    pub(crate) reporter: &'a Reporter,
    /// The spec of every VM brought up (or kept), for ssh_config and the status table.
    pub(crate) specs: Mutex<BTreeMap<String, InstanceSpec>>,
    /// VMs planned to restart because they did not answer, which their qemu held paused
    /// and which run again instead: they are waited for, not restarted.
    pub(crate) resumed: Mutex<std::collections::BTreeSet<String>>,
}

impl Apply<'_> {
    /// Applies one site's plan. `whole` is the plan it came from while that plan still
    /// describes what runs (its hypervisor was kept); a site whose hypervisor (re)started is
    /// observed and planned again here.
    pub(crate) fn site(&self, site: &SitePlan, whole: Option<&UpPlan>) -> Result<(), LabError> {
        if !site.problems.is_empty() {
            return Err(LabError::Plan {
                problems: site.problems.clone(),
            });
        }
        let host = self.sites.connect(&site.placement)?;
        let host = host.as_ref();
        crate::run::vde::check_netdev(host, &site.check_vde)?;
        self.push(host, site)?;
        for step in site
            .networks
            .iter()
            .filter(|n| n.start_switch || n.start_tap)
        {
            crate::run::vde::ensure_up(
                host,
                &site.layout.state_dir,
                &step.network,
                &self.desired.project_tag(),
            )?;
            let attach = step
                .network
                .attach
                .map(|a| {
                    format!(
                        ", {a} on tap {}",
                        step.network.tap_name(&site.layout.state_dir)
                    )
                })
                .unwrap_or_default();
            self.reporter.status(
                "network",
                format!(
                    "{} on {} ({}{attach})",
                    step.network.name,
                    host.name(),
                    step.network.plug(&site.layout.state_dir)
                ),
            );
        }
        self.stop_changed(host, site)?;
        {
            let mut specs = self.specs.lock().unwrap_or_else(|e| e.into_inner());
            for step in &site.vms {
                // Its host key is pinned in known_hosts before it first boots.
                if step.action != VmAction::Keep {
                    self.state.host_key(&step.name)?;
                    self.state.stop_shared_connection(&step.name);
                }
                specs.insert(step.name.clone(), step.spec.clone());
            }
            write_state_ssh_files(self.project, self.state, &specs)?;
        }
        first_error(parallel::each(&site.vms, |step| {
            self.vm(host, site, step, whole)
        }))
    }

    fn push(&self, host: &dyn Host, site: &SitePlan) -> Result<(), LabError> {
        if site.push.is_empty() {
            return Ok(());
        }
        let needed: Vec<&Entry> = site
            .push
            .iter()
            .filter_map(|name| self.entries.get(name))
            .collect();
        let store = crate::run::closure::HostStore::new(
            site.layout
                .store_entries
                .parent()
                .unwrap_or(&site.layout.store_entries),
        );
        let disk_bytes = needed.iter().map(|e| e.meta.size).sum();
        let compression =
            crate::run::closure::PushCompression::for_push(site.push_zstd, disk_bytes);
        let pushed =
            crate::run::closure::push_missing(host, &store, &needed, compression, self.reporter)?;
        if !pushed.pushed.is_empty() {
            self.reporter.status(
                "pushed",
                format!(
                    "{} layer(s) to {} ({}, {:.1} s)",
                    pushed.pushed.len(),
                    host.name(),
                    human_bytes(pushed.bytes),
                    pushed.elapsed.as_secs_f64(),
                ),
            );
        }
        Ok(())
    }

    /// Stops, in parallel, the VMs that restart or are replaced (before anything starts:
    /// their ports may go to others), and removes the replaced ones.
    fn stop_changed(&self, host: &dyn Host, site: &SitePlan) -> Result<(), LabError> {
        let changed = site
            .vms
            .iter()
            .filter(|s| matches!(s.action, VmAction::Restart | VmAction::Replace));
        first_error(parallel::each(changed, |step| -> Result<(), LabError> {
            if self.resume_instead(host, step)? {
                return Ok(());
            }
            if step.running.is_some() {
                let verb = match step.action {
                    VmAction::Replace => "replacing",
                    _ => "restarting",
                };
                self.reporter
                    .status(verb, format!("{} ({})", step.name, reasons(step)));
                let how = match step.action {
                    // Its disk is deleted next: a clean power-off would only save writes
                    // about to go, and a hypervisor VM first waits on its own guests
                    // (libvirt suspends them), a minute under TCG.
                    VmAction::Replace => {
                        let running = step.previous.as_ref().unwrap_or(&step.spec);
                        backend::stop_spec(host, running, Duration::ZERO, None)?;
                        "quit at once: its disk is replaced".to_string()
                    }
                    _ => self
                        .stop(host, &step.spec, step.previous.as_ref())?
                        .to_string(),
                };
                self.reporter
                    .status("stopped", format!("{} ({how})", step.name));
            }
            if let Some(previous) = &step.previous {
                let kept = (step.action == VmAction::Restart).then_some(&step.spec);
                backend::retire_domain(host, previous, kept)?;
            }
            if step.action == VmAction::Replace {
                instance::remove(host, &step.spec.paths, &step.name)?;
                self.state.remove_instance(&step.name)?;
            }
            Ok(())
        }))
    }

    /// A VM to restart only because it did not answer, whose qemu held it paused (its disk
    /// filled up, or a save was killed): it runs again where it was, memory and all, and is
    /// waited for instead (`vm`). Whether it was.
    fn resume_instead(&self, host: &dyn Host, step: &VmStep) -> Result<bool, LabError> {
        let unanswered = !step.reasons.is_empty()
            && step
                .reasons
                .iter()
                .all(|r| matches!(r, crate::model::lab::up_plan::Reason::NoAnswer { .. }));
        if step.action != VmAction::Restart || step.running.is_none() || !unanswered {
            return Ok(false);
        }
        let Some(was) = backend::resume_if_paused(host, &step.spec)? else {
            return Ok(false);
        };
        self.reporter.status(
            "resumed",
            format!("{} (its qemu held it paused: {was})", step.name),
        );
        self.resumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(step.name.clone());
        Ok(true)
    }

    /// Powers a VM off (where it was last started from, when its paths changed).
    fn stop(
        &self,
        host: &dyn Host,
        spec: &InstanceSpec,
        previous: Option<&InstanceSpec>,
    ) -> Result<instance::Stopped, LabError> {
        let config = self.sites.ssh_config().to_path_buf();
        let name = spec.name.clone();
        let poweroff = move || ssh_poweroff(&config, &name);
        let running = previous.unwrap_or(spec);
        let timeout =
            crate::run::recover::power_off_timeout(host, running, self.options.stop_timeout);
        Ok(backend::stop_spec(host, running, timeout, Some(&poweroff))?)
    }

    /// Brings one VM to its planned state and waits for ssh; then the site inside it.
    fn vm(
        &self,
        host: &dyn Host,
        site: &SitePlan,
        step: &VmStep,
        whole: Option<&UpPlan>,
    ) -> Result<(), LabError> {
        let name = &step.name;
        let spec = &step.spec;
        match step.action {
            VmAction::Keep if step.ready => {}
            VmAction::Keep => self.wait_or_restart(host, site, step)?,
            VmAction::Create | VmAction::Replace => {
                self.reporter
                    .status("starting", format!("{name} ({})", reasons(step)));
                let key = self.state.host_key(name)?;
                // A new overlay: its playbook (if any) has not run on it.
                crate::run::provision::forget(self.state, name)?;
                let record = instance::create(host, spec, (key.private, key.public))?;
                self.save_mirror(site, &record)?;
                backend::start(host, spec)?;
                self.wait_ready(host, site, record)?;
            }
            VmAction::Restart
                if self
                    .resumed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(name) =>
            {
                self.wait_or_restart(host, site, step)?
            }
            VmAction::Restart => {
                if step.running.is_none() {
                    self.reporter
                        .status("restarting", format!("{name} ({})", reasons(step)));
                }
                self.restart(host, site, step)?;
            }
        }
        let Some(inside) = self.desired.site_inside(name) else {
            return Ok(());
        };
        let planned = whole
            .filter(|_| step.action == VmAction::Keep)
            .and_then(|plan| plan.site(&inside))
            .filter(|s| s.basis == Basis::Observed);
        match planned {
            Some(child) => self.site(child, whole),
            None => {
                // It (re)started: what runs inside it is seen only now.
                self.sites.forget(&inside);
                let inner = self.sites.connect(&inside)?;
                let observed = observe_site(
                    inner.as_ref(),
                    self.desired,
                    &inside,
                    Ask::Carefully,
                    &BTreeMap::new(),
                )?;
                let child = plan_site(self.desired, &inside, &observed, Basis::Observed);
                if child.changes() {
                    let summary = UpPlan {
                        sites: vec![child.clone()],
                    }
                    .summary();
                    for line in summary.lines() {
                        self.reporter.status("plan", line);
                    }
                }
                self.site(&child, None)
            }
        }
    }

    /// Restarts a VM on its overlay with its new spec and waits for ssh.
    fn restart(&self, host: &dyn Host, site: &SitePlan, step: &VmStep) -> Result<(), LabError> {
        let key = self.state.host_key(&step.name)?;
        let record = instance::prepare_restart(
            host,
            &step.spec,
            step.grows_to(),
            step.rebase(),
            (key.private, key.public),
        )?;
        self.save_mirror(site, &record)?;
        backend::start(host, &step.spec)?;
        self.wait_ready(host, site, record)
    }

    /// A kept VM that has not answered ssh since it started (or one its qemu held paused, now
    /// resumed): waited for, restarted once if
    /// it does not answer, then given up on with its console's tail.
    fn wait_or_restart(
        &self,
        host: &dyn Host,
        site: &SitePlan,
        step: &VmStep,
    ) -> Result<(), LabError> {
        let record = InstanceRecord {
            ready: false,
            ..InstanceRecord::new(step.spec.clone())
        };
        match self.wait_ready(host, site, record) {
            Ok(()) => Ok(()),
            Err(LabError::Boot {
                failure:
                    BootFailure {
                        kind: BootFailureKind::NoSsh { reason, .. },
                        ..
                    },
                ..
            }) => {
                self.reporter.status(
                    "restarting",
                    format!("{} (it did not answer ssh: {reason})", step.name),
                );
                let how = self.stop(host, &step.spec, None)?;
                self.reporter
                    .status("stopped", format!("{} ({how})", step.name));
                self.restart(host, site, step)
            }
            Err(other) => Err(other),
        }
    }

    /// The hypervisor VM `spec` runs in, when `spec` runs under KVM and that hypervisor VM
    /// under TCG.
    fn kvm_inside_tcg(&self, site: &SitePlan, spec: &InstanceSpec) -> Option<String> {
        let Placement::Vm(hv) = &site.placement else {
            return None;
        };
        let specs = self.specs.lock().unwrap_or_else(|e| e.into_inner());
        let under_tcg = specs.get(hv)?.hw.accel == ResolvedAccel::Tcg;
        (spec.hw.accel == ResolvedAccel::Kvm && under_tcg).then(|| hv.clone())
    }

    /// Waits until the VM answers ssh through the generated ssh_config and cloud-init (where
    /// the image has it) has finished, then records it as ready. The rules are
    /// `model::boot_watch`'s: a guest that hangs early in boot (a silent console, a stalled
    /// kernel, KVM inside TCG, …) is restarted once.
    fn wait_ready(
        &self,
        host: &dyn Host,
        site: &SitePlan,
        mut record: InstanceRecord,
    ) -> Result<(), LabError> {
        let spec = record.spec.clone();
        let timeout = self.options.realise.boot_timeout;
        let spinner = self.reporter.spinner(&spec.name, "waiting for ssh");
        let started = Instant::now();
        let rules = BootRules {
            timeout,
            direct_boot: spec.boot.is_some(),
            kvm_inside_tcg: self.kvm_inside_tcg(site, &spec),
            may_restart: true,
        };
        let route = SshRoute {
            config: self.sites.ssh_config(),
            alias: &spec.name,
            jump: None,
            probe: crate::sys::boot_wait::Probe::Shell,
        };
        let mut target = SiteVm { host, spec: &spec };
        let boot_failed = |failure| LabError::Boot {
            vm: spec.name.clone(),
            failure,
        };
        let waited = boot_wait::wait_for_ssh(&mut target, route, rules, &mut |reason, log| {
            let log = log.map(|l| format!("\n{l}")).unwrap_or_default();
            self.reporter.warn(format!("{}: {reason}{log}", spec.name));
        });
        let (ssh, watch) = match waited {
            Ok(answered) => answered,
            Err(e) => {
                spinner.finish_and_clear();
                return Err(match e {
                    BootError::Failed(failure) => boot_failed(failure),
                    BootError::Restart(e) => e.into(),
                });
            }
        };
        // Ready means cloud-init has finished too: whatever runs next (a user's ssh, a
        // playbook) must not race the image's first boot.
        spinner.set_message("waiting for cloud-init");
        let remaining = (started + timeout).saturating_duration_since(Instant::now());
        let first_boot = boot_wait::wait_for_first_boot(&watch, &ssh, remaining);
        spinner.finish_and_clear();
        first_boot.ready.map_err(boot_failed)?;
        drop(ssh);
        record.ready = true;
        instance::save(host, &record)?;
        self.save_mirror(site, &record)?;
        self.reporter.status(
            "ready",
            format!(
                "{} (ssh {:.0} s after it started)",
                spec.name,
                started.elapsed().as_secs_f64()
            ),
        );
        Ok(())
    }

    /// For a VM on another site: the copy of its record kept here.
    fn save_mirror(&self, site: &SitePlan, record: &InstanceRecord) -> Result<(), LabError> {
        if site.layout.remote {
            self.state.save_record(record)?;
        }
        Ok(())
    }
}

fn reasons(step: &VmStep) -> String {
    step.reasons
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// `poweroff` in the guest over ssh: minimal guests (Debian minbase, farm's tiny image) have
/// no ACPI daemon to act on QMP's power-down.
pub fn ssh_poweroff(ssh_config: &Path, name: &str) {
    let _ = std::process::Command::new("timeout")
        .args(["10", "ssh", "-F"])
        .arg(ssh_config)
        .args(["-o", "ConnectTimeout=5", name, "poweroff"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}
