//! What farm learns about a site before it plans, as data, and the one shell script that
//! learns it: the tools and accelerator the site has, which TCP ports are taken, every
//! instance farm keeps there (its record, whether its qemu runs), the processes farm
//! tagged, which store entries the site has and which networks run.
//!
//! One script, one round trip per site: on a hypervisor VM under TCG each command costs a
//! noticeable fraction of a second. The script is built and its output parsed here, purely;
//! `run::observe` runs it through the site's `Host` and adds the ssh checks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::model::build::qemu::{KvmFacts, TAG_PROJECT, TAG_WHAT};
use crate::model::config::limits::is_vm_name;
use crate::model::lab::instance::InstanceRecord;
use crate::model::shell::{quote_path, shell_quote};
use crate::model::values::Arch;

/// What a site has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteFacts {
    pub kvm: KvmFacts,
    pub arch: Option<Arch>,
    /// Programs asked about that are not installed.
    pub missing: Vec<String>,
    /// The user may not create tap devices (neither root nor any capability).
    pub no_tap_rights: bool,
    /// `zstd` is installed: store entries pushed to the site travel compressed.
    pub zstd: bool,
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

    /// Whether the directory holds only the copy of the record of a VM that runs on another
    /// site (`farm up` keeps one on this machine for `status`, `ssh` and `logs`), not an
    /// instance of the site observed, whose state directory is `site_state`.
    pub fn is_copy_from_elsewhere(&self, site_state: &std::path::Path, name: &str) -> bool {
        self.record.as_ref().is_ok_and(|record| {
            record.spec.paths.dir
                != crate::model::lab::instance::InstancePaths::new(site_state, name).dir
        })
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

    /// The site's entry for `wanted` (`<key>-<name>`): that one, or one with the same key
    /// under another name (the same derivation, pushed for another platform of the same
    /// recipe).
    pub fn entry_for(&self, wanted: &str) -> Option<&str> {
        if let Some(exact) = self.entries.get(wanted) {
            return Some(exact);
        }
        let key = wanted.split('-').next()?;
        self.entries
            .iter()
            .find(|e| e.split('-').next() == Some(key))
            .map(String::as_str)
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

/// A network's daemons on a site: their pidfiles (a daemon runs when its pid carries the
/// project's `net:NAME:switch` or `net:NAME:tap` tag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkProbe {
    pub name: String,
    pub switch: Option<PathBuf>,
    pub tap: Option<PathBuf>,
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

/// A shell test, true when `pidfile` names a live process that has `argument` as one of
/// its command-line arguments (pids are reused, so a live pid alone proves nothing). It
/// leaves the pid in `$pid`. Built-ins and one `grep`: under TCG every process costs.
pub fn alive_test(pidfile: &str, argument: &str) -> String {
    format!(
        "{{ pid=; read -r pid 2>/dev/null < {pidfile}; [ -n \"$pid\" ] && grep -qzxF {argument} /proc/$pid/cmdline 2>/dev/null; }}"
    )
}

/// The script; its output is read by [`parse_observation`]. It starts few processes: on a
/// hypervisor VM under TCG each costs tens of milliseconds.
pub fn observe_script(req: &ObserveRequest) -> String {
    let mut s = String::from("cd / 2>/dev/null\n");
    for tool in &req.tools {
        s.push_str(&format!(
            "command -v {t} >/dev/null 2>&1 || echo missing {t}\n",
            t = shell_quote(tool)
        ));
    }
    if req.taps {
        s.push_str(
            "[ \"$(id -u)\" = 0 ] || grep -q '^CapEff:.*[1-9a-f]' /proc/self/status || echo no-tap-rights\n",
        );
    }
    s.push_str(
        "command -v zstd >/dev/null 2>&1 && echo zstd\n\
         [ -r /dev/kvm ] && [ -w /dev/kvm ] && echo kvm-device\n\
         { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; } && echo kvm-hardware\n\
         a=; read -r a 2>/dev/null < /proc/sys/kernel/arch || a=$(uname -m); echo \"arch $a\"\n\
         for t in /proc/net/tcp /proc/net/tcp6; do [ -r $t ] && while read -r sl local rem st rest; do \
         [ \"$st\" = 0A ] && echo \"listen $local\"; done < $t; done\n",
    );
    let vms = req.state_dir.join("vms");
    // A pidfile alone proves nothing (pids are reused): the pid must also be one of the
    // processes carrying this project's tag for this VM, from the one scan below.
    s.push_str(&format!(
        "for d in {vms}/*/; do [ -d \"$d\" ] || continue; d=${{d%/}}; n=${{d##*/}}; \
         p=-; read -r p 2>/dev/null < \"$d/qemu.pid\"; echo \"vm $n ${{p:--}}\"; \
         if [ -f \"$d/instance.json\" ]; then r=; IFS= read -r r < \"$d/instance.json\"; printf 'record %s %s\\n' \"$n\" \"$r\"; fi; done\n",
        vms = quote_path(&vms),
    ));
    // Every process's tag, NUL-terminated (read as lines by the parser): one process for
    // all of them.
    s.push_str(&format!(
        "grep -azH -e '^{TAG_PROJECT}=' -e '^{TAG_WHAT}=' /proc/[0-9]*/environ 2>/dev/null\necho\n"
    ));
    if let Some((dir, names)) = &req.store
        && !names.is_empty()
    {
        let metas: Vec<String> = names.iter().map(|n| shell_quote(n)).collect();
        // An entry may be there under another name for the same derivation (`<key>-*`:
        // it was pushed for another platform of the same recipe); that one is reported.
        s.push_str(&format!(
            "for e in {}; do if [ -e {dir}/\"$e\"/meta.json ]; then echo \"entry $e\"; \
             else for m in {dir}/\"${{e%%-*}}\"-*/meta.json; do [ -e \"$m\" ] || continue; \
             m=${{m%/meta.json}}; echo \"entry ${{m##*/}}\"; break; done; fi; done\n",
            metas.join(" "),
            dir = quote_path(dir)
        ));
    }
    for network in &req.networks {
        for (kind, pidfile) in [("switch", &network.switch), ("tap", &network.tap)] {
            if let Some(pidfile) = pidfile {
                s.push_str(&format!(
                    "p=-; read -r p 2>/dev/null < {}; echo \"netpid {} {kind} ${{p:--}}\"\n",
                    quote_path(pidfile),
                    network.name
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

/// Reads the script's output for the project tagged `project`.
pub fn parse_observation(text: &str, project: &str) -> SiteObservation {
    let mut obs = SiteObservation::default();
    // pid → (project, what) from the environment scan.
    let mut tags: BTreeMap<u32, (Option<String>, Option<String>)> = BTreeMap::new();
    let mut pidfiles: Vec<(String, Option<u32>)> = Vec::new();
    let mut network_pids: Vec<(String, String, Option<u32>)> = Vec::new();
    for line in text.split(['\n', '\0']) {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            // What the site prints is its root's to choose: a name that is not one farm
            // could have asked about or written is dropped, never used in a path, a
            // command or a hint.
            "missing" if is_program_name(rest) => obs.facts.missing.push(rest.to_string()),
            "no-tap-rights" => obs.facts.no_tap_rights = true,
            "zstd" => obs.facts.zstd = true,
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
                if let Some((name, pid)) = rest.split_once(' ')
                    && is_vm_name(name)
                {
                    pidfiles.push((name.to_string(), pid.trim().parse().ok()));
                    obs.instances.insert(
                        name.to_string(),
                        ObservedInstance {
                            record: Err("it has no instance record".into()),
                            pid: None,
                            answers: None,
                        },
                    );
                }
            }
            "record" => {
                if let Some((name, json)) = rest.split_once(' ')
                    && let Some(instance) = obs.instances.get_mut(name)
                {
                    // A record is of the VM whose directory holds it: one that names another
                    // VM or directory (a copy moved by hand, or a site's root steering
                    // farm's stop and removal elsewhere) is not used.
                    instance.record = InstanceRecord::parse(json.as_bytes()).and_then(|r| {
                        let own_dir = r.spec.paths.dir.file_name() == Some(name.as_ref());
                        if r.spec.name == name && own_dir {
                            Ok(r)
                        } else {
                            Err("its record names another VM or directory".to_string())
                        }
                    });
                }
            }
            "entry" if is_entry_name(rest) => {
                obs.entries.insert(rest.to_string());
            }
            "netpid" => {
                let mut parts = rest.splitn(3, ' ');
                if let (Some(name), Some(kind), Some(pid)) =
                    (parts.next(), parts.next(), parts.next())
                    && is_vm_name(name)
                {
                    network_pids.push((
                        name.to_string(),
                        kind.to_string(),
                        pid.trim().parse().ok(),
                    ));
                }
            }
            // `grep -H` of a process's environment: `/proc/PID/environ:NAME=VALUE`.
            _ if word.starts_with("/proc/") => {
                let Some((pid, var)) = line
                    .strip_prefix("/proc/")
                    .and_then(|l| l.split_once("/environ:"))
                else {
                    continue;
                };
                let Ok(pid) = pid.parse::<u32>() else {
                    continue;
                };
                let entry = tags.entry(pid).or_default();
                if let Some(value) = var
                    .strip_prefix(TAG_PROJECT)
                    .and_then(|v| v.strip_prefix('='))
                {
                    entry.0 = Some(value.to_string());
                } else if let Some(value) =
                    var.strip_prefix(TAG_WHAT).and_then(|v| v.strip_prefix('='))
                {
                    entry.1 = Some(value.to_string());
                }
            }
            _ => {}
        }
    }
    obs.tagged = tags
        .into_iter()
        .filter_map(|(pid, (p, what))| {
            (p.as_deref() == Some(project)).then_some(TaggedProcess { pid, what: what? })
        })
        .collect();
    let tagged_as = |pid: Option<u32>, what: String| {
        pid.filter(|pid| obs.tagged.iter().any(|t| t.pid == *pid && t.what == what))
    };
    for (name, pid) in pidfiles {
        let alive = tagged_as(pid, format!("vm:{name}"));
        if let Some(instance) = obs.instances.get_mut(&name) {
            instance.pid = alive;
        }
    }
    for (name, kind, pid) in network_pids {
        let alive = tagged_as(pid, format!("net:{name}:{kind}")).is_some();
        let state = obs.networks.entry(name).or_default();
        match kind.as_str() {
            "switch" => state.switch = alive,
            "tap" => state.tap = alive,
            _ => {}
        }
    }
    obs
}

/// A program's name as farm asks a site for it (`qemu-system-x86_64`, `b3sum`).
fn is_program_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
}

/// A store entry's directory name (`<key>-<name>`): no `/`, not hidden.
fn is_entry_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lab::instance::InstanceRecord;

    #[test]
    fn names_no_farm_could_have_written_are_dropped() {
        let obs = parse_observation(
            "missing $(touch /tmp/x)\nmissing b3sum\nvm ../../etc 1\nvm a;b 2\nvm web 3\n\
             entry ../../etc\nentry k-a\nnetpid ../x tap 4\n",
            "/p/.farm",
        );
        assert_eq!(obs.facts.missing, ["b3sum"]);
        assert_eq!(obs.instances.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(obs.entries.iter().collect::<Vec<_>>(), ["k-a"]);
        assert!(obs.networks.is_empty());
    }

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
                switch: Some("/s/networks/lab/switch.pid".into()),
                tap: None,
            }],
        };
        let script = observe_script(&req);
        assert!(script.contains("command -v 'qemu-img'"));
        assert!(script.contains("no-tap-rights"));
        assert!(script.contains("for d in '/var/lib/farm/state/vms'/*/"));
        assert!(
            script
                .contains("grep -azH -e '^FARM_PROJECT=' -e '^FARM_PROCESS=' /proc/[0-9]*/environ")
        );
        assert_eq!(
            script.matches("grep").count(),
            2,
            "one scan (and the tap check): {script}"
        );
        assert!(script.contains("[ -e '/var/lib/farm/cache/store'/\"$e\"/meta.json ]"));
        // The same script, run: an entry asked for by one name is found under another
        // with the same key, and one with no entry of its key is not.
        let store = tempfile::tempdir().unwrap();
        fs_err::create_dir_all(store.path().join("k1-plain_amd64")).unwrap();
        fs_err::write(store.path().join("k1-plain_amd64/meta.json"), "{}").unwrap();
        let probe = ObserveRequest {
            store: Some((
                store.path().to_path_buf(),
                vec!["k1-leaf_amd64".into(), "k2-leaf_amd64".into()],
            )),
            networks: Vec::new(),
            ..req
        };
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(observe_script(&probe))
            .output()
            .unwrap();
        let obs = parse_observation(&String::from_utf8_lossy(&out.stdout), "/p/.farm");
        assert_eq!(obs.entries.iter().collect::<Vec<_>>(), ["k1-plain_amd64"]);
        assert_eq!(obs.entry_for("k1-leaf_amd64"), Some("k1-plain_amd64"));
        assert_eq!(obs.entry_for("k1-plain_amd64"), Some("k1-plain_amd64"));
        assert_eq!(obs.entry_for("k2-leaf_amd64"), None);
        assert!(script.contains("echo \"netpid lab switch ${p:--}\""));
        assert!(!script.contains("netpid lab tap"));
    }

    #[test]
    fn output_is_parsed_into_facts_instances_and_processes() {
        let record = InstanceRecord::new(crate::model::lab::instance::tests::spec());
        let text = format!(
            "missing b3sum\nzstd\nkvm-device\narch x86_64\nlisten 0100007F:089A\nlisten 00000000:0016\n\
             vm web 4242\nrecord web {}\nvm half 5\nvm old -\nrecord old {{\"name\":\"old\"}}\n\
             /proc/4242/environ:FARM_PROJECT=/p/.farm\0/proc/4242/environ:FARM_PROCESS=vm:web\0\
             /proc/99/environ:FARM_PROJECT=/p/.farm\0/proc/99/environ:FARM_PROCESS=vm:web\0\
             /proc/100/environ:FARM_PROCESS=vm:ghost\0/proc/100/environ:FARM_PROJECT=/p/.farm\0\
             /proc/5/environ:FARM_PROJECT=/other/.farm\0/proc/5/environ:FARM_PROCESS=vm:half\0\
             /proc/7/environ:FARM_PROJECT=/p/.farm\0/proc/7/environ:FARM_PROCESS=net:lab:switch\0\n\
             entry k-a\nnetpid lab switch 7\nnetpid lab tap 8\n",
            String::from_utf8(record.to_json()).unwrap()
        );
        let obs = parse_observation(&text, "/p/.farm");
        assert_eq!(obs.facts.missing, ["b3sum"]);
        assert!(obs.facts.zstd);
        assert!(obs.facts.kvm.device_usable && !obs.facts.kvm.hardware_module);
        assert_eq!(obs.facts.arch, Some(Arch::X86_64));
        assert_eq!(obs.listening, BTreeSet::from([2202, 22]));
        assert_eq!(obs.instances["web"].pid, Some(4242));
        assert_eq!(obs.instances["web"].record.as_ref().unwrap(), &record);
        assert_eq!(
            obs.instances["half"].record,
            Err("it has no instance record".into())
        );
        assert!(
            !obs.instances["half"].running(),
            "its pid is another project's process"
        );
        assert_eq!(
            obs.instances["old"].record,
            Err("written by an older farm".into())
        );
        // The same record under another VM's name is not that VM's.
        let elsewhere = parse_observation(
            &format!(
                "vm api 4242\nrecord api {}\n",
                String::from_utf8(record.to_json()).unwrap()
            ),
            "/p/.farm",
        );
        assert_eq!(
            elsewhere.instances["api"].record,
            Err("its record names another VM or directory".into())
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
