//! libvirtd through the `virt` crate (libvirt's C API): connect, define, start, shut down,
//! undefine, and find farm's domains by their metadata element
//! ([`crate::model::lab::libvirt::DomainMeta`]). A domain without farm's element, or with
//! another project's, is never changed.

use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain;

use crate::model::lab::libvirt::{DomainMeta, METADATA_NS};

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error(
        "libvirtd is not reachable at `{uri}`: {message}\nhint: start it (`systemctl start libvirtd`; without systemd, `virtlogd -d && libvirtd -d`), or install `libvirt-daemon-system`"
    )]
    Unreachable { uri: String, message: String },
    #[error(
        "A domain named `{name}` already exists at `{uri}` and is not farm's VM `{name}` of this project{owner}\nhint: rename the VM in farm.toml, or remove the other domain (`virsh undefine {name}`) if it is not needed"
    )]
    Taken {
        name: String,
        uri: String,
        owner: String,
    },
    #[error("libvirt could not {what} domain `{name}` at `{uri}`: {message}")]
    Call {
        what: &'static str,
        name: String,
        uri: String,
        message: String,
    },
}

/// One of farm's domains, as libvirt lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FarmDomain {
    pub name: String,
    pub meta: DomainMeta,
    pub active: bool,
}

/// How a domain went down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainStopped {
    AlreadyDown,
    /// The guest powered off after the ACPI request.
    ShutDown(Duration),
    /// It did not within the timeout: destroyed (like pulling the plug).
    Destroyed(Duration),
}

pub struct Libvirt {
    conn: Connect,
    uri: String,
}

impl Libvirt {
    pub fn connect(uri: &str) -> Result<Libvirt, LibvirtError> {
        // libvirt's default handler prints every error (a lookup of a name that is free
        // too); farm reports the ones that matter itself.
        virt::error::clear_error_callback();
        Connect::open(Some(uri))
            .map(|conn| Libvirt {
                conn,
                uri: uri.to_string(),
            })
            .map_err(|e| LibvirtError::Unreachable {
                uri: uri.to_string(),
                message: e.message().to_string(),
            })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn call<T>(
        &self,
        what: &'static str,
        name: &str,
        result: Result<T, virt::error::Error>,
    ) -> Result<T, LibvirtError> {
        result.map_err(|e| LibvirtError::Call {
            what,
            name: name.to_string(),
            uri: self.uri.clone(),
            message: e.message().to_string(),
        })
    }

    fn lookup(&self, name: &str) -> Option<Domain> {
        self.conn.lookup_domain_by_name(name).ok()
    }

    /// farm's metadata of `domain`, if it has any.
    fn meta_of(domain: &Domain) -> Option<DomainMeta> {
        domain
            .metadata(
                virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(METADATA_NS),
                0,
            )
            .ok()
            .and_then(|xml| DomainMeta::parse(&xml))
    }

    /// Every domain (running or not) that carries farm's metadata.
    pub fn farm_domains(&self) -> Result<Vec<FarmDomain>, LibvirtError> {
        let domains = self.call("list", "*", self.conn.list_all_domains(0))?;
        Ok(domains
            .iter()
            .filter_map(|d| {
                let meta = Self::meta_of(d)?;
                Some(FarmDomain {
                    name: d.name().ok()?,
                    meta,
                    active: d.is_active().unwrap_or(false),
                })
            })
            .collect())
    }

    /// The domain named `name` if it is `meta`'s VM of `meta`'s project; an error if that
    /// name belongs to anything else.
    fn owned(&self, name: &str, meta: &DomainMeta) -> Result<Option<Domain>, LibvirtError> {
        let Some(domain) = self.lookup(name) else {
            return Ok(None);
        };
        match Self::meta_of(&domain) {
            Some(m) if m.project == meta.project && m.vm == meta.vm => Ok(Some(domain)),
            other => Err(LibvirtError::Taken {
                name: name.to_string(),
                uri: self.uri.clone(),
                owner: other
                    .map(|m| format!(" (it is VM `{}` of `{}`)", m.vm, m.project))
                    .unwrap_or_default(),
            }),
        }
    }

    /// Defines (or redefines) `meta`'s domain from `xml`; refuses a name that is not ours.
    pub fn define(&self, name: &str, xml: &str, meta: &DomainMeta) -> Result<(), LibvirtError> {
        self.owned(name, meta)?;
        self.call("define", name, self.conn.define_domain_xml(xml))
            .map(drop)
    }

    pub fn start(&self, name: &str, meta: &DomainMeta) -> Result<(), LibvirtError> {
        let domain = self.owned(name, meta)?.ok_or_else(|| LibvirtError::Call {
            what: "start",
            name: name.to_string(),
            uri: self.uri.clone(),
            message: "it is not defined".into(),
        })?;
        self.call("start", name, domain.create())
    }

    /// Whether `meta`'s domain runs: `None` when it is not defined.
    pub fn is_active(&self, name: &str, meta: &DomainMeta) -> Result<Option<bool>, LibvirtError> {
        match self.owned(name, meta)? {
            Some(d) => self.call("inspect", name, d.is_active()).map(Some),
            None => Ok(None),
        }
    }

    /// Asks the guest to power off (ACPI); `false` when the domain does not run.
    pub fn shutdown(&self, name: &str, meta: &DomainMeta) -> Result<bool, LibvirtError> {
        match self.owned(name, meta)? {
            Some(d) if d.is_active().unwrap_or(false) => {
                // A guest still booting may refuse: the caller asks again.
                let _ = d.shutdown();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Stops the domain at once (qemu killed, as pulling the plug).
    pub fn destroy(&self, name: &str, meta: &DomainMeta) -> Result<(), LibvirtError> {
        match self.owned(name, meta)? {
            Some(d) if d.is_active().unwrap_or(false) => self.call("destroy", name, d.destroy()),
            _ => Ok(()),
        }
    }

    /// ACPI shutdown (and `poweroff`, when given: minimal guests have no ACPI daemon),
    /// waited for up to `timeout`, then destroy.
    pub fn stop(
        &self,
        name: &str,
        meta: &DomainMeta,
        timeout: Duration,
        poweroff: Option<&dyn Fn()>,
    ) -> Result<DomainStopped, LibvirtError> {
        let started = Instant::now();
        let Some(domain) = self.owned(name, meta)? else {
            return Ok(DomainStopped::AlreadyDown);
        };
        if !domain.is_active().unwrap_or(false) {
            return Ok(DomainStopped::AlreadyDown);
        }
        // A guest still booting may miss the first request: asked again every few seconds.
        let mut asked = None::<Instant>;
        while started.elapsed() < timeout {
            if !domain.is_active().unwrap_or(false) {
                return Ok(DomainStopped::ShutDown(started.elapsed()));
            }
            if asked.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                let _ = domain.shutdown();
                if let Some(poweroff) = poweroff.filter(|_| asked.is_none()) {
                    poweroff();
                }
                asked = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if domain.is_active().unwrap_or(false) {
            self.call("destroy", name, domain.destroy())?;
        }
        Ok(DomainStopped::Destroyed(started.elapsed()))
    }

    /// Removes `meta`'s domain definition (its UEFI variable store is farm's file, kept).
    pub fn undefine(&self, name: &str, meta: &DomainMeta) -> Result<(), LibvirtError> {
        match self.owned(name, meta)? {
            Some(d) => self.call(
                "undefine",
                name,
                d.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM),
            ),
            None => Ok(()),
        }
    }
}
