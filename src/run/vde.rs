//! Running a site's VDE networks (see `model::network` for what each one needs): the
//! checks before anything starts, a `vde_switch` per switched network, a tap with the
//! site's address when it attaches, and their teardown. Everything goes through `Host`, so
//! the same code serves this machine and a hypervisor VM.
//!
//! Each network keeps its files in `<site state>/networks/<name>/` (mode 0700): the
//! switch's control directory `ctl/`, pidfiles and logs. A daemon counts as running when
//! its pidfile's process is alive and has this network's control directory or tap among
//! its arguments, so a reused pid is never mistaken for it.

use std::path::Path;

use crate::model::build::qemu::ProcessTag;
use crate::model::config::network::{SiteNetwork, VdeBackend};
use crate::model::shell::{quote_path, shell_quote};
use crate::run::host::{Host, HostError, process_alive_test};

#[derive(Debug, thiserror::Error)]
pub enum VdeError {
    #[error("Host `{host}` cannot run the VDE networks of its VMs: {problems}\nhint: {hint}")]
    Unsupported {
        host: String,
        problems: String,
        hint: String,
    },
    #[error("Starting network `{network}` on host `{host}` failed ({what}):\n{output}")]
    Start {
        host: String,
        network: String,
        what: &'static str,
        output: String,
    },
    #[error(transparent)]
    Host(#[from] HostError),
}

/// Fails, naming the host, unless every qemu in `qemus` has `-netdev vde` (Debian's
/// are built with it; others may not be). Asked only when VMs start: it costs a qemu start.
pub fn check_netdev(host: &dyn Host, qemus: &[String]) -> Result<(), VdeError> {
    if qemus.is_empty() {
        return Ok(());
    }
    let script: String = qemus
        .iter()
        .map(|qemu| {
            let q = shell_quote(qemu);
            format!("{q} -netdev help 2>/dev/null | grep -qx vde || echo {q}; ")
        })
        .collect();
    let out = host.run(&script)?;
    let without: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if without.is_empty() {
        return Ok(());
    }
    Err(VdeError::Unsupported {
        host: host.name().to_string(),
        problems: format!("{} has no `-netdev vde`", without.join(", ")),
        hint: "install Debian's qemu-system packages, which are built with VDE".into(),
    })
}

/// Starts what `network` needs on the site whose state directory is `site_state`, unless it
/// already runs: the switch, then the tap with the site's address. Idempotent.
pub fn ensure_up(
    host: &dyn Host,
    site_state: &Path,
    network: &SiteNetwork,
    project: &str,
) -> Result<(), VdeError> {
    let env = |kind: &str| -> String {
        ProcessTag::network(project, &network.name, kind)
            .env()
            .iter()
            .map(|(k, v)| format!("{k}={} ", shell_quote(v)))
            .collect()
    };
    let dir = network.dir(site_state);
    let failed = |what: &'static str, output: String| VdeError::Start {
        host: host.name().to_string(),
        network: network.name.clone(),
        what,
        output,
    };
    let prepare = format!(
        "mkdir -p {dir} && chmod 700 {networks} {dir}",
        dir = quote_path(&dir),
        networks = quote_path(&site_state.join("networks")),
    );
    let out = host.run(&prepare)?;
    if !out.success() {
        return Err(failed("creating its state directory", out.said()));
    }
    if network.backend == VdeBackend::Switch {
        let ctl = network.control_dir(site_state);
        let pidfile = dir.join("switch.pid");
        let log = dir.join("switch.log");
        let script = format!(
            "{alive} && exit 0; rm -rf {ctl} {pid}; \
             env {env}vde_switch --sock {ctl} --dirmode 0700 --mode 0600 --daemon --pidfile {pid} \
               </dev/null >{log} 2>&1 || {{ cat {log}; exit 1; }}; \
             i=0; while [ ! -S {ctl}/ctl ]; do i=$((i+1)); [ $i -gt 50 ] && {{ cat {log}; exit 1; }}; sleep 0.1; done",
            alive = process_alive_test(&pidfile, &ctl.display().to_string()),
            env = env("switch"),
            ctl = quote_path(&ctl),
            pid = quote_path(&pidfile),
            log = quote_path(&log),
        );
        let out = host.run(&script)?;
        if !out.success() {
            return Err(failed("vde_switch", out.said()));
        }
    }
    if let Some(address) = network.attach {
        let tap = network.tap_name(site_state);
        let pidfile = dir.join("tap.pid");
        let log = dir.join("tap.log");
        // A stale pidfile (a hypervisor that crashed leaves them) is removed first: vde2's
        // daemons refuse to start over one, after they daemonized. A vde_plug can exit right
        // after it made the tap (seen once here, in an L1 just rebooted), taking the tap
        // with it: the tap counts as up once it has its address
        // and its vde_plug still runs half a second later; else it is started again, a few
        // times, and the last vde_plug's log is the error.
        let script = format!(
            "started=0; n=0; \
             while :; do \
               if {alive} && ip addr replace {address} dev {tap} 2>/dev/null && ip link set {tap} up 2>/dev/null; then \
                 [ $started = 0 ] && exit 0; sleep 0.5; {alive} && exit 0; \
               fi; \
               n=$((n+1)); [ $n -gt 4 ] && {{ echo 'vde_plug did not keep the tap {tap} up; its log:'; cat {log}; exit 1; }}; \
               [ $n -gt 1 ] && sleep 2; \
               [ -e /dev/net/tun ] || modprobe tun 2>/dev/null || true; \
               if ! {alive}; then \
                 rm -f {pid}; \
                 env {env}vde_plug --daemon --pidfile {pid} --descr {descr} tap://{tap} {plug} \
                   </dev/null >{log} 2>&1 || {{ cat {log}; exit 1; }}; \
                 started=1; \
               fi; \
               i=0; while ! ip link show {tap} >/dev/null 2>&1 && [ $i -lt 50 ]; do i=$((i+1)); sleep 0.1; done; \
             done",
            alive = process_alive_test(&pidfile, &format!("tap://{tap}")),
            env = env("tap"),
            pid = quote_path(&pidfile),
            descr = shell_quote(&format!("farm:{}", network.name)),
            plug = shell_quote(&network.plug(site_state)),
            log = quote_path(&log),
        );
        let out = host.run(&script)?;
        if !out.success() {
            return Err(failed("the tap of its `attach`", out.said()));
        }
    }
    Ok(())
}

