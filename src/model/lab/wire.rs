//! The wire of a VM's NIC on a VDE network: vde2's `wirefilter` between the VM's qemu and
//! the network, so `farm link --delay/--loss/--rate` can change the line while the VM runs.
//!
//! qemu plugs its NIC into a point-to-point VDE link (`ptp://` of vdeplug4) whose other end
//! is the wirefilter; the wirefilter plugs into the network itself (a switch's control
//! directory or a `vxvde://` URL). wirefilter takes its two plugs as one `PLUG1:PLUG2`
//! argument, split at the first colon, so its own end is named by a file holding the
//! `ptp://` URL (vdeplug4 reads a VNL from a regular file). A wire passes everything
//! unchanged until told otherwise through its management socket; it starts with its VM and
//! stops with it, and what it was told does not outlive a restart.

use std::path::{Path, PathBuf};

use crate::model::build::qemu::ProcessTag;
use crate::model::lab::instance::{InstancePaths, InstanceSpec};
use crate::model::lab::observation::alive_test;
use crate::model::shell::{quote_path, shell_quote};

/// One VDE NIC's wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wire {
    /// The network it plugs into.
    pub network: String,
    /// Where the network is plugged (what qemu would have been given without the wire).
    pub plug: String,
    /// Its files in the instance's directory.
    pub files: WireFiles,
    /// What marks it as farm's: `net:NETWORK:wire-VM`, so a full `farm down` finds it
    /// as one of the network's daemons.
    pub tag: ProcessTag,
}

/// The files of the `i`th VDE NIC's wire, in the instance's directory: short names, since
/// two of them are sockets (a socket's path is at most 107 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireFiles {
    /// The point-to-point socket between qemu and the wirefilter.
    pub socket: PathBuf,
    /// The file holding `ptp://SOCKET`, the wirefilter's first plug.
    pub url_file: PathBuf,
    /// The wirefilter's management socket.
    pub mgmt: PathBuf,
    pub pidfile: PathBuf,
    pub log: PathBuf,
}

impl WireFiles {
    pub fn new(paths: &InstancePaths, i: usize) -> Self {
        let file = |ext: &str| paths.dir.join(format!("wire{i}.{ext}"));
        Self {
            socket: file("ptp"),
            url_file: file("url"),
            mgmt: file("mgmt"),
            pidfile: file("pid"),
            log: file("log"),
        }
    }

    /// The URL qemu's `-netdev vde,sock=` is given.
    pub fn qemu_plug(&self) -> String {
        format!("ptp://{}", self.socket.display())
    }
}

impl InstanceSpec {
    /// The wires of its VDE NICs, in NIC order.
    pub fn wires(&self) -> Vec<Wire> {
        self.vde_nics
            .iter()
            .enumerate()
            .map(|(i, nic)| Wire {
                network: nic.network.clone(),
                plug: nic.plug.clone(),
                files: WireFiles::new(&self.paths, i),
                tag: ProcessTag::network(
                    &self.tag.project,
                    &nic.network,
                    &format!("wire-{}", self.name),
                ),
            })
            .collect()
    }

    /// The wire of its NIC on `network`; `Err` says which VDE networks it has.
    pub fn wire_of(&self, network: &str) -> Result<Wire, String> {
        let wires = self.wires();
        let names: Vec<String> = wires.iter().map(|w| w.network.clone()).collect();
        wires
            .into_iter()
            .find(|w| w.network == network)
            .ok_or_else(|| match names.is_empty() {
                true => format!("it has no NIC on a VDE network, so `{network}` has no wire"),
                false => format!(
                    "it has no NIC on VDE network `{network}` (its VDE networks: {})",
                    names.join(", ")
                ),
            })
    }
}

