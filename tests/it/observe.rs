//! The observation script run by a real shell on this machine: a process standing in for
//! an instance's qemu (its pidfile, its `-name` argument, farm's tag in its environment), a
//! tagged process farm lost track of, a record, a store entry and a listening port.

use std::path::Path;
use std::process::{Child, Command};

use farm::model::lab::instance::InstanceRecord;
use farm::model::lab::observation::{ObserveRequest, observe_script, parse_observation};
use farm::run::host::{Host, LocalHost};

/// A process whose command line and environment look like farm's qemu for `vm` (a shell
/// waiting on `read`, a built-in: no child inherits the tag).
fn fake_qemu(project: &str, vm: &str) -> Child {
    Command::new("sh")
        .args(["-c", "read x", &farm::model::build::qemu::qemu_name(vm)])
        .stdin(std::process::Stdio::piped())
        .env("FARM_PROJECT", project)
        .env("FARM_PROCESS", format!("vm:{vm}"))
        .spawn()
        .unwrap()
}

fn write(path: &Path, text: &str) {
    fs_err::create_dir_all(path.parent().unwrap()).unwrap();
    fs_err::write(path, text).unwrap();
}

#[test]
fn the_script_sees_instances_orphans_entries_and_ports() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let project = dir.path().join(".farm").display().to_string();
    let mut web = fake_qemu(&project, "web");
    let mut lost = fake_qemu(&project, "lost");
    let mut other_project = fake_qemu("/elsewhere/.farm", "web");
    write(&state.join("vms/web/qemu.pid"), &format!("{}\n", web.id()));
    write(&state.join("vms/web/instance.json"), "{\"format\":2}");
    // A stale pidfile pointing at a process that is another VM's.
    write(
        &state.join("vms/stale/qemu.pid"),
        &format!("{}\n", lost.id()),
    );
    write(&dir.path().join("store/k-a/meta.json"), "{}");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    let request = ObserveRequest {
        state_dir: state.clone(),
        project: project.clone(),
        tools: vec!["sh".into(), "no-such-tool-farm".into()],
        taps: false,
        store: Some((dir.path().join("store"), vec!["k-a".into(), "k-b".into()])),
        networks: Vec::new(),
    };
    let host = LocalHost {
        name: "here".into(),
    };
    let out = host.run(&observe_script(&request)).unwrap();
    assert!(out.success(), "{}", out.text());
    let obs = parse_observation(&String::from_utf8_lossy(&out.stdout), &project);
    assert_eq!(obs.facts.missing, ["no-such-tool-farm"]);
    assert!(obs.facts.arch.is_some());
    assert!(obs.listening.contains(&port));
    assert_eq!(obs.instances["web"].pid, Some(web.id()));
    assert_eq!(
        obs.instances["web"].record,
        InstanceRecord::parse(b"{\"format\":2}")
    );
    assert_eq!(
        obs.instances["stale"].pid, None,
        "a pid alone proves nothing"
    );
    assert_eq!(obs.orphans_of("web"), Vec::<u32>::new());
    assert_eq!(obs.orphans_of("lost"), [lost.id()]);
    assert!(
        obs.tagged.iter().all(|p| p.pid != other_project.id()),
        "other projects' processes are not this project's"
    );
    assert_eq!(obs.entries.iter().collect::<Vec<_>>(), ["k-a"]);
    for child in [&mut web, &mut lost, &mut other_project] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
