//! How a site runs its VMs: farm's own daemonized qemu (the default, no daemon needed), or
//! libvirt domains that `virsh` and virt-manager see and libvirtd keeps.
//!
//! A site is a host or a hypervisor VM; `backend` on `[hosts.NAME]` or on a VM that
//! deploys VMs says how the VMs *on it* run. Both backends run the same resolved
//! `InstanceSpec` (overlay, seed, qemu hardware, NICs); only starting, stopping and
//! removing differ.

use serde::{Deserialize, Serialize};

use crate::model::config::limits::Refusal;
use crate::model::shell::quote_path;

/// libvirt's connection for a site when farm.toml names none: the system daemon, whose
/// domains outlive the user's session (what the Ansible collection farm replaces used).
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Backend {
    /// farm starts qemu itself, daemonized, tagged in its environment.
    #[default]
    Qemu,
    /// A libvirt domain on the site's libvirtd at `uri` (`qemu:///system` or
    /// `qemu:///session`, as seen on the site).
    Libvirt { uri: String },
}

impl Backend {
    pub fn is_qemu(&self) -> bool {
        *self == Backend::Qemu
    }

    pub fn libvirt_uri(&self) -> Option<&str> {
        match self {
            Backend::Qemu => None,
            Backend::Libvirt { uri } => Some(uri),
        }
    }

    /// The Unix socket libvirtd listens on for `uri`, as a shell word evaluated on the site
    /// (the session daemon's lives in the user's runtime directory).
    pub fn libvirt_socket_shell(uri: &str) -> String {
        if is_session(uri) {
            "\"${XDG_RUNTIME_DIR:-$HOME/.cache}/libvirt/libvirt-sock\"".to_string()
        } else {
            "/var/run/libvirt/libvirt-sock".to_string()
        }
    }

    /// Where the qemu of VM `vm` writes its own messages (why it would not start, or why
    /// it stopped), as a shell word evaluated on the site: farm's file beside the overlay
    /// for its own qemu, libvirt's per-domain log for a domain.
    pub fn qemu_log_shell(&self, stderr_log: &std::path::Path, vm: &str) -> String {
        let vm = crate::model::shell::shell_quote(vm);
        match self {
            Backend::Qemu => quote_path(stderr_log),
            Backend::Libvirt { uri } if is_session(uri) => {
                format!("\"${{XDG_CACHE_HOME:-$HOME/.cache}}/libvirt/qemu/log/\"{vm}.log")
            }
            Backend::Libvirt { .. } => format!("/var/log/libvirt/qemu/{vm}.log"),
        }
    }
}

/// `backend = "…"` as farm.toml says it.
pub fn parse_kind(kind: &str) -> Result<(), Refusal> {
    match kind {
        "qemu" | "libvirt" => Ok(()),
        other => Err(Refusal {
            message: format!("Unknown backend `{other}`"),
            hint: "use \"qemu\" (farm runs qemu itself, the default) or \"libvirt\" (domains on the site's libvirtd)".into(),
        }),
    }
}

/// `libvirt_uri = "…"`: a local libvirt URI as seen on the site. farm reaches remote sites
/// through its own ssh connections, so a transport in the URI (`qemu+ssh://`) is refused.
pub fn parse_uri(uri: &str) -> Result<(), Refusal> {
    match uri {
        "qemu:///system" | "qemu:///session" => Ok(()),
        other => Err(Refusal {
            message: format!("Unsupported libvirt_uri `{other}`"),
            hint: "use \"qemu:///system\" (the default) or \"qemu:///session\"; for another machine, declare it as a host with `address` and farm reaches its libvirtd over ssh".into(),
        }),
    }
}

/// The backend a `backend`/`libvirt_uri` pair names (both checked already).
pub fn from_parts(kind: &str, uri: Option<&str>) -> Backend {
    match kind {
        "libvirt" => Backend::Libvirt {
            uri: uri.unwrap_or(DEFAULT_LIBVIRT_URI).to_string(),
        },
        _ => Backend::Qemu,
    }
}

/// `qemu:///session` (the user's own daemon) rather than the system one.
pub fn is_session(uri: &str) -> bool {
    uri.trim_end_matches('/').ends_with("/session")
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Qemu => f.write_str("qemu"),
            Backend::Libvirt { uri } => write!(f, "libvirt ({uri})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_follow_the_uri() {
        assert_eq!(
            Backend::libvirt_socket_shell("qemu:///system"),
            "/var/run/libvirt/libvirt-sock"
        );
        assert!(Backend::libvirt_socket_shell("qemu:///session").contains("XDG_RUNTIME_DIR"));
        assert_eq!(Backend::default().to_string(), "qemu");
    }

    #[test]
    fn a_domain_logs_where_libvirt_keeps_its_logs() {
        let stderr = std::path::Path::new("/lab/.farm/vms/web/qemu.stderr");
        assert_eq!(
            Backend::Qemu.qemu_log_shell(stderr, "web"),
            "'/lab/.farm/vms/web/qemu.stderr'"
        );
        let system = Backend::Libvirt {
            uri: "qemu:///system".into(),
        };
        assert_eq!(
            system.qemu_log_shell(stderr, "web"),
            "/var/log/libvirt/qemu/'web'.log"
        );
        let session = Backend::Libvirt {
            uri: "qemu:///session".into(),
        };
        assert!(
            session
                .qemu_log_shell(stderr, "web")
                .ends_with("/libvirt/qemu/log/\"'web'.log")
        );
    }

    #[test]
    fn a_qemu_backend_is_the_default_and_round_trips() {
        let libvirt = Backend::Libvirt {
            uri: "qemu:///system".into(),
        };
        let json = serde_json::to_string(&libvirt).unwrap();
        assert_eq!(json, r#"{"kind":"libvirt","uri":"qemu:///system"}"#);
        assert_eq!(serde_json::from_str::<Backend>(&json).unwrap(), libvirt);
        assert!(Backend::default().is_qemu());
    }
}
