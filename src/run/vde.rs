//! Running a site's VDE networks (see `model::network` for what each one needs): the
//! checks before anything starts, a `vde_switch` per switched network, a tap with the
//! site's address when it attaches, and their teardown. Everything goes through `Host`, so
//! the same code serves this machine and a hypervisor VM.
//!
//! Each network keeps its files in `<site state>/networks/<name>/` (mode 0700): the
//! switch's control directory `ctl/`, pidfiles and logs. A daemon counts as running when
//! its pidfile's process is alive and has this network's control directory or tap among
//! its arguments, so a reused pid is never mistaken for it.

use std::collections::BTreeSet;
use std::path::Path;

use crate::model::network::{SiteNetwork, VdeBackend};
use crate::model::values::Arch;
use crate::run::host::{Host, HostError, process_alive_test};
use crate::sys::ssh::shell_quote;

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

/// What a site lacks to run `networks` for VMs of `arches`, found by one script.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lacks {
    /// qemu binaries built without `-netdev vde`.
    pub qemu_without_vde: Vec<String>,
    /// VDE tools not installed.
    pub tools: Vec<String>,
    /// An attachment needs a tap, and the user cannot make one.
    pub tap_rights: bool,
}

impl Lacks {
    fn is_empty(&self) -> bool {
        self.qemu_without_vde.is_empty() && self.tools.is_empty() && !self.tap_rights
    }
}

/// The check script: one line per problem, parsed by [`parse_lacks`].
pub fn check_script(networks: &[SiteNetwork], arches: &BTreeSet<Arch>) -> String {
    let mut script = String::new();
    for arch in arches {
        let qemu = match arch {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        };
        script.push_str(&format!(
            "{qemu} -netdev help 2>/dev/null | grep -qx vde || echo 'no-vde {qemu}'; "
        ));
    }
    let mut tools = Vec::new();
    if networks.iter().any(|n| n.backend == VdeBackend::Switch) {
        tools.push("vde_switch");
    }
    if networks.iter().any(|n| n.attach.is_some()) {
        tools.extend(["vde_plug", "ip"]);
        script.push_str(
            "[ \"$(id -u)\" = 0 ] || grep -q '^CapEff:.*[1-9a-f]' /proc/self/status || echo no-tap-rights; ",
        );
    }
    for tool in tools {
        script.push_str(&format!(
            "command -v {tool} >/dev/null 2>&1 || echo 'missing {tool}'; "
        ));
    }
    script.push_str("true");
    script
}

pub fn parse_lacks(text: &str) -> Lacks {
    let mut lacks = Lacks::default();
    for line in text.lines().map(str::trim) {
        match line.split_once(' ') {
            Some(("no-vde", qemu)) => lacks.qemu_without_vde.push(qemu.to_string()),
            Some(("missing", tool)) => lacks.tools.push(tool.to_string()),
            _ if line == "no-tap-rights" => lacks.tap_rights = true,
            _ => {}
        }
    }
    lacks
}

/// Fails, naming the host and everything it lacks, unless `host` can run `networks`.
pub fn check(
    host: &dyn Host,
    networks: &[SiteNetwork],
    arches: &BTreeSet<Arch>,
) -> Result<(), VdeError> {
    if networks.is_empty() {
        return Ok(());
    }
    let out = host.run(&check_script(networks, arches))?;
    let lacks = parse_lacks(&String::from_utf8_lossy(&out.stdout));
    if lacks.is_empty() {
        return Ok(());
    }
    let mut problems = Vec::new();
    let mut hints = Vec::new();
    if !lacks.qemu_without_vde.is_empty() {
        problems.push(format!(
            "{} has no `-netdev vde`",
            lacks.qemu_without_vde.join(", ")
        ));
        hints.push("install Debian's qemu-system packages, which are built with VDE");
    }
    if !lacks.tools.is_empty() {
        problems.push(format!("it lacks {}", lacks.tools.join(", ")));
        hints.push("install the packages `vde2` (vde_switch, vde_plug) and `iproute2` (ip)");
    }
    if lacks.tap_rights {
        problems.push("an `attach` needs a tap device, which only root may create".to_string());
        hints.push("run farm as root there, or remove the `attach`");
    }
    Err(VdeError::Unsupported {
        host: host.name().to_string(),
        problems: problems.join("; "),
        hint: hints.join("; "),
    })
}