/// A script that (re)starts every wire of `spec`, each passing everything; empty when it
/// has none. It runs only while the VM's qemu does not (before it starts). A wire still
/// running from an earlier start is stopped first: what it was told belongs to the VM that
/// ran then. The point-to-point link's socket files (`wireN.ptp`, and `wireN.ptp+`, qemu's
/// end in vdeplug4 4.0's datagram `ptp`) are removed, and so is the pidfile: stale ones are
/// left by a hypervisor that crashed, and vde2's daemons refuse to start over an existing
/// pidfile (after they daemonized, so only the wire's absence would say so). A wire counts
/// as started once its process runs and its management socket is there.
pub fn start_script(spec: &InstanceSpec) -> String {
    spec.wires()
        .iter()
        .map(|wire| {
            let f = &wire.files;
            let env: String = wire
                .tag
                .env()
                .iter()
                .map(|(k, v)| format!("{k}={} ", shell_quote(v)))
                .collect();
            format!(
                "{stop}printf '%s\\n' {url} > {url_file} && rm -f {mgmt} {socket} {socket}+ {pid} && \
                 env {env}wirefilter -v {plugs} -M {mgmt} --mgmtmode 600 --daemon --pidfile {pid} \
                   </dev/null >{log} 2>&1 || {{ echo {what}; cat {log}; exit 1; }}; \
                 i=0; until {alive} && [ -S {mgmt} ]; do i=$((i+1)); [ $i -gt 100 ] && {{ \
                   echo {what}; cat {log}; journalctl -q -t wirefilter -n 5 --no-pager 2>/dev/null; exit 1; }}; \
                   sleep 0.05; done; ",
                stop = stop_one(f),
                alive = wire_alive(&f.pidfile, &f.mgmt),
                url = shell_quote(&f.qemu_plug()),
                url_file = quote_path(&f.url_file),
                mgmt = quote_path(&f.mgmt),
                socket = quote_path(&f.socket),
                plugs = shell_quote(&format!("{}:{}", f.url_file.display(), wire.plug)),
                pid = quote_path(&f.pidfile),
                log = quote_path(&f.log),
                what = shell_quote(&format!(
                    "The wirefilter of its NIC on network `{}` did not start:",
                    wire.network
                )),
            )
        })
        .collect()
}

/// A script that stops every wire in the instance directory `paths` (by their pidfiles,
/// so a VM whose record is gone loses its wires too). A wire is known by its management
/// socket among its arguments: the only one of them that is a whole path.
pub fn stop_script(paths: &InstancePaths) -> String {
    // `alive_test` leaves the running pid in `$pid`, so the pidfile is `$file`.
    let alive = alive_test("\"$file\"", "\"${file%.pid}.mgmt\"");
    format!(
        "for file in {dir}/wire*.pid; do [ -e \"$file\" ] || continue; \
           if {alive}; then kill \"$pid\" 2>/dev/null; while {alive}; do sleep 0.05; done; fi; \
           rm -f \"$file\"; \
         done; true",
        dir = quote_path(&paths.dir),
    )
}

/// Stops the wire whose files are `f`, when it runs.
fn stop_one(f: &WireFiles) -> String {
    let alive = wire_alive(&f.pidfile, &f.mgmt);
    format!("if {alive}; then kill \"$pid\"; while {alive}; do sleep 0.05; done; fi; ")
}

/// True when `pidfile`'s process runs with `mgmt` (its management socket) among its
/// arguments (a reused pid is never taken for the wire).
fn wire_alive(pidfile: &Path, mgmt: &Path) -> String {
    alive_test(
        &quote_path(pidfile),
        &shell_quote(&mgmt.display().to_string()),
    )
}

/// What `farm link --delay/--loss/--rate` sets on a wire, each in both directions; what is
/// not given stays as it was. Zero takes a setting off.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shaping {
    /// Added to every frame, in milliseconds.
    pub delay_ms: Option<u64>,
    /// Frames dropped, in percent.
    pub loss_percent: Option<f64>,
    /// The line's bandwidth, in bytes per second.
    pub rate_bytes: Option<u64>,
}

impl Shaping {
    pub fn is_empty(&self) -> bool {
        *self == Shaping::default()
    }