/// Stops the tap and the switch of `network` on the site and removes its files. A network
/// that is not running is left as it is.
pub fn tear_down(
    host: &dyn Host,
    site_state: &Path,
    network: &SiteNetwork,
) -> Result<(), HostError> {
    let dir = network.dir(site_state);
    let stop = |pidfile: &Path, mark: &str| {
        format!(
            "if {alive}; then kill \"$pid\"; i=0; while kill -0 \"$pid\" 2>/dev/null && [ $i -lt 50 ]; do i=$((i+1)); sleep 0.1; done; kill -9 \"$pid\" 2>/dev/null; fi; ",
            alive = process_alive_test(pidfile, mark)
        )
    };
    let tap = format!("tap://{}", network.tap_name(site_state));
    let ctl = network.control_dir(site_state).display().to_string();
    let script = format!(
        "{}{}rm -rf {}",
        stop(&dir.join("tap.pid"), &tap),
        stop(&dir.join("switch.pid"), &ctl),
        quote_path(&dir)
    );
    host.run(&script).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::host::LocalHost;

    #[test]
    fn a_qemu_without_vde_is_named() {
        let host = LocalHost {
            name: "here".into(),
        };
        let err = check_netdev(&host, &["true".to_string()]).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "Host `here` cannot run the VDE networks of its VMs: 'true' has no `-netdev vde`"
            ) || err.to_string().contains("true has no `-netdev vde`"),
            "{err}"
        );
        assert!(check_netdev(&host, &[]).is_ok());
    }
}
