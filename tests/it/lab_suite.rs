//! `farm test` on the tiny-L2 lab: a suite of seven tests, each from the lab's saved
//! snapshot, that between them call every verb at L1 (`hv`) and at L2 (`leaf_amd64` on
//! hv's user network, `vleaf_amd64` only on the VDE network). One breaks the lab and fails
//! on purpose: its JUnit entry (read by junitparser, from PyPI) says so, its failed lab
//! restores with the break at both levels, and its consoles and pcaps are kept.

use std::collections::BTreeSet;
use std::process::Command;

use crate::recovery::tiny_lab;
use crate::support::lab::{BASE, restored};
use crate::support::project::{ANSIBLE_BIN, stderr, stdout, text};

/// Each test starts from the lab's snapshot (`base`, as every test of this lab does).
fn suite_toml() -> String {
    [
        "waits",
        "copies",
        "lines",
        "evidence",
        "reboots",
        "crashes",
        "breaks_on_purpose",
    ]
    .iter()
    .map(|t| format!("\n[tests.{t}]\nscript = \"suite/{t}.sh\"\nstart = \"{BASE}\"\n"))
    .collect()
}

/// Every kind of wait, at both levels.
const WAITS: &str = r#"set -e
farm wait hv --unit ssh.service --timeout 60
farm wait hv --port 22 --timeout 30
farm wait leaf_amd64 --port 22 --timeout 30
farm exec hv -- 'sleep 1; touch /tmp/l1-ready' &
farm wait hv --file /tmp/l1-ready --timeout 30
wait
farm exec vleaf_amd64 -- 'touch /tmp/l2-ready'
farm wait vleaf_amd64 --file /tmp/l2-ready --timeout 30
farm wait vleaf_amd64 --until 'test -e /root/provisioned' --timeout 30
farm wait hv --until 'virsh -c qemu:///system list --name | grep -qx vleaf_amd64' --timeout 30
farm exec hv -- 'echo suite-mark-l1 > /dev/console'
farm wait hv --console '^suite-mark-l1' --timeout 30
farm exec leaf_amd64 -- 'echo suite-mark-l2 > /dev/console'
farm wait leaf_amd64 --console '^suite-mark-l2' --timeout 30
"#;

/// Files and a tree both ways, at both levels.
const COPIES: &str = r#"set -e
d=$(mktemp -d)
echo "to L1" > "$d/a.txt"
farm cp "$d/a.txt" hv:/root/a.txt
farm cp hv:/root/a.txt "$d/a.back"
grep -qx "to L1" "$d/a.back"
mkdir -p "$d/tree/sub"; echo deep > "$d/tree/sub/f"
farm cp -r "$d/tree" vleaf_amd64:/root/tree
farm exec vleaf_amd64 -- 'cat /root/tree/sub/f' | grep -qx deep
farm cp -r vleaf_amd64:/root/tree "$d/tree.back"
grep -qx deep "$d/tree.back/sub/f"
farm cp leaf_amd64:/root/provisioned "$d/provisioned"
grep -q "leaf_amd64 at level 2 on hv" "$d/provisioned"
rm -rf "$d"
"#;

/// Cables cut at both levels, and the VDE L2's line shaped, as hv sees it.
const LINES: &str = r#"set -e
reach='timeout 5 bash -c "exec 3<>/dev/tcp/10.9.0.21/22; read -r l <&3; echo \$l" | grep -q SSH'
farm link vleaf_amd64 lab down
if farm exec hv -- "$reach"; then echo "reached through a cut cable"; exit 1; fi
farm link vleaf_amd64 lab up
farm wait hv --until "$reach" --timeout 60
farm link vleaf_amd64 lab --delay 300ms
ms=$(farm exec hv -- 's=$EPOCHREALTIME; exec 3<>/dev/tcp/10.9.0.21/22; read -r l <&3; e=$EPOCHREALTIME; echo $s $e | awk "{print int((\$2-\$1)*1000)}"')
echo "handshake and banner through a 300 ms line: $ms ms"
[ "$ms" -ge 900 ]
farm link vleaf_amd64 lab --delay 0 --loss 100%
if farm exec hv -- "$reach"; then echo "reached through a line that drops everything"; exit 1; fi
farm link vleaf_amd64 lab --loss 0 --rate 10mbit
farm wait hv --until "$reach" --timeout 60
farm link hv user down
if farm wait hv --until true --timeout 3; then echo "hv answered with its cable cut"; exit 1; fi
farm link hv user up
farm wait hv --until true --timeout 120
"#;