    /// The wirefilter management commands that set it.
    pub fn commands(&self) -> Vec<String> {
        let mut commands = Vec::new();
        if let Some(ms) = self.delay_ms {
            commands.push(format!("delay {ms}"));
        }
        if let Some(percent) = self.loss_percent {
            commands.push(format!("loss {percent}"));
        }
        if let Some(bytes) = self.rate_bytes {
            commands.push(format!("bandwidth {bytes}"));
        }
        commands
    }

    /// For people and the verb log: `delay 100 ms, loss 5%, rate 1 Mbit/s`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(ms) = self.delay_ms {
            parts.push(format!("delay {ms} ms"));
        }
        if let Some(percent) = self.loss_percent {
            parts.push(format!("loss {percent}%"));
        }
        if let Some(bytes) = self.rate_bytes {
            parts.push(match bytes {
                0 => "rate unlimited".to_string(),
                b => format!("rate {} kbit/s", b * 8 / 1000),
            });
        }
        parts.join(", ")
    }
}

/// A delay as `farm link --delay` takes it: `150ms`, `2s`, or milliseconds alone.
pub fn parse_delay(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else {
        (t, 1)
    };
    number
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|ms| *ms <= 600_000)
        .ok_or_else(|| {
            format!("`{text}` is not a delay: write `150ms` or `2s` (at most 10 minutes)")
        })
}

/// A loss as `farm link --loss` takes it: `5`, `5%` or `0.5%`.
pub fn parse_loss(text: &str) -> Result<f64, String> {
    let t = text.trim();
    t.strip_suffix('%')
        .unwrap_or(t)
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|p| (0.0..=100.0).contains(p))
        .ok_or_else(|| format!("`{text}` is not a loss: write a percentage from 0 to 100, as `5%`"))
}

