//! The verbs a test script calls on a running lab, at L1 and at both L2s of the tiny-L2 lab
//! (restored from its snapshot): exit statuses and output pass through, waits end when their
//! condition holds and fail on time naming the VM with its console, copies go both ways
//! through the jump chain, each verb's time is logged where `FARM_VERB_LOG` says, a cable
//! cut and a shaped line (delay, loss) are felt from L1, captures hold frames, screenshots
//! are PNGs, a rebooted L2 answers in a new boot, and a crashed one fails the next verb
//! until `up` brings it back with its wire.

use std::process::Stdio;

use crate::recovery::tiny_lab;
use crate::support::lab::restored;
use crate::support::project::{stderr, stdout, text};

#[test]
fn exec_wait_and_cp_reach_every_level_and_fail_naming_the_vm() {
    let Some(lab) = restored("verbs", &tiny_lab()) else {
        return;
    };
    let p = &lab.project;
    let log = tempfile::NamedTempFile::new().unwrap();

    // exec: the command's output streams through and its exit status is farm's.
    for vm in ["hv", "leaf_amd64", "vleaf_amd64"] {
        let out = p
            .farm(&[
                "exec",
                vm,
                "--",
                "echo out-$(hostname); echo err >&2; exit 7",
            ])
            .env("FARM_VERB_LOG", log.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(7), "{vm}: {}", text(&out));
        assert!(stdout(&out).starts_with("out-"), "{vm}: {}", text(&out));
        assert_eq!(stderr(&out).trim(), "err", "{vm}: {}", text(&out));
    }
    // Several arguments are a command and its arguments, each kept whole.
    let whole = p.ok(&[
        "exec",
        "vleaf_amd64",
        "--",
        "printf",
        "%s|",
        "two words",
        "it's",
    ]);
    assert_eq!(stdout(&whole), "two words|it's|");
    let logged = fs_err::read_to_string(log.path()).unwrap();
    let lines: Vec<serde_json::Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{logged}");
    assert!(
        lines
            .iter()
            .all(|l| l["verb"] == "exec" && l["seconds"].as_f64().unwrap() > 0.0),
        "{logged}"
    );

    // wait --file: a file that appears two seconds later, in the VDE-only L2.
    let mut later = p
        .farm(&["exec", "vleaf_amd64", "--", "sleep 2; touch /tmp/ready"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let waited = p.ok(&[
        "wait",
        "vleaf_amd64",
        "--file",
        "/tmp/ready",
        "--timeout",
        "60",
    ]);
    assert!(
        stderr(&waited).contains("waited vleaf_amd64 for `/tmp/ready` existing"),
        "{}",
        text(&waited)
    );
    assert!(later.wait().unwrap().success());
    // --port and --until, at both levels.
    p.ok(&["wait", "leaf_amd64", "--port", "22", "--timeout", "30"]);
    p.ok(&[
        "wait",
        "hv",
        "--until",
        "test -d /var/lib/farm",
        "--timeout",
        "30",
    ]);

    // --console: a line written to the console, read where the VM runs (this machine for
    // hv, hv for the L2).
    for vm in ["hv", "leaf_amd64"] {
        let mark = format!("farm-console-mark-{vm}");
        p.ok(&["exec", vm, "--", &format!("echo {mark} > /dev/console")]);
        let seen = p.ok(&[
            "wait",
            vm,
            "--console",
            &format!("^{mark}"),
            "--timeout",
            "30",
        ]);
        assert!(
            stderr(&seen).contains("console line matching"),
            "{}",
            text(&seen)
        );
    }
    let unseen = p.run(&[
        "wait",
        "leaf_amd64",
        "--console",
        "^never-written$",
        "--timeout",
        "1",
    ]);
    assert_eq!(unseen.status.code(), Some(1), "{}", text(&unseen));

    // A wait that never ends fails on time, naming the VM and showing its console.
    let never = p.run(&["wait", "hv", "--file", "/nowhere", "--timeout", "2"]);
    assert_eq!(never.status.code(), Some(1), "{}", text(&never));
    let said = stderr(&never);
    assert!(
        said.contains("VM `hv`: no `/nowhere` existing after 2 s")
            && said.contains("serial console")
            && said.contains("hint:"),
        "{said}"
    );
    // A port nobody listens on, in an L2.
    let closed = p.run(&["wait", "leaf_amd64", "--port", "9", "--timeout", "1"]);
    assert_eq!(closed.status.code(), Some(1), "{}", text(&closed));
    assert!(
        stderr(&closed).contains("VM `leaf_amd64`: no port 9 listening after 1 s"),
        "{}",
        text(&closed)
    );

    // cp: a file to the L2 behind two hops and back, and a directory.
    let work = tempfile::tempdir().unwrap();
    let sent = work.path().join("sent.txt");
    fs_err::write(&sent, "farm cp's file\n").unwrap();
    p.ok(&["cp", sent.to_str().unwrap(), "vleaf_amd64:/root/"]);
    let back = work.path().join("back.txt");
    p.ok(&["cp", "vleaf_amd64:/root/sent.txt", back.to_str().unwrap()]);
    assert_eq!(fs_err::read_to_string(&back).unwrap(), "farm cp's file\n");
    let tree = work.path().join("tree");
    fs_err::create_dir_all(tree.join("sub")).unwrap();
    fs_err::write(tree.join("sub/deep"), "deep\n").unwrap();
    p.ok(&["cp", "-r", tree.to_str().unwrap(), "leaf_amd64:/root/tree"]);
    let out = p.ok(&["exec", "leaf_amd64", "--", "cat /root/tree/sub/deep"]);
    assert_eq!(stdout(&out), "deep\n");
    let fetched = work.path().join("fetched");
    p.ok(&[
        "cp",
        "-r",
        "leaf_amd64:/root/tree",
        fetched.to_str().unwrap(),
    ]);
    assert_eq!(
        fs_err::read_to_string(fetched.join("sub/deep")).unwrap(),
        "deep\n"
    );
    // A path that is not there fails naming the VM, and leaves nothing behind.
    let missing = work.path().join("missing");
    let failed = p.run(&["cp", "hv:/nowhere", missing.to_str().unwrap()]);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    assert!(
        stderr(&failed).contains("VM `hv`: cannot copy `/nowhere`"),
        "{}",
        text(&failed)
    );
    assert!(
        crate::support::project::list(work.path())
            .iter()
            .all(|n| !n.starts_with("missing"))
    );

    // Bad input: no VM side, an unknown VM.
    let neither = p.run(&["cp", "a", "b"]);
    assert_eq!(neither.status.code(), Some(2), "{}", text(&neither));
    let unknown = p.run(&["exec", "nope", "--", "true"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));
    assert!(
        stderr(&unknown).contains("`nope` is not a VM"),
        "{}",
        text(&unknown)
    );
    // link: the VDE L2's cable cut, so a wait on it fails on time; plugged back, it answers.
    p.ok(&["link", "vleaf_amd64", "lab", "down"]);
    let cut = p.run(&["wait", "vleaf_amd64", "--until", "true", "--timeout", "3"]);
    assert_eq!(cut.status.code(), Some(1), "{}", text(&cut));
    assert!(
        stderr(&cut).contains("VM `vleaf_amd64`: no `true` succeeding after 3 s"),
        "{}",
        text(&cut)
    );
    p.ok(&["link", "vleaf_amd64", "lab", "up"]);
    p.ok(&["wait", "vleaf_amd64", "--until", "true", "--timeout", "120"]);
    let no_nic = p.run(&["link", "vleaf_amd64", "user", "down"]);
    assert_eq!(no_nic.status.code(), Some(1), "{}", text(&no_nic));
    assert!(
        stderr(&no_nic).contains("`vleaf_amd64` has no NIC on `user`; its NICs: lab"),
        "{}",
        text(&no_nic)
    );

    // link shaping, on the VDE L2's wire: a delay every TCP handshake and banner from hv
    // waits out, then a line that drops everything, then a clean line again.
    let banner_ms = |tries: &str| {
        stdout(&p.ok(&[
            "exec",
            "hv",
            "--",
            &format!(
                "for i in {tries}; do s=$EPOCHREALTIME; if timeout 5 bash -c 'exec 3<>/dev/tcp/10.9.0.21/22; read -r l <&3; echo \"$l\" | grep -q SSH'; then \
                 e=$EPOCHREALTIME; echo $s $e | awk '{{print int(($2-$1)*1000)}}'; else echo none; fi; done"
            ),
        ]))
    };
    let shaped = p.ok(&["link", "vleaf_amd64", "lab", "--delay", "400ms"]);
    assert!(
        stderr(&shaped).contains("shaped vleaf_amd64 on lab: delay 400 ms"),
        "{}",
        text(&shaped)
    );
    let slow = banner_ms("1");
    let slow_ms: u64 = slow.trim().parse().unwrap_or_else(|_| panic!("{slow}"));
    assert!(
        slow_ms >= 1200,
        "400 ms each way, 3 crossings: {slow_ms} ms"
    );
    p.ok(&[
        "link",
        "vleaf_amd64",
        "lab",
        "--delay",
        "0",
        "--loss",
        "100%",
    ]);
    assert_eq!(banner_ms("1").trim(), "none", "every frame dropped");
    p.ok(&["link", "vleaf_amd64", "lab", "--loss", "0", "--rate", "0"]);
    assert_ne!(banner_ms("1").trim(), "none", "a clean line again");
    let not_vde = p.run(&["link", "leaf_amd64", "user", "--delay", "10ms"]);
    assert_eq!(not_vde.status.code(), Some(1), "{}", text(&not_vde));
    assert!(
        stderr(&not_vde).contains("no NIC on a VDE network"),
        "{}",
        text(&not_vde)
    );
    let bad = p.run(&["link", "vleaf_amd64", "lab", "--loss", "150%"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));

    // capture: frames of hv's user NIC (L1) and of the VDE L2's NIC, each while an exec
    // crosses it, in pcaps that tcpdump-style readers take.
    for (vm, network) in [("hv", "user"), ("vleaf_amd64", "lab")] {
        let pcap = work.path().join(format!("{vm}.pcap"));
        p.ok(&["capture", vm, network, pcap.to_str().unwrap()]);
        let twice = p.run(&["capture", vm, network, pcap.to_str().unwrap()]);
        assert_eq!(twice.status.code(), Some(1), "{}", text(&twice));
        assert!(
            stderr(&twice).contains("a capture of it runs already"),
            "{}",
            text(&twice)
        );
        p.ok(&["exec", vm, "--", "echo traffic"]);
        let stopped = p.ok(&["capture", "--stop", vm, network]);
        let said = stderr(&stopped);
        let frames: usize = said
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{said}"));
        assert!(frames > 0, "{said}");
        let bytes = fs_err::read(&pcap).unwrap();
        assert_eq!(
            &bytes[..4],
            &[0xd4, 0xc3, 0xb2, 0xa1],
            "a little-endian pcap"
        );
        assert_eq!(
            u32::from_le_bytes(bytes[20..24].try_into().unwrap()),
            1,
            "Ethernet frames"
        );
    }
    let none = p.run(&["capture", "--stop", "hv", "user"]);
    assert_eq!(none.status.code(), Some(1), "{}", text(&none));
    assert!(
        stderr(&none).contains("no capture of it runs"),
        "{}",
        text(&none)
    );

    // screenshot: L1's and an L2's display, as PNGs with a size.
    for vm in ["hv", "leaf_amd64"] {
        let png = work.path().join(format!("{vm}.png"));
        p.ok(&["screenshot", vm, png.to_str().unwrap()]);
        let bytes = fs_err::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{vm}");
        let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert!(width >= 320 && height >= 200, "{vm}: {width}x{height}");
    }

    // reboot: a new boot of the L2, answering again.
    let boot_id =
        |vm: &str| stdout(&p.ok(&["exec", vm, "--", "cat /proc/sys/kernel/random/boot_id"]));
    let before = boot_id("leaf_amd64");
    let rebooted = p.ok(&["reboot", "leaf_amd64", "--timeout", "120"]);
    assert!(
        stderr(&rebooted).contains("rebooted leaf_amd64"),
        "{}",
        text(&rebooted)
    );
    assert_ne!(boot_id("leaf_amd64"), before);

    // crash: the VDE L2's power cut; a verb then fails naming it, and `up` brings it back.
    p.ok(&["crash", "vleaf_amd64"]);
    let gone = p.run(&["exec", "vleaf_amd64", "--", "true"]);
    assert_eq!(gone.status.code(), Some(1), "{}", text(&gone));
    assert!(
        stderr(&gone).contains("VM `vleaf_amd64` did not answer ssh"),
        "{}",
        text(&gone)
    );
    // Its wire went with it, and came back with it.
    let wires = || {
        stdout(&p.ok(&[
            "exec",
            "hv",
            "--",
            "ps -eo args | grep -c '^[w]irefilter' || true",
        ]))
    };
    assert_eq!(wires().trim(), "0");
    p.ok_with_ansible(&["up"]);
    p.ok(&["exec", "vleaf_amd64", "--", "cat /root/provisioned"]);
    assert_eq!(wires().trim(), "1");
}
