//! VDE networks with real qemu, vde_switch and vde_plug, on farm's tiny image: a farm-run
//! switch joins two VMs and keeps a third (same subnet, other network) out; the host
//! attaches to a switch through a tap and reaches a VM that has no user networking; two
//! VMs meet on a `vxvde://` URL inside a network namespace the test makes.

use crate::support::project;
use crate::support::skip::require_vm;
use crate::support::test_home::shared_store;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use project::{Project, list, text};

const HEADER: &str = r#"
[images.tiny]
tiny = true

[targets.amd64]
arch = "x86_64"

[platforms.plain]
from = "tiny"
memory = "256M"
"#;

fn vde_tools_present(test: &str) -> bool {
    if !require_vm(test, &[]) {
        return false;
    }
    let present = ["vde_switch", "vde_plug", "wirefilter", "ip"]
        .iter()
        .all(|tool| {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if !present && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: vde2/iproute2 missing under CI=true; run ./scripts/setup.sh");
    }
    present
}

/// `farm ssh VM -- ping …` succeeds.
fn pings(out: &Output) -> bool {
    out.status.success()
}

/// Processes of `program` whose command line contains `needle`.
fn processes_with(program: &str, needle: &str) -> usize {
    list(std::path::Path::new("/proc"))
        .iter()
        .filter(|pid| pid.chars().all(|c| c.is_ascii_digit()))
        .filter_map(|pid| fs_err::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|cmd| String::from_utf8_lossy(&cmd).into_owned())
        .filter(|cmd| cmd.starts_with(program) && cmd.contains(needle))
        .count()
}

#[test]
fn switched_networks_join_their_vms_and_keep_others_out() {
    if !vde_tools_present("vde_switched") {
        return;
    }
    // `blue` uses the same subnet as `red`, so only the switches keep `c` away from them.
    let lab = format!(
        r#"{HEADER}
[networks.red]
kind = "vde"
subnet = "10.77.0.0/24"

[networks.blue]
kind = "vde"
subnet = "10.77.0.0/24"

[hosts.here]
attach = {{ red = "10.77.0.254/24" }}

[vms.a]
platform = "plain"
host = "here"
nics = [{{ network = "red", ip = "10.77.0.1/24" }}]

[vms.b]
platform = "plain"
host = "here"
user_network = false
nics = [{{ network = "red", ip = "10.77.0.2/24" }}]

[vms.c]
platform = "plain"
host = "here"
nics = [{{ network = "blue", ip = "10.77.0.3/24" }}]
"#
    );
    let p = Project::with_store(&lab, &shared_store());
    p.ok(&["up"]);

    // The switch's control directory is private to farm's state.
    let red = p.path().join(".farm/networks/red");
    let mode = fs_err::metadata(&red).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", red.display());
    assert!(red.join("ctl/ctl").exists());

    // a and b share `red`; b has no user networking and is reached through the host's tap.
    let ping = p.run(&["ssh", "a", "--", "ping", "-c", "2", "-W", "3", "10.77.0.2"]);
    assert!(pings(&ping), "a cannot reach b on red:\n{}", text(&ping));
    let hostname = p.ok(&["ssh", "b", "--", "hostname"]);
    assert_eq!(String::from_utf8_lossy(&hostname.stdout).trim(), "b");
    let config = fs_err::read_to_string(p.path().join(".farm/ssh_config")).unwrap();
    assert!(config.contains("HostName 10.77.0.2"), "{config}");
    let status: serde_json::Value =
        serde_json::from_slice(&p.ok(&["status", "--json"]).stdout).unwrap();
    let b = status.as_array().unwrap().iter().find(|r| r["name"] == "b");
    assert_eq!(b.unwrap()["address"], "10.77.0.2:22");

    // c is on `blue`: same subnet, other switch, so nothing of red answers it.
    for target in ["10.77.0.1", "10.77.0.2", "10.77.0.254"] {
        let ping = p.run(&["ssh", "c", "--", "ping", "-c", "2", "-W", "2", target]);
        assert!(!pings(&ping), "c reached {target} across networks");
    }
    let ping = p.run(&["ssh", "c", "--", "ping", "-c", "1", "-W", "2", "10.77.0.3"]);
    assert!(pings(&ping), "c cannot ping itself:\n{}", text(&ping));

    // Down stops the switches and the tap with the VMs.
    let red_ctl = red.join("ctl").display().to_string();
    assert_eq!(
        processes_with("vde_switch", &red_ctl),
        1,
        "one switch for red"
    );
    assert_eq!(processes_with("vde_plug", &red_ctl), 1, "one tap on red");
    p.ok(&["down"]);
    assert_eq!(
        processes_with("vde_switch", &red_ctl),
        0,
        "red's switch outlived down"
    );
    assert_eq!(
        processes_with("vde_plug", &red_ctl),
        0,
        "red's tap outlived down"
    );
    assert!(!red.exists(), "red's state outlived down");
    assert!(!p.path().join(".farm/networks/blue").exists());
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("10.77.0.254"),
        "the tap outlived down"
    );
}

/// A private network namespace with loopback up and multicast routed over it, so
/// `vxvde://` (UDP multicast) works between processes in it and nowhere else.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("farmvx{}", std::process::id());
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", text(&out));
        };
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up", "multicast", "on"]);
        ip(&["-n", &ns.0, "route", "add", "224.0.0.0/4", "dev", "lo"]);
        ns
    }

    /// `farm ARGS` in the namespace, for project `p`.
    fn farm(&self, p: &Project, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_farm")])
            .args(args)
            .current_dir(p.path())
            .env("FARM_STORE", &p.store)
            .output()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn vxvde_url_joins_vms_in_a_private_namespace() {
    if !vde_tools_present("vde_vxvde") {
        return;
    }
    let lab = format!(
        r#"{HEADER}
[networks.vx]
kind = "vde"
url = "vxvde://239.7.7.7"
subnet = "10.78.0.0/24"

[vms.left]
platform = "plain"
nics = [{{ network = "vx", ip = "10.78.0.1/24" }}]

[vms.right]
platform = "plain"
nics = [{{ network = "vx", ip = "10.78.0.2/24" }}]
"#
    );
    let p = Project::with_store(&lab, &shared_store());
    // Images are built outside the namespace (it has no route to the mirror).
    p.ok(&["build"]);
    let ns = Netns::new();
    let up = ns.farm(&p, &["up"]);
    assert!(up.status.success(), "{}", text(&up));
    let ping = ns.farm(
        &p,
        &[
            "ssh",
            "left",
            "--",
            "ping",
            "-c",
            "2",
            "-W",
            "3",
            "10.78.0.2",
        ],
    );
    let reached = ping.status.success();
    let down = ns.farm(&p, &["down"]);
    assert!(
        reached,
        "left cannot reach right over vxvde:\n{}",
        text(&ping)
    );
    assert!(down.status.success(), "{}", text(&down));
}
