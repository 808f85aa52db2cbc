//! What goes into the generated ssh_config and known_hosts: every VM farm knows a route
//! to, with its full jump chain through the hypervisors (and remote host) above it, and
//! every remote host with the user's own login.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::model::config::network::site_attachments;
use crate::model::config::topology::Topology;
use crate::model::lab::instance::InstanceSpec;
use crate::model::lab::ssh_config::{HostKeys, SshHost};
use crate::run::observe::ssh_address;
use crate::run::state::StatePaths;

/// The hosts of the generated ssh_config, each with the public key farm pins for it (none
/// for remote hosts). `specs` are instances about to run; VMs not among them are described
/// by the records kept in the state directory. A VM without a host key yet is left out.
pub fn ssh_hosts(
    project_dir: &Path,
    topology: &Topology,
    state: &StatePaths,
    specs: &BTreeMap<String, InstanceSpec>,
) -> Vec<(SshHost, Option<String>)> {
    let records = state.records();
    let mut hosts = Vec::new();
    for vm in topology.vms.values() {
        let Some(spec) = specs
            .get(&vm.name)
            .or_else(|| records.get(&vm.name).map(|r| &r.spec))
        else {
            continue;
        };
        let Some(key) = state.host_public_key(&vm.name) else {
            continue;
        };
        let attached: Vec<String> = site_attachments(topology, &vm.placement)
            .into_iter()
            .map(|(network, _)| network)
            .collect();
        let Some(address) = ssh_address(spec, &attached) else {
            continue;
        };
        let proxy_jump = topology
            .chain(&vm.name)
            .into_iter()
            .filter(|p| topology.reached_through(p))
            .map(|p| p.name().to_string())
            .collect();
        hosts.push((
            SshHost::vm(
                &vm.name,
                &address.ip().to_string(),
                address.port(),
                state.identity_file(),
                state.known_hosts(),
                proxy_jump,
            ),
            Some(key),
        ));
    }
    // Remote hosts: the user's own login, with paths relative to farm.toml (absolute in the
    // file: users run `ssh -F` from anywhere).
    let project_dir =
        fs_err::canonicalize(project_dir).unwrap_or_else(|_| project_dir.to_path_buf());
    let from_project = |path: &String| match path.starts_with('~') {
        true => PathBuf::from(path),
        false => project_dir.join(path),
    };
    for host in topology.hosts.values() {
        let Some(remote) = &host.remote else { continue };
        hosts.push((
            SshHost {
                alias: host.name.clone(),
                hostname: remote.address.hostname.clone(),
                port: remote.address.port,
                user: remote.address.user.clone(),
                identity_file: remote.identity_file.as_ref().map(from_project),
                host_keys: HostKeys::Users(remote.known_hosts.as_ref().map(from_project)),
                proxy_jump: Vec::new(),
            },
            None,
        ));
    }
    hosts
}
