//! What farm learns about a site before it plans, as data, and the one shell script that
//! learns it: the tools and accelerator the site has, which TCP ports are taken, every
//! instance farm keeps there (its record, whether its qemu runs), the processes farm
//! tagged, which store entries the site has and which networks run.
//!
//! One script, one round trip per site: on a hypervisor VM under TCG each command costs a
//! noticeable fraction of a second. The script is built and its output parsed here, purely;
//! `run::observe` runs it through the site's `Host` and adds the ssh checks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::instance::InstanceRecord;
use super::qemu::{KvmFacts, TAG_PROJECT, TAG_WHAT};
use super::values::Arch;

/// What a site has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteFacts {
    pub kvm: KvmFacts,
    pub arch: Option<Arch>,
    /// Programs asked about that are not installed.
    pub missing: Vec<String>,
    /// The user may not create tap devices (neither root nor any capability).
    pub no_tap_rights: bool,
}

/// One instance directory farm found on the site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedInstance {
    /// Its record, or why there is none farm can use (an interrupted create, another
    /// farm's format).
    pub record: Result<InstanceRecord, String>,
    /// The pid of its qemu when it runs (the pidfile's process, checked to be this VM's).
    pub pid: Option<u32>,
    /// Whether it answers ssh; asked only of running instances (`None`: not asked).
    pub answers: Option<bool>,
}

impl ObservedInstance {
    pub fn running(&self) -> bool {
        self.pid.is_some()
    }
}

/// A process carrying this project's tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaggedProcess {
    pub pid: u32,
    /// `vm:NAME` or `net:NAME`.
    pub what: String,
}

/// Which of a network's daemons run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetworkState {
    pub switch: bool,
    pub tap: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteObservation {
    /// farm looked at the site itself (otherwise this is what farm's records say of it,
    /// with nothing running).
    pub reached: bool,
    pub facts: SiteFacts,
    pub listening: BTreeSet<u16>,
    pub instances: BTreeMap<String, ObservedInstance>,
    pub tagged: Vec<TaggedProcess>,
    /// Entries (directory names) of the site's store, among those asked about.
    pub entries: BTreeSet<String>,
    pub networks: BTreeMap<String, NetworkState>,
}

impl SiteObservation {
    /// Tagged qemu processes of `vm` that are not the one its state knows: a copy farm
    /// lost track of (`.farm/` deleted, or an instance directory removed by hand).
    pub fn orphans_of(&self, vm: &str) -> Vec<u32> {
        let known = self.instances.get(vm).and_then(|i| i.pid);
        self.tagged
            .iter()
            .filter(|p| p.what == format!("vm:{vm}") && Some(p.pid) != known)
            .map(|p| p.pid)
            .collect()
    }

    /// Every tagged qemu whose VM farm has no running state for, by VM name.
    pub fn orphans(&self) -> BTreeMap<String, Vec<u32>> {
        let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for p in &self.tagged {
            if let Some(vm) = p.what.strip_prefix("vm:")
                && self.instances.get(vm).and_then(|i| i.pid) != Some(p.pid)
            {
                out.entry(vm.to_string()).or_default().push(p.pid);
            }
        }
        out
    }
}

/// A network's daemons: pidfile and the argument that proves the pid is still it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkProbe {
    pub name: String,
    pub switch: Option<(PathBuf, String)>,
    pub tap: Option<(PathBuf, String)>,
}

/// What to ask a site.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObserveRequest {
    /// farm's state directory on the site (instances in `vms/`).
    pub state_dir: PathBuf,
    /// The project tag (`FARM_PROJECT`) of processes farm started for this project.
    pub project: String,
    /// Programs whose absence must be reported.
    pub tools: Vec<String>,
    /// Whether creating taps is needed (an `attach` on the site).
    pub taps: bool,
    /// The site store's `store/` directory and the entries to look for there.
    pub store: Option<(PathBuf, Vec<String>)>,
    pub networks: Vec<NetworkProbe>,
}

/// Single-quotes a string for a POSIX shell.
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn qp(p: &Path) -> String {
    q(&p.display().to_string())
}