/// A rate as `farm link --rate` takes it, in bits per second as `tc` writes them (`512kbit`,
/// `10mbit`, `1gbit`; `0` for no limit); in bytes per second, as wirefilter counts.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let refuse = || {
        format!("`{text}` is not a rate: write `512kbit`, `10mbit` or `1gbit` (`0` for no limit)")
    };
    if t == "0" {
        return Ok(0);
    }
    let (number, bits) = [
        ("gbit", 1_000_000_000u64),
        ("mbit", 1_000_000),
        ("kbit", 1_000),
        ("bit", 1),
    ]
    .iter()
    .find_map(|(unit, scale)| t.strip_suffix(unit).map(|n| (n, *scale)))
    .ok_or_else(refuse)?;
    let value: f64 = number.trim().parse().map_err(|_| refuse())?;
    let bytes = (value * bits as f64 / 8.0).round();
    (1.0..1e12)
        .contains(&bytes)
        .then_some(bytes as u64)
        .ok_or_else(refuse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lab::instance::tests::spec as spec_with_vde;

    #[test]
    fn a_vde_nic_is_plugged_into_its_wire_and_the_wire_into_the_network() {
        let spec = spec_with_vde();
        let wires = spec.wires();
        assert_eq!(wires.len(), 1);
        let wire = &wires[0];
        assert_eq!(wire.plug, "vxvde://234.0.0.1");
        assert_eq!(
            wire.tag.what,
            format!("net:{}:wire-{}", wire.network, spec.name)
        );
        let argv = spec.qemu().argv().join(" ");
        assert!(
            argv.contains(&format!("vde,id=net1,sock={}", wire.files.qemu_plug())),
            "{argv}"
        );
        let script = start_script(&spec);
        assert!(
            script.contains(&format!(
                "wirefilter -v '{}:vxvde://234.0.0.1' -M",
                wire.files.url_file.display()
            )),
            "{script}"
        );
        assert!(
            script.contains(&format!("FARM_PROCESS={}", shell_quote(&wire.tag.what))),
            "{script}"
        );
    }

    #[test]
    fn a_wire_is_found_by_its_network_and_a_missing_one_named() {
        let spec = spec_with_vde();
        let network = spec.vde_nics[0].network.clone();
        assert_eq!(spec.wire_of(&network).unwrap().network, network);
        let err = spec.wire_of("nope").unwrap_err();
        assert!(err.contains("`nope`") && err.contains(&network), "{err}");
    }

    #[test]
    fn shaping_is_read_as_people_write_it_and_told_as_wirefilter_takes_it() {
        assert_eq!(parse_delay("150ms"), Ok(150));
        assert_eq!(parse_delay("2s"), Ok(2000));
        assert_eq!(parse_delay("40"), Ok(40));
        assert!(parse_delay("fast").unwrap_err().contains("`fast`"));
        assert_eq!(parse_loss("5%"), Ok(5.0));
        assert_eq!(parse_loss("0.5"), Ok(0.5));
        assert!(parse_loss("150%").is_err());
        assert_eq!(parse_rate("1mbit"), Ok(125_000));
        assert_eq!(parse_rate("512kbit"), Ok(64_000));
        assert_eq!(parse_rate("0"), Ok(0));
        assert!(parse_rate("10MB").unwrap_err().contains("`10MB`"));
        let shaping = Shaping {
            delay_ms: Some(100),
            loss_percent: Some(5.0),
            rate_bytes: Some(125_000),
        };
        assert_eq!(
            shaping.commands(),
            ["delay 100", "loss 5", "bandwidth 125000"]
        );
        assert_eq!(
            shaping.describe(),
            "delay 100 ms, loss 5%, rate 1000 kbit/s"
        );
        assert!(Shaping::default().is_empty());
    }

    /// Runs `script` with `sh`; its success and what it said.
    fn sh(script: &str) -> (bool, String) {
        let out = std::process::Command::new("sh")
            .args(["-c", script])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), said)
    }

    /// A hypervisor that crashed leaves its wires' pidfiles behind; vde2's wirefilter
    /// refuses to start over one after it daemonized, which left the VM cut off until it
    /// was restarted. Real vde2 programs (a machine without them skips, CI has them).
    #[test]
    fn a_wire_starts_over_a_stale_pidfile_and_says_so_when_it_cannot_start() {
        if !sh("command -v vde_switch && command -v wirefilter").0 {
            assert!(std::env::var("CI").is_err(), "vde2 is missing under CI");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ctl = dir.path().join("ctl");
        let switch_pid = dir.path().join("switch.pid");
        let (ok, said) = sh(&format!(
            "vde_switch --sock {} --daemon --pidfile {}",
            quote_path(&ctl),
            quote_path(&switch_pid)
        ));
        assert!(ok, "{said}");
        let mut spec = spec_with_vde();
        spec.paths = InstancePaths::new(dir.path(), "web");
        spec.vde_nics[0].plug = format!("vde://{}", ctl.display());
        fs_err::create_dir_all(&spec.paths.dir).unwrap();
        let files = &spec.wires()[0].files;
        // A pid that runs, but is not a wirefilter: this test's own.
        fs_err::write(&files.pidfile, format!("{}\n", std::process::id())).unwrap();

        let (started, said) = sh(&start_script(&spec));
        let alive = sh(&wire_alive(&files.pidfile, &files.mgmt)).0 && files.mgmt.exists();
        let (stopped, stop_said) = sh(&stop_script(&spec.paths));
        let gone = !sh(&wire_alive(&files.pidfile, &files.mgmt)).0;
        spec.vde_nics[0].plug = format!("vde://{}", dir.path().join("no-switch").display());
        let (refused, refusal) = sh(&start_script(&spec));
        sh(&format!("kill $(cat {})", quote_path(&switch_pid)));

        assert!(started && alive, "{said}");
        assert!(stopped && gone, "{stop_said}");
        assert!(!refused, "{refusal}");
        assert!(
            refusal.contains("did not start") && refusal.contains("no-switch"),
            "{refusal}"
        );
    }

    #[test]
    fn stopping_wires_kills_only_processes_started_with_their_url_file() {
        let spec = spec_with_vde();
        let script = stop_script(&spec.paths);
        assert!(script.contains("wire*.pid"), "{script}");
        assert!(script.contains("\"${file%.pid}.mgmt\""), "{script}");
    }
}
