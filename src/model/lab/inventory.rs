//! The Ansible inventory of a lab: every VM as a host reached through farm's ssh_config,
//! in groups a playbook can target, with what farm knows about it as host variables.
//!
//! Groups (names made of letters, digits and `_`, as Ansible wants them):
//! `vms` (every VM listed), `hypervisors` (VMs that run VMs), `on_<host or VM>` (where a VM
//! runs), `level_<n>` (1 on a physical host, 2 inside a level-1 hypervisor, …),
//! `platform_<name>`, `target_<name>` and `network_<name>`. Host variables: `farm_level`,
//! `farm_hypervisor`, `farm_platform`, `farm_target`, `farm_hostname`, `farm_addresses`
//! (network → address) and `farm_state`.
//!
//! Rendered as YAML or INI (static inventory files) or as the JSON Ansible's dynamic
//! inventory protocol asks of `--list` (with `_meta.hostvars`, so no `--host` calls follow).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::model::config::topology::{Placement, Topology};

/// A lab's inventory, ready to render.
#[derive(Clone, Debug, PartialEq)]
pub struct Inventory {
    /// Variables of the group `all`: how every host is reached.
    pub vars: BTreeMap<String, Value>,
    pub groups: BTreeMap<String, BTreeSet<String>>,
    pub hostvars: BTreeMap<String, BTreeMap<String, Value>>,
}

/// Which VMs are listed, and in what state each is.
pub trait VmStates {
    /// `Some(state)` for a VM to list (`running`, `stopped`, …), `None` to leave it out.
    fn state(&self, vm: &str) -> Option<String>;
}

impl<F: Fn(&str) -> Option<String>> VmStates for F {
    fn state(&self, vm: &str) -> Option<String> {
        self(vm)
    }
}

/// A group name Ansible accepts: anything but letters, digits and `_` becomes `_`.
pub fn group_name(prefix: &str, name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}{cleaned}")
}

