//! What to do with one VM, and why: its wanted spec against the record of how it was last
//! started and what its site runs now.

use std::fmt;

use super::{Basis, VmAction};
use crate::model::lab::instance::InstanceSpec;
use crate::model::lab::observation::ObservedInstance;
use crate::model::values::ByteSize;

/// Why a VM is not simply kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// It has no instance yet.
    New,
    /// farm.toml, the store or the site asks for something else: what, old → new.
    Changed(String),
    /// Its state cannot be used: why.
    Unusable(String),
    /// Its qemu is not running.
    NotRunning,
    /// `farm down --keep` stopped it.
    KeptStopped,
    /// Its qemu runs but nothing answers ssh; `ever`: it answered after its last start.
    NoAnswer { ever: bool },
    /// Its hypervisor VM restarts first, which stops it.
    HypervisorRestarts,
}

impl Reason {
    /// Whether the VM differs from what farm.toml asks (as opposed to being down).
    pub fn is_change(&self) -> bool {
        matches!(self, Reason::Changed(_) | Reason::Unusable(_))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::New => f.write_str("new"),
            Reason::Changed(what) => f.write_str(what),
            Reason::Unusable(why) => write!(f, "its state is {why}"),
            Reason::NotRunning => f.write_str("qemu not running"),
            Reason::KeptStopped => f.write_str("stopped by `farm down --keep`"),
            Reason::NoAnswer { ever: true } => f.write_str("does not answer ssh"),
            Reason::NoAnswer { ever: false } => f.write_str("never answered ssh"),
            Reason::HypervisorRestarts => f.write_str("its hypervisor restarts"),
        }
    }
}

/// The action for a VM wanted as `spec`, found as `found` (if at all).
pub fn decide(
    spec: &InstanceSpec,
    found: Option<&ObservedInstance>,
    basis: Basis,
) -> (VmAction, Vec<Reason>) {
    let Some(found) = found else {
        return (VmAction::Create, vec![Reason::New]);
    };
    let record = match &found.record {
        Ok(record) => record,
        Err(why) => return (VmAction::Replace, vec![Reason::Unusable(why.clone())]),
    };
    let old = &record.spec;
    if let Some(why) = replacement(old, spec) {
        return (VmAction::Replace, vec![Reason::Changed(why)]);
    }
    // A site not looked at yet (its hypervisor starts first) has unknown facts: its
    // accelerator is decided when it is planned again, not reported as a change now.
    let mut wanted = spec.clone();
    if basis != Basis::Observed {
        wanted.hw.accel = old.hw.accel;
    }
    let changes = differences(old, &wanted);
    if !changes.is_empty() {
        return (
            VmAction::Restart,
            changes.into_iter().map(Reason::Changed).collect(),
        );
    }
    if !found.running() {
        let reason = match basis {
            Basis::AfterRestart => Reason::HypervisorRestarts,
            _ if record.kept => Reason::KeptStopped,
            _ => Reason::NotRunning,
        };
        return (VmAction::Restart, vec![reason]);
    }
    if found.answers == Some(false) {
        return (
            VmAction::Restart,
            vec![Reason::NoAnswer { ever: record.ready }],
        );
    }
    (VmAction::Keep, Vec::new())
}

/// Why the overlay cannot be kept: it belongs to another layer, or would have to shrink.
fn replacement(old: &InstanceSpec, new: &InstanceSpec) -> Option<String> {
    if old.drv_hash != new.drv_hash {
        return Some(if old.platform == new.platform {
            format!("platform `{}` changed", new.platform)
        } else {
            format!("platform `{}` → `{}`", old.platform, new.platform)
        });
    }
    if let (Some(was), Some(is)) = (old.layer.blake3, new.layer.blake3)
        && was != is
    {
        return Some(format!(
            "base layer bytes differ (its overlay was made on {}, the store has {})",
            short(&was.to_hex()),
            short(&is.to_hex())
        ));
    }
    match (old.disk_size, new.disk_size) {
        (Some(was), is) if is.is_none_or(|is| is < was) => Some(format!(
            "disk_size {} → {} (a disk does not shrink)",
            ByteSize(was),
            is.map_or("the layer's size".to_string(), |s| ByteSize(s).to_string())
        )),
        _ => None,
    }
}

fn short(hex: &str) -> String {
    format!("blake3-{}…", &hex[..12])
}

