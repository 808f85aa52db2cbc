//! TCP throughput between two VMs over a farm VDE network (a farm-run `vde_switch`),
//! next to the same two VMs joined by QEMU's `-netdev stream` socket link, in the same run.
//!
//! Guests are a Debian platform with iperf3 (built into the shared test store if missing,
//! not timed). Each side runs `iperf3 -c` for 10 s against `iperf3 -s` on the other VM;
//! the figure is the receiver's rate. Under TCG both links are bound by the emulated
//! CPUs, so the ratio says what the VDE path costs against a point-to-point socket.

#[path = "support/manual_vm.rs"]
#[allow(dead_code)]
mod manual_vm;

use std::path::Path;
use std::process::Command;

use manual_vm::{ExtraNic, ManualVm, entry, farm, shared_store};

const SECONDS: u32 = 10;

const LAB: &str = r#"
[images.bookworm]
debian = { suite = "bookworm" }

[targets.amd64]
arch = "x86_64"

[platforms.perf]
from = "bookworm"
packages = ["iperf3"]

[networks.bench]
kind = "vde"
subnet = "10.99.0.0/24"

[vms.server]
platform = "perf"
nics = [{ network = "bench", ip = "10.99.0.1/24" }]

[vms.client]
platform = "perf"
nics = [{ network = "bench", ip = "10.99.0.2/24" }]
"#;

/// Receiver-side bits per second from `iperf3 -J` output.
fn received_bps(json: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(json).expect("iperf3 -J output");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("sum_received.bits_per_second")
}

fn iperf_client(server_ip: &str) -> String {
    format!("iperf3 -c {server_ip} -t {SECONDS} -J")
}

/// Runs `farm ssh VM -- SCRIPT` in `project` and returns stdout.
fn farm_ssh(project: &Path, store: &Path, vm: &str, script: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_farm"))
        .current_dir(project)
        .env("FARM_STORE", store)
        .args(["ssh", vm, "--", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "farm ssh {vm} `{script}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn over_vde(project: &Path, store: &Path) -> f64 {
    farm(project, store, &["up", "-q"]);
    farm_ssh(project, store, "server", "iperf3 -s -D");
    let json = farm_ssh(project, store, "client", &iperf_client("10.99.0.1"));
    farm(project, store, &["down", "-q", "--timeout", "20"]);
    received_bps(&json)
}

fn over_stream(image: &Path, layer: &Path) -> f64 {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nic = |server: bool, last: u8| ExtraNic {
        netdev: format!(
            "stream,server={},addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
            if server { "on" } else { "off" }
        ),
        mac: farm::model::values::MacAddr([0x52, 0x54, 0x00, 0x99, 0x00, last]),
        address: format!("10.99.0.{last}/24").parse().unwrap(),
    };
    let boot = image.join("boot");
    let server = ManualVm::start_with_nics(layer, &boot, None, (1024, 1), &[nic(true, 1)]);
    // The client's stream connects once, at start: the server's socket must be listening.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let client = ManualVm::start_with_nics(layer, &boot, None, (1024, 1), &[nic(false, 2)]);
    std::thread::scope(|s| {
        s.spawn(|| server.wait_ssh());
        s.spawn(|| client.wait_ssh());
    });
    server.ssh_output("iperf3 -s -D");
    let json = client.ssh_output(&iperf_client("10.99.0.1"));
    server.poweroff();
    client.poweroff();
    received_bps(&json)
}

fn main() {
    let store = shared_store();
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(dir.path().join("farm.toml"), LAB).unwrap();
    farm(dir.path(), &store, &["build", "-q"]);
    let image = entry(dir.path(), &store, "bookworm");
    let layer = entry(dir.path(), &store, "perf");

    let vde = over_vde(dir.path(), &store);
    let stream = over_stream(&image, &layer);
    let mbit = |bps: f64| bps / 1e6;
    println!(
        "TCP throughput between two VMs (iperf3, {SECONDS} s, TCG): farm VDE switch {:.0} Mbit/s vs qemu -netdev stream {:.0} Mbit/s (ratio {:.2})",
        mbit(vde),
        mbit(stream),
        vde / stream
    );
}