/// A shell test, true when `pidfile` names a live process that has `argument` as one of
/// its command-line arguments (pids are reused, so a live pid alone proves nothing). It
/// leaves the pid in `$pid`.
pub fn alive_test(pidfile: &str, argument: &str) -> String {
    format!(
        "{{ pid=$(cat {pidfile} 2>/dev/null) && [ -n \"$pid\" ] && tr '\\0' '\\n' < /proc/$pid/cmdline 2>/dev/null | grep -qxF {argument}; }}"
    )
}

/// The script; its output is read by [`parse_observation`].
pub fn observe_script(req: &ObserveRequest) -> String {
    let mut s = String::from("cd / 2>/dev/null\n");
    for tool in &req.tools {
        s.push_str(&format!(
            "command -v {t} >/dev/null 2>&1 || echo missing {t}\n",
            t = q(tool)
        ));
    }
    if req.taps {
        s.push_str(
            "[ \"$(id -u)\" = 0 ] || grep -q '^CapEff:.*[1-9a-f]' /proc/self/status || echo no-tap-rights\n",
        );
    }
    s.push_str(
        "[ -r /dev/kvm ] && [ -w /dev/kvm ] && echo kvm-device\n\
         { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; } && echo kvm-hardware\n\
         echo \"arch $(uname -m)\"\n\
         awk '$4 == \"0A\" { print \"listen\", $2 }' /proc/net/tcp /proc/net/tcp6 2>/dev/null\n",
    );
    let vms = req.state_dir.join("vms");
    s.push_str(&format!(
        "for d in {vms}/*/; do [ -d \"$d\" ] || continue; n=$(basename \"$d\"); \
         if {alive}; then echo \"vm $n $pid\"; else echo \"vm $n -\"; fi; \
         if [ -f \"$d/instance.json\" ]; then printf 'record %s ' \"$n\"; tr -d '\\n' < \"$d/instance.json\"; echo; fi; done\n",
        vms = qp(&vms),
        alive = alive_test("\"$d/qemu.pid\"", "\"$n,process=farm-$n\""),
    ));
    s.push_str(&format!(
        "for e in $(grep -lzxF {tag} /proc/[0-9]*/environ 2>/dev/null); do p=${{e#/proc/}}; \
         w=$(tr '\\0' '\\n' < \"$e\" 2>/dev/null | sed -n 's/^{what}=//p'); \
         [ -n \"$w\" ] && echo \"tagged ${{p%/environ}} $w\"; done\n",
        tag = q(&format!("{TAG_PROJECT}={}", req.project)),
        what = TAG_WHAT,
    ));
    if let Some((dir, names)) = &req.store
        && !names.is_empty()
    {
        let metas: Vec<String> = names.iter().map(|n| q(n)).collect();
        s.push_str(&format!(
            "for e in {}; do [ -e {}/\"$e\"/meta.json ] && echo \"entry $e\"; done\n",
            metas.join(" "),
            qp(dir)
        ));
    }
    for network in &req.networks {
        for (kind, probe) in [("switch", &network.switch), ("tap", &network.tap)] {
            if let Some((pidfile, mark)) = probe {
                s.push_str(&format!(
                    "{} && echo net {} {kind}\n",
                    alive_test(&qp(pidfile), &q(mark)),
                    q(&network.name)
                ));
            }
        }
    }
    s.push_str("true\n");
    s
}

/// The little-endian hex port of a `/proc/net/tcp` local address (`0100007F:089A`).
fn hex_port(address: &str) -> Option<u16> {
    u16::from_str_radix(address.rsplit(':').next()?, 16).ok()
}