/// Starts what `network` needs on the site whose state directory is `site_state`, unless it
/// already runs: the switch, then the tap with the site's address. Idempotent.
pub fn ensure_up(
    host: &dyn Host,
    site_state: &Path,
    network: &SiteNetwork,
) -> Result<(), VdeError> {
    let dir = network.dir(site_state);
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let failed = |what: &'static str, output: String| VdeError::Start {
        host: host.name().to_string(),
        network: network.name.clone(),
        what,
        output,
    };
    let prepare = format!(
        "mkdir -p {dir} && chmod 700 {networks} {dir}",
        dir = q(&dir),
        networks = q(&site_state.join("networks")),
    );
    let out = host.run(&prepare)?;
    if !out.success() {
        return Err(failed("creating its state directory", out.text()));
    }
    if network.backend == VdeBackend::Switch {
        let ctl = network.control_dir(site_state);
        let pidfile = dir.join("switch.pid");
        let log = dir.join("switch.log");
        let script = format!(
            "{alive} && exit 0; rm -rf {ctl}; \
             vde_switch --sock {ctl} --dirmode 0700 --mode 0600 --daemon --pidfile {pid} \
               </dev/null >{log} 2>&1 || {{ cat {log}; exit 1; }}; \
             i=0; while [ ! -S {ctl}/ctl ]; do i=$((i+1)); [ $i -gt 50 ] && {{ cat {log}; exit 1; }}; sleep 0.1; done",
            alive = process_alive_test(&pidfile, &ctl.display().to_string()),
            ctl = q(&ctl),
            pid = q(&pidfile),
            log = q(&log),
        );
        let out = host.run(&script)?;
        if !out.success() {
            return Err(failed("vde_switch", out.text()));
        }
    }
    if let Some(address) = network.attach {
        let tap = network.tap_name(site_state);
        let pidfile = dir.join("tap.pid");
        let log = dir.join("tap.log");
        let script = format!(
            "if ! {alive}; then \
               [ -e /dev/net/tun ] || modprobe tun 2>/dev/null || true; \
               vde_plug --daemon --pidfile {pid} --descr {descr} tap://{tap} {plug} \
                 </dev/null >{log} 2>&1 || {{ cat {log}; exit 1; }}; \
               i=0; while ! ip link show {tap} >/dev/null 2>&1; do \
                 i=$((i+1)); [ $i -gt 50 ] && {{ echo 'no tap {tap} appeared'; cat {log}; exit 1; }}; sleep 0.1; done; \
             fi; \
             ip addr replace {address} dev {tap} && ip link set {tap} up",
            alive = process_alive_test(&pidfile, &format!("tap://{tap}")),
            pid = q(&pidfile),
            descr = shell_quote(&format!("farm:{}", network.name)),
            plug = shell_quote(&network.plug(site_state)),
            log = q(&log),
        );
        let out = host.run(&script)?;
        if !out.success() {
            return Err(failed("the tap of its `attach`", out.text()));
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
        shell_quote(&dir.display().to_string())
    );
    host.run(&script).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(backend: VdeBackend, attach: bool) -> SiteNetwork {
        SiteNetwork {
            name: "lab".into(),
            backend,
            attach: attach.then(|| "10.0.0.254/24".parse().unwrap()),
            users: vec!["vm".into()],
        }
    }

    #[test]
    fn the_check_asks_only_for_what_the_networks_need() {
        let arches = BTreeSet::from([Arch::X86_64]);
        let url = network(VdeBackend::Url("vxvde://234.0.0.1".into()), false);
        let script = check_script(&[url], &arches);
        assert!(script.contains("qemu-system-x86_64 -netdev help"));
        assert!(!script.contains("vde_switch") && !script.contains("vde_plug"));
        let script = check_script(&[network(VdeBackend::Switch, true)], &arches);
        assert!(script.contains("command -v vde_switch"));
        assert!(script.contains("command -v vde_plug"));
        assert!(script.contains("no-tap-rights"));
    }

    #[test]
    fn lacks_are_parsed_line_by_line() {
        let lacks = parse_lacks("no-vde qemu-system-x86_64\nmissing vde_plug\nno-tap-rights\n");
        assert_eq!(lacks.qemu_without_vde, vec!["qemu-system-x86_64"]);
        assert_eq!(lacks.tools, vec!["vde_plug"]);
        assert!(lacks.tap_rights);
        assert!(parse_lacks("").is_empty());
    }
}
