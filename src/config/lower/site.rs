//! Where things run: hosts (this machine, remote ones, their backend) and VMs (placement,
//! NICs, forwards, attachments, deploy lists), lowered with their values checked.

use super::*;

fn lower_deploy(raw: &RawDeploy, cx: &FileContext) -> Deploy {
    Deploy {
        targets: cx.names(&raw.targets),
        platforms: cx.names(&raw.platforms),
    }
}

fn lower_attach(
    raw: &BTreeMap<Spanned<String>, Spanned<crate::model::values::IpCidr>>,
    cx: &FileContext,
) -> Vec<Attachment> {
    raw.iter()
        .map(|(network, address)| Attachment {
            network: cx.located(network),
            address: cx.located(address),
        })
        .collect()
}

/// `backend` and `libvirt_uri` of a host or hypervisor VM, each checked at its span; the
/// backend is located at `backend` (where a later refusal points).
fn lower_backend(
    kind: &Option<Spanned<String>>,
    uri: &Option<Spanned<String>>,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) -> Option<Located<Backend>> {
    let uri_ok = uri
        .as_ref()
        .map(|u| cx.checked(u, |u: &String| backend::parse_uri(u), problems));
    if let Some(u) = uri
        .as_ref()
        .filter(|_| kind.as_ref().is_none_or(|k| k.get_ref() != "libvirt"))
    {
        problems.push(cx.refused(
            u,
            Refusal {
                message: "`libvirt_uri` is set but `backend` is not \"libvirt\"".into(),
                hint: "add `backend = \"libvirt\"`, or remove `libvirt_uri`".into(),
            },
        ));
    }
    let kind = kind.as_ref()?;
    cx.checked(kind, |k: &String| backend::parse_kind(k), problems)?;
    let uri = uri
        .as_ref()
        .filter(|_| uri_ok.flatten().is_some())
        .map(|u| u.get_ref().as_str());
    Some(Located::new(
        backend::from_parts(kind.get_ref(), uri),
        cx.origin(kind),
    ))
}

pub(super) fn lower_host(
    name: Located<String>,
    raw: RawHost,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) -> Host {
    Host {
        backend: lower_backend(&raw.backend, &raw.libvirt_uri, cx, problems),
        name,
        address: raw.address.as_ref().map(|a| cx.located(a)),
        identity_file: raw.identity_file.as_ref().map(|s| cx.located(s)),
        known_hosts: raw.known_hosts.as_ref().map(|s| cx.located(s)),
        root: raw.root.as_ref().map(|s| cx.located(s)),
        deploy: raw.deploy.as_ref().map(|d| lower_deploy(d, cx)),
        attach: lower_attach(&raw.attach, cx),
    }
}

/// The VM's VDE NICs (`network`) or its libvirt ones (`libvirt_network`); a NIC naming
/// both or neither is reported once, with the VDE ones.
fn lower_nics(
    raw: &[Spanned<RawNic>],
    libvirt: bool,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) -> Vec<Nic> {
    raw.iter()
        .filter_map(|spanned| {
            let n = spanned.get_ref();
            let network = match (&n.network, &n.libvirt_network) {
                (Some(network), None) if !libvirt => network,
                (None, Some(network)) if libvirt => network,
                (Some(_), Some(_)) | (None, None) => {
                    if !libvirt {
                        problems.push(cx.refused(
                            spanned,
                            Refusal {
                                message: "A NIC names both `network` and `libvirt_network`, or neither".into(),
                                hint: "give each NIC one: `{ network = \"lab\" }` (a VDE network of farm.toml) or `{ libvirt_network = \"default\" }` (a network of the site's libvirtd)".into(),
                            },
                        ));
                    }
                    return None;
                }
                _ => return None,
            };
            Some(Nic {
                network: cx.located(network),
                ip: n.ip.as_ref().and_then(|ip| {
                    cx.checked(ip, limits::host_address, problems)
                        .map(|()| cx.located(ip))
                }),
                gateway: n.gateway.as_ref().map(|g| cx.located(g)),
                mac: n.mac.as_ref().and_then(|m| {
                    cx.checked(m, limits::nic_mac, problems)
                        .map(|()| cx.located(m))
                }),
            })
        })
        .collect()
}

pub(super) fn lower_vm(
    name: Located<String>,
    raw: RawVm,
    cx: &FileContext,
    problems: &mut Vec<Diagnostic>,
) -> VmDecl {
    let forwards = raw
        .forwards
        .iter()
        .filter(|f| {
            let ports = [
                ("forwards.host", f.get_ref().host),
                ("forwards.guest", f.get_ref().guest),
            ];
            ports.iter().all(|(field, port)| {
                cx.checked(f, |_| limits::port(field, *port), problems)
                    .is_some()
            })
        })
        .map(|f| {
            Located::new(
                Forward {
                    host: f.get_ref().host,
                    guest: f.get_ref().guest,
                },
                cx.origin(f),
            )
        })
        .collect();
    VmDecl {
        name,
        platform: raw.platform.as_ref().map(|s| cx.located(s)),
        target: raw.target.as_ref().map(|s| cx.located(s)),
        host: raw.host.as_ref().map(|s| cx.located(s)),
        hostname: raw.hostname.as_ref().and_then(|h| {
            cx.checked(h, |h: &String| limits::hostname(h), problems)
                .map(|()| cx.located(h))
        }),
        ssh_port: raw.ssh_port.as_ref().and_then(|p| {
            cx.checked(p, |p| limits::port("ssh_port", *p), problems)
                .map(|_| cx.located(p))
        }),
        forwards,
        user_network: raw.user_network.unwrap_or(true),
        nics: lower_nics(&raw.nics, false, cx, problems),
        libvirt_nics: lower_nics(&raw.nics, true, cx, problems),
        attach: lower_attach(&raw.attach, cx),
        deploy: raw.deploy.as_ref().map(|d| lower_deploy(d, cx)),
        resources: cx.resources(&raw.memory, &raw.cpus, &raw.disk_size, problems),
        playbook: raw.playbook.as_ref().map(|p| cx.path(p)),
        backend: lower_backend(&raw.backend, &raw.libvirt_uri, cx, problems),
    }
}