/// Captures and screenshots at both levels; one capture is left for farm test to stop.
const EVIDENCE: &str = r#"set -e
d="$FARM_TEST_RESULTS"
farm capture hv user "$d/hv.pcap"
farm capture vleaf_amd64 lab "$d/vleaf.pcap"
farm exec vleaf_amd64 -- true
farm capture --stop hv user
farm capture --stop vleaf_amd64 lab
test -s "$d/hv.pcap" && test -s "$d/vleaf.pcap"
farm capture leaf_amd64 user "$d/leaf.pcap" --for 3s
farm screenshot hv "$d/hv.png"
farm screenshot leaf_amd64 "$d/leaf.png"
farm capture vleaf_amd64 lab "$d/left-running.pcap"
farm exec vleaf_amd64 -- true
"#;

/// Reboots at both levels, each into a new boot. hv's L2s go first: a tiny L2 has no
/// ACPI daemon, and hv's libvirt-guests would wait five minutes for it to power off.
const REBOOTS: &str = r#"set -e
b=$(farm exec leaf_amd64 -- cat /proc/sys/kernel/random/boot_id)
farm reboot leaf_amd64 --timeout 180
[ "$(farm exec leaf_amd64 -- cat /proc/sys/kernel/random/boot_id)" != "$b" ]
farm exec hv -- 'for vm in $(virsh -c qemu:///system list --name); do virsh -c qemu:///system destroy "$vm"; done'
b=$(farm exec hv -- cat /proc/sys/kernel/random/boot_id)
farm reboot hv --timeout 300
[ "$(farm exec hv -- cat /proc/sys/kernel/random/boot_id)" != "$b" ]
"#;

/// An L2 crashed and brought back by `up`; then L1 crashed, its L2s with it.
const CRASHES: &str = r#"set -e
farm crash vleaf_amd64
if farm exec vleaf_amd64 -- true 2> crash.err; then echo "a crashed VM answered"; exit 1; fi
grep -q 'VM `vleaf_amd64` did not answer ssh' crash.err
farm up
farm exec vleaf_amd64 -- cat /root/provisioned
farm crash hv
if farm exec leaf_amd64 -- true; then echo "an L2 outlived its hypervisor"; exit 1; fi
"#;

/// Breaks both levels, leaves a capture running, and fails.
const BREAKS: &str = r#"farm exec hv -- 'echo broken-l1 > /root/broken && sync && echo suite-breaking > /dev/console'
farm exec vleaf_amd64 -- 'echo broken-l2 > /root/broken && sync'
farm capture vleaf_amd64 lab "$FARM_TEST_RESULTS/breaking.pcap"
farm exec vleaf_amd64 -- true
echo "breaking on purpose"
exit 4
"#;