/// The inventory of `topology`'s VMs that `states` lists, reached through `ssh_config`.
pub fn inventory(topology: &Topology, states: &dyn VmStates, ssh_config: &str) -> Inventory {
    let mut vars = BTreeMap::new();
    vars.insert(
        "ansible_ssh_common_args".to_string(),
        Value::String(format!(
            "-F {}",
            crate::model::shell::shell_quote(ssh_config)
        )),
    );
    vars.insert("ansible_user".to_string(), Value::String("root".into()));
    // A VM behind a hypervisor VM under TCG can take longer than Ansible's 10 s to finish an
    // ssh handshake through the jumps, and a nested guest's sshd now and then drops one:
    // a connection is given 30 s and tried again (Ansible retries only ssh's own failures,
    // exit 255, so no task runs twice). A group or host variable of the user's wins.
    vars.insert("ansible_ssh_timeout".to_string(), json!(30));
    vars.insert("ansible_ssh_retries".to_string(), json!(5));
    // Ansible's own ControlMaster sockets are named by a hash of the host's name, port and
    // user alone, in one directory for every project: two labs with a VM of the same name
    // (two projects, or the tests' labs side by side) share a socket, and a module copied
    // through one lab's master was run through the other's ("can't open file
    // AnsiballZ_setup.py"). Without ssh_args, Ansible adds none of its own and ssh shares
    // connections through farm's ssh_config: a socket per VM in this project's `.farm/mux`,
    // the one `farm ssh` and plain `ssh -F` use too.
    vars.insert("ansible_ssh_args".to_string(), Value::String(String::new()));
    // Ansible finds python3 where the guest has it, without a warning per host on every run
    // (Debian's is python3.11, which it would name as "discovered").
    vars.insert(
        "ansible_python_interpreter".to_string(),
        Value::String("auto_silent".into()),
    );
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut hostvars = BTreeMap::new();
    for vm in topology.vms.values() {
        let Some(state) = states.state(&vm.name) else {
            continue;
        };
        let mut add = |group: String| {
            groups.entry(group).or_default().insert(vm.name.clone());
        };
        add("vms".into());
        if vm.is_hypervisor {
            add("hypervisors".into());
        }
        add(group_name("on_", vm.placement.name()));
        add(format!("level_{}", vm.level));
        add(group_name("platform_", &vm.platform));
        add(group_name("target_", &vm.target));
        let mut addresses = serde_json::Map::new();
        for nic in &vm.nics {
            add(group_name("network_", &nic.network));
            if let Some(ip) = &nic.ip {
                addresses.insert(nic.network.clone(), Value::String(ip.addr.to_string()));
            }
        }
        let hypervisor = match &vm.placement {
            Placement::Host(host) | Placement::Vm(host) => host.clone(),
        };
        let vars: BTreeMap<String, Value> = [
            ("farm_level", json!(vm.level)),
            ("farm_hypervisor", json!(hypervisor)),
            ("farm_platform", json!(vm.platform)),
            ("farm_target", json!(vm.target)),
            ("farm_hostname", json!(vm.hostname)),
            ("farm_addresses", Value::Object(addresses)),
            ("farm_state", json!(state)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        hostvars.insert(vm.name.clone(), vars);
    }
    Inventory {
        vars,
        groups,
        hostvars,
    }
}

impl Inventory {
    /// What `--list` prints: Ansible's dynamic inventory JSON, host variables under
    /// `_meta` so Ansible asks for no host separately.
    pub fn to_json(&self) -> Value {
        let mut out = serde_json::Map::new();
        out.insert("_meta".into(), json!({ "hostvars": self.hostvars }));
        out.insert(
            "all".into(),
            json!({
                "vars": self.vars,
                "children": self.groups.keys().collect::<Vec<_>>(),
            }),
        );
        for (group, hosts) in &self.groups {
            out.insert(group.clone(), json!({ "hosts": hosts }));
        }
        Value::Object(out)
    }

    /// What `--host NAME` prints: the host's variables (`{}` for a host not listed).
    pub fn host_json(&self, host: &str) -> Value {
        self.hostvars
            .get(host)
            .map_or_else(|| json!({}), |vars| json!(vars))
    }

    /// A static YAML inventory (`ansible -i inventory.yml`).
    pub fn to_yaml(&self) -> String {
        let mut out = String::from("all:\n  vars:\n");
        for (key, value) in &self.vars {
            out.push_str(&format!("    {key}: {}\n", yaml_scalar(value)));
        }
        out.push_str("  hosts:\n");
        for (host, vars) in &self.hostvars {
            out.push_str(&format!("    {host}:\n"));
            for (key, value) in vars {
                out.push_str(&format!("      {key}: {}\n", yaml_scalar(value)));
            }
        }
        out.push_str("  children:\n");
        for (group, hosts) in &self.groups {
            out.push_str(&format!("    {group}:\n      hosts:\n"));
            for host in hosts {
                out.push_str(&format!("        {host}:\n"));
            }
        }
        out
    }

    /// A static INI inventory: host variables on the hosts' lines in `[vms]`.
    pub fn to_ini(&self) -> String {
        let mut out = String::from("[all:vars]\n");
        for (key, value) in &self.vars {
            out.push_str(&format!("{key}={}\n", ini_value(value)));
        }
        let vms = self.groups.get("vms").cloned().unwrap_or_default();
        for (group, hosts) in &self.groups {
            out.push_str(&format!("\n[{group}]\n"));
            for host in hosts {
                out.push_str(host);
                if group == "vms" && vms.contains(host) {
                    for (key, value) in &self.hostvars[host] {
                        out.push_str(&format!(" {key}={}", ini_value(value)));
                    }
                }
                out.push('\n');
            }
        }
        out
    }
}

/// A JSON value as YAML flow syntax: JSON is YAML, and strings are quoted.
fn yaml_scalar(value: &Value) -> String {
    value.to_string()
}

/// A value as INI inventories take it: numbers and booleans bare, strings single-quoted,
/// structures as quoted JSON (Ansible parses both back).
fn ini_value(value: &Value) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "\\'"));
    match value {
        Value::Number(_) | Value::Bool(_) => value.to_string(),
        Value::String(s) => quote(s),
        other => quote(&other.to_string()),
    }
}