pub fn parse_observation(text: &str) -> SiteObservation {
    let mut obs = SiteObservation::default();
    for line in text.lines() {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "missing" => obs.facts.missing.push(rest.to_string()),
            "no-tap-rights" => obs.facts.no_tap_rights = true,
            "kvm-device" => obs.facts.kvm.device_usable = true,
            "kvm-hardware" => obs.facts.kvm.hardware_module = true,
            "arch" => {
                obs.facts.arch = match rest {
                    "x86_64" => Some(Arch::X86_64),
                    "aarch64" => Some(Arch::Aarch64),
                    _ => None,
                }
            }
            "listen" => obs.listening.extend(hex_port(rest)),
            "vm" => {
                if let Some((name, pid)) = rest.split_once(' ') {
                    obs.instances.insert(
                        name.to_string(),
                        ObservedInstance {
                            record: Err("it has no instance record".into()),
                            pid: pid.parse().ok(),
                            answers: None,
                        },
                    );
                }
            }
            "record" => {
                if let Some((name, json)) = rest.split_once(' ')
                    && let Some(instance) = obs.instances.get_mut(name)
                {
                    instance.record = InstanceRecord::parse(json.as_bytes());
                }
            }
            "tagged" => {
                if let Some((pid, what)) = rest.split_once(' ')
                    && let Ok(pid) = pid.parse()
                {
                    obs.tagged.push(TaggedProcess {
                        pid,
                        what: what.to_string(),
                    });
                }
            }
            "entry" => {
                obs.entries.insert(rest.to_string());
            }
            "net" => {
                if let Some((name, kind)) = rest.rsplit_once(' ') {
                    let state = obs.networks.entry(name.to_string()).or_default();
                    match kind {
                        "switch" => state.switch = true,
                        "tap" => state.tap = true,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    obs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::instance::InstanceRecord;

    #[test]
    fn the_script_asks_for_what_the_request_names() {
        let req = ObserveRequest {
            state_dir: "/var/lib/farm/state".into(),
            project: "/p/.farm".into(),
            tools: vec!["qemu-img".into()],
            taps: true,
            store: Some(("/var/lib/farm/cache/store".into(), vec!["k-a".into()])),
            networks: vec![NetworkProbe {
                name: "lab".into(),
                switch: Some(("/s/networks/lab/switch.pid".into(), "/s/ctl".into())),
                tap: None,
            }],
        };
        let script = observe_script(&req);
        assert!(script.contains("command -v 'qemu-img'"));
        assert!(script.contains("no-tap-rights"));
        assert!(script.contains("for d in '/var/lib/farm/state/vms'/*/"));
        assert!(script.contains("grep -lzxF 'FARM_PROJECT=/p/.farm'"));
        assert!(script.contains("[ -e '/var/lib/farm/cache/store'/\"$e\"/meta.json ]"));
        assert!(script.contains("echo net 'lab' switch"));
        assert!(!script.contains("tap\n"));
    }

    #[test]
    fn output_is_parsed_into_facts_instances_and_processes() {
        let record = InstanceRecord::new(crate::model::instance::tests::spec());
        let text = format!(
            "missing b3sum\nkvm-device\narch x86_64\nlisten 0100007F:089A\nlisten 00000000:0016\n\
             vm web 4242\nrecord web {}\nvm half -\nvm old -\nrecord old {{\"name\":\"old\"}}\n\
             tagged 4242 vm:web\ntagged 99 vm:web\ntagged 100 vm:ghost\ntagged 7 net:lab\n\
             entry k-a\nnet lab switch\n",
            String::from_utf8(record.to_json()).unwrap()
        );
        let obs = parse_observation(&text);
        assert_eq!(obs.facts.missing, ["b3sum"]);
        assert!(obs.facts.kvm.device_usable && !obs.facts.kvm.hardware_module);
        assert_eq!(obs.facts.arch, Some(Arch::X86_64));
        assert_eq!(obs.listening, BTreeSet::from([2202, 22]));
        assert_eq!(obs.instances["web"].pid, Some(4242));
        assert_eq!(obs.instances["web"].record.as_ref().unwrap(), &record);
        assert_eq!(
            obs.instances["half"].record,
            Err("it has no instance record".into())
        );
        assert!(!obs.instances["half"].running());
        assert_eq!(
            obs.instances["old"].record,
            Err("written by an older farm".into())
        );
        assert_eq!(obs.orphans_of("web"), [99]);
        assert_eq!(
            obs.orphans(),
            BTreeMap::from([
                ("ghost".to_string(), vec![100]),
                ("web".to_string(), vec![99])
            ])
        );
        assert!(obs.entries.contains("k-a"));
        assert_eq!(
            obs.networks["lab"],
            NetworkState {
                switch: true,
                tap: false
            }
        );
    }
}