#[test]
fn a_suite_calls_every_verb_at_both_levels_each_test_from_the_snapshot() {
    let Some(lab) = restored("lab_suite", &tiny_lab()) else {
        return;
    };
    let p = &lab.project;
    // Failed labs an earlier run of this test kept in the kept lab.
    for old in stdout(&p.ok(&["snapshot", "ls"]))
        .split_whitespace()
        .filter(|w| w.starts_with("failed-"))
    {
        p.ok(&["snapshot", "rm", old]);
    }
    let toml = fs_err::read_to_string(p.path().join("farm.toml")).unwrap();
    p.write("farm.toml", &format!("{toml}{}", suite_toml()));
    for (name, script) in [
        ("waits", WAITS),
        ("copies", COPIES),
        ("lines", LINES),
        ("evidence", EVIDENCE),
        ("reboots", REBOOTS),
        ("crashes", CRASHES),
        ("breaks_on_purpose", BREAKS),
    ] {
        p.write(&format!("suite/{name}.sh"), script);
    }
    let junit = p.path().join("suite.xml");
    let out = p
        .farm_with_ansible(&["test", "--junit", junit.to_str().unwrap()])
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        stdout(&out).contains("7 test(s): 6 passed, 1 failed"),
        "{said}"
    );
    let log = stderr(&out);
    // Each from the snapshot: seven restores, none from the lab the test before left.
    assert_eq!(
        log.matches(&format!("restored snapshot {BASE}:")).count(),
        7,
        "{said}"
    );
    assert!(
        log.contains("lines | handshake and banner through a 300 ms line"),
        "{said}"
    );

    // Between them, every verb at L1 and at L2 (from the verbs' own log, per test).
    let results = p.path().join(".farm/test-results");
    let mut used = BTreeSet::new();
    for entry in fs_err::read_dir(&results).unwrap() {
        let verbs = entry.unwrap().path().join("verbs.jsonl");
        for line in fs_err::read_to_string(&verbs).unwrap_or_default().lines() {
            let step: serde_json::Value = serde_json::from_str(line).unwrap();
            let level = if step["vm"] == "hv" { "L1" } else { "L2" };
            used.insert(format!("{} {level}", step["verb"].as_str().unwrap()));
        }
    }
    for verb in [
        "exec",
        "wait",
        "cp",
        "link",
        "capture",
        "screenshot",
        "crash",
        "reboot",
    ] {
        for level in ["L1", "L2"] {
            assert!(
                used.contains(&format!("{verb} {level}")),
                "{verb} at {level}: {used:?}"
            );
        }
    }

    // Evidence: pcaps with frames, PNGs, and the capture left running stopped by farm test.
    let evidence = results.join("evidence");
    for name in ["hv.pcap", "vleaf.pcap", "left-running.pcap"] {
        let pcap = fs_err::read(evidence.join(name)).unwrap();
        assert!(pcap.len() > 24 + 16, "{name}: {} bytes", pcap.len());
    }
    // A capture `--for` a while: a whole pcap, frames or none (nothing need cross then).
    let timed = fs_err::read(evidence.join("leaf.pcap")).unwrap();
    assert_eq!(&timed[..4], &[0xd4, 0xc3, 0xb2, 0xa1], "a pcap");
    for name in ["hv.png", "leaf.png"] {
        assert!(
            fs_err::read(evidence.join(name))
                .unwrap()
                .starts_with(b"\x89PNG")
        );
    }
    assert!(
        log.contains("captured") && log.contains("(left running by the test)"),
        "{said}"
    );

    // The JUnit report, as a consumer reads it.
    let read = Command::new(format!("{ANSIBLE_BIN}/python"))
        .arg("-c")
        .arg(
            r#"
import sys
from junitparser import JUnitXml
xml = JUnitXml.fromfile(sys.argv[1])
for suite in xml:
    print("suite", suite.tests, suite.failures)
    for case in suite:
        kinds = [type(r).__name__ + ":" + (r.message or "") for r in case.result]
        print(case.name, case.time > 0, kinds)
"#,
        )
        .arg(&junit)
        .output()
        .unwrap();
    let cases = stdout(&read);
    assert!(read.status.success(), "{}", text(&read));
    assert!(cases.contains("suite 7 1"), "{cases}");
    for passed in ["waits", "copies", "lines", "evidence", "reboots", "crashes"] {
        assert!(cases.contains(&format!("{passed} True []")), "{cases}");
    }
    assert!(
        cases.contains(
            "breaks_on_purpose True ['Failure:failed (exit 4); the failed lab is saved: `farm snapshot restore failed-breaks_on_purpose-"
        ),
        "{cases}"
    );

    // The failed test's results: output, every VM's console, its capture.
    let broke = results.join("breaks_on_purpose");
    assert!(
        fs_err::read_to_string(broke.join("output.log"))
            .unwrap()
            .contains("breaking on purpose")
    );
    let hv_console = fs_err::read_to_string(broke.join("consoles/hv.log")).unwrap();
    assert!(hv_console.contains("suite-breaking"), "{hv_console}");
    for vm in ["leaf_amd64", "vleaf_amd64"] {
        let console = fs_err::read_to_string(broke.join(format!("consoles/{vm}.log"))).unwrap();
        assert!(console.contains("farm-seed"), "{vm}: {console}");
    }
    assert!(broke.join("breaking.pcap").is_file());
    assert!(broke.join("pcaps/vleaf_amd64-lab-1.pcap").is_file());

    // Its failed lab restores in the failed state, at both levels.
    let failed = log
        .split('`')
        .find_map(|said| said.strip_prefix("farm snapshot restore failed-breaks_on_purpose-"))
        .map(|time| format!("failed-breaks_on_purpose-{time}"))
        .unwrap_or_else(|| panic!("{said}"));
    p.ok(&["snapshot", "restore", &failed]);
    for (vm, mark) in [("hv", "broken-l1"), ("vleaf_amd64", "broken-l2")] {
        let broken = p.ok(&["exec", vm, "--", "cat /root/broken"]);
        assert_eq!(stdout(&broken).trim(), mark);
    }
    p.ok(&["down", "--timeout", "0"]);
    p.ok(&["snapshot", "rm", &failed]);
}