/// What changed that a restart applies (the overlay stays), in farm.toml's words.
fn differences(old: &InstanceSpec, new: &InstanceSpec) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |what: &str, was: String, is: String| {
        if was != is {
            out.push(format!("{what} {was} → {is}"));
        }
    };
    let mib = |m: u64| ByteSize(m << 20).to_string();
    differ("backend", old.backend.to_string(), new.backend.to_string());
    differ("hostname", old.hostname.clone(), new.hostname.clone());
    differ("memory", mib(old.hw.memory_mib), mib(new.hw.memory_mib));
    differ("cpus", old.hw.cpus.to_string(), new.hw.cpus.to_string());
    let or_default = |v: &Option<String>| v.clone().unwrap_or_else(|| "default".into());
    differ(
        "machine",
        or_default(&old.hw.machine),
        or_default(&new.hw.machine),
    );
    differ("cpu", or_default(&old.hw.cpu), or_default(&new.hw.cpu));
    differ(
        "accelerator",
        old.hw.accel.to_string(),
        new.hw.accel.to_string(),
    );
    let port = |s: &InstanceSpec| s.ssh_port().map_or("none".into(), |p| p.to_string());
    differ("ssh_port", port(old), port(new));
    let forwards = |s: &InstanceSpec| {
        let list: Vec<String> = s
            .user_net
            .iter()
            .flat_map(|u| u.forwards.iter().map(|(h, g)| format!("{h}:{g}")))
            .collect();
        format!("[{}]", list.join(", "))
    };
    differ("forwards", forwards(old), forwards(new));
    let nics = |s: &InstanceSpec| {
        let list: Vec<String> = s
            .vde_nics
            .iter()
            .map(|n| {
                let address = n.address.map_or("dhcp".into(), |a| a.to_string());
                let gateway = n.gateway.map_or(String::new(), |g| format!(" via {g}"));
                format!("{} {} {address}{gateway}", n.network, n.mac)
            })
            .collect();
        format!("[{}]", list.join(", "))
    };
    differ("nics", nics(old), nics(new));
    let libvirt_nics = |s: &InstanceSpec| {
        let list: Vec<String> = s
            .libvirt_nics
            .iter()
            .map(|n| {
                let address = n.address.map_or("dhcp".into(), |a| a.to_string());
                format!("libvirt:{} {} {address}", n.network, n.mac)
            })
            .collect();
        format!("[{}]", list.join(", "))
    };
    differ("libvirt nics", libvirt_nics(old), libvirt_nics(new));
    if old.authorized_keys != new.authorized_keys {
        out.push("farm's key changed".into());
    }
    if let (was, Some(is)) = (old.disk_size, new.disk_size)
        && was != Some(is)
    {
        out.push(format!(
            "disk_size {} → {}",
            was.map_or("the layer's size".into(), |s| ByteSize(s).to_string()),
            ByteSize(is)
        ));
    }
    if old.layer.disk != new.layer.disk {
        out.push(format!("its layer moved to `{}`", new.layer.disk.display()));
    }
    if out.is_empty() && (old.qemu().argv() != new.qemu().argv() || old.paths != new.paths) {
        out.push("qemu command line changed".into());
    }
    out
}

/// Why a change must not be applied: replacing a VM stopped with `farm down --keep` would
/// throw away the disk the user asked farm to keep.
pub fn refusal(spec: &InstanceSpec, found: Option<&ObservedInstance>) -> Option<String> {
    let record = found?.record.as_ref().ok()?;
    let why = replacement(&record.spec, spec)?;
    if !record.kept || found?.running() {
        return None;
    }
    Some(format!(
        "VM `{}` was stopped with `farm down --keep`, and replacing it would discard its disk ({why})\nhint: `farm down {}` discards the disk, then `farm up` creates it anew; or undo the change in farm.toml",
        spec.name, spec.name
    ))
}

/// A new overlay smaller than its layer would cut the guest's filesystem off at
/// `disk_size`: qemu-img makes it without complaint, and the guest fails in odd ways.
pub fn disk_smaller_than_layer(spec: &InstanceSpec, layer_size: Option<u64>) -> Option<String> {
    let (wanted, layer_size) = (spec.disk_size?, layer_size?);
    if wanted >= layer_size {
        return None;
    }
    let (wanted, layer) = (ByteSize(wanted), ByteSize(layer_size));
    Some(format!(
        "VM `{}` has `disk_size = \"{wanted}\"`, smaller than the {layer} disk of its layer `{}`: the guest would see its disk cut off\nhint: make `disk_size` at least \"{layer}\", or leave it out to get the layer's size",
        spec.name, spec.platform
    ))
}