/// The lab's snapshot and every layer under it, pushed to a binary cache, come back into an
/// empty store by the snapshot's name alone (`farm store pull URL base`), and the lab
/// restores from them, L2s inside L1 and all, as a fresh CI runner would start it.
#[test]
fn a_snapshot_pushed_to_a_cache_restores_from_an_empty_store() {
    let Some(lab) = restored("lab_suite_cache", &tiny_lab()) else {
        return;
    };
    let p = &lab.project;
    let keys = tempfile::tempdir().unwrap();
    let made = p.ok(&[
        "store",
        "keygen",
        "ci",
        "--dir",
        keys.path().to_str().unwrap(),
    ]);
    let trust_line = stdout(&made).trim().to_string();
    let toml = fs_err::read_to_string(p.path().join("farm.toml")).unwrap();
    p.write("farm.toml", &format!("{trust_line}\n{toml}"));
    let cache = tempfile::tempdir().unwrap();
    let url = format!("file://{}", cache.path().display());
    let secret = keys.path().join("ci.secret");
    let pushed = p.ok(&[
        "store",
        "push",
        &url,
        BASE,
        "--key",
        secret.to_str().unwrap(),
    ]);
    assert!(
        stderr(&pushed).contains(&format!("pushed snapshot {BASE}")),
        "{}",
        text(&pushed)
    );
    assert!(
        cache
            .path()
            .join(format!("snapshots/{BASE}.json"))
            .is_file()
    );

    // A fresh runner: an empty store, and no state directory (this lab's own is put aside,
    // and back at the end, for the tests after this one).
    p.ok(&["down", "--timeout", "0"]);
    let state = p.path().join(".farm");
    let kept = p.path().join(".farm.kept");
    fs_err::rename(&state, &kept).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let on_runner = |args: &[&str]| {
        p.farm_with_ansible(args)
            .env("FARM_STORE", empty.path())
            .output()
            .unwrap()
    };
    let pulled = on_runner(&["store", "pull", &url, BASE]);
    assert!(pulled.status.success(), "{}", text(&pulled));
    assert!(
        stderr(&pulled).contains(&format!("pulled snapshot {BASE}")),
        "{}",
        text(&pulled)
    );
    let restored = on_runner(&["snapshot", "restore", BASE]);
    assert!(restored.status.success(), "{}", text(&restored));
    let said = on_runner(&["exec", "vleaf_amd64", "--", "cat /root/provisioned"]);
    assert!(
        stdout(&said).contains("vleaf_amd64 at level 2 on hv"),
        "{}",
        text(&said)
    );
    // The L2s' layers came too: `up` finds the lab as farm.toml says.
    let up = on_runner(&["up"]);
    assert!(up.status.success(), "{}", text(&up));
    assert!(
        !stderr(&up).contains("starting") && !stderr(&up).contains("restarting"),
        "{}",
        text(&up)
    );
    // A name the cache does not have is refused, naming it.
    let missing = on_runner(&["store", "pull", &url, "nope"]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    assert!(
        stderr(&missing).contains("no snapshot `nope` is in"),
        "{}",
        text(&missing)
    );
    let _ = on_runner(&["down", "--timeout", "0"]);
    fs_err::remove_dir_all(&state).unwrap();
    fs_err::rename(&kept, &state).unwrap();
}
