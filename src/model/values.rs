//! Small value types that farm.toml spells as strings: sizes, addresses, architectures.
//!
//! Each parses with `FromStr` and deserializes through it, so a malformed value becomes a
//! deserialization error that toml pins to the value's line and column.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Implements `Deserialize` through `FromStr` so parse errors carry toml's span.
macro_rules! deserialize_via_from_str {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A size in bytes, written `2G`, `512MiB`, `10GB` or a plain integer string.
/// Suffixes are binary (K = 1024), as qemu reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn mib(self) -> u64 {
        self.0 / (1024 * 1024)
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, suffix) = text.split_at(split);
        let number: u64 = digits.parse().map_err(|_| {
            format!(
                "Invalid size `{s}`: expected a number with an optional unit, like `2G` or `512M`"
            )
        })?;
        let shift = match suffix.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            other => {
                return Err(format!(
                    "Invalid size `{s}`: unknown unit `{other}` (use K, M, G or T)"
                ));
            }
        };
        number
            .checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("Invalid size `{s}`: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
        for (unit, shift) in UNITS {
            let unit_bytes = 1u64 << shift;
            if self.0 >= unit_bytes && self.0.is_multiple_of(unit_bytes) {
                return write!(f, "{}{unit}", self.0 / unit_bytes);
            }
        }
        write!(f, "{}", self.0)
    }
}

deserialize_via_from_str!(ByteSize);

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An address with its prefix length, `10.0.0.21/24`: the address a NIC gets and its subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpCidr {
    /// The network this address belongs to, as `u128` bits masked to the prefix.
    fn network_bits(&self) -> (bool, u128) {
        match self.addr {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4) as u128;
                let mask = if self.prefix == 0 {
                    0
                } else {
                    (u32::MAX << (32 - self.prefix as u32)) as u128
                };
                (true, bits & mask)
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix as u32)
                };
                (false, bits & mask)
            }
        }
    }

    /// True when `other`'s address lies inside this address's subnet.
    pub fn contains(&self, other: IpAddr) -> bool {
        let probe = IpCidr {
            addr: other,
            prefix: self.prefix,
        };
        self.network_bits() == probe.network_bits()
    }
}

impl FromStr for IpCidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').ok_or_else(|| {
            format!("Invalid address `{s}`: expected CIDR notation like `10.0.0.21/24`")
        })?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("Invalid address `{s}`: `{addr}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| {
            format!("Invalid address `{s}`: prefix length must be a number from 0 to {max}")
        })?;
        Ok(IpCidr { addr, prefix })
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

deserialize_via_from_str!(IpCidr);

impl Serialize for IpCidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An Ethernet address, `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("Invalid MAC address `{s}`: expected six hex pairs like `52:54:00:12:34:56`")
        };
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut out = [0u8; 6];
        for (slot, part) in out.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(bad());
            }
            *slot = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

deserialize_via_from_str!(MacAddr);

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A guest CPU architecture farm can build for and run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// Debian's name for the architecture (`amd64`, `arm64`), used for mirrors and packages.
    pub fn debian_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What starts a VM that has no kernel given to qemu: the image's own bootloader, found by
/// legacy BIOS (SeaBIOS) or by UEFI firmware (OVMF on x86_64, AAVMF on aarch64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Bios,
    Uefi,
}

impl Firmware {
    /// What an image needs when it does not say: x86_64 cloud images boot from BIOS (and
    /// most from UEFI too); aarch64 has no BIOS, so UEFI.
    pub fn default_for(arch: Arch) -> Firmware {
        match arch {
            Arch::X86_64 => Firmware::Bios,
            Arch::Aarch64 => Firmware::Uefi,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }
}

/// How a platform's steps reach its image. `boot` starts the image itself (its services and
/// first boot run, as on an instance); `chroot` never boots it: farm's tiny appliance VM
/// mounts the image's root filesystem and runs the steps in a chroot of it, as
/// `virt-customize` does. Faster for cloud images (no firmware, systemd or cloud-init under
/// TCG), but nothing of the image runs while its steps do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Builder {
    #[default]
    Boot,
    Chroot,
}

impl Builder {
    /// Serde's `skip_serializing_if`: the default is left out of derivations, so the keys
    /// of platforms that never say stay what they were.
    pub fn is_boot(&self) -> bool {
        *self == Builder::Boot
    }
}

/// The UEFI firmware files Debian's packages install (`ovmf`, `qemu-efi-aarch64`): the
/// read-only code, and the variable store template each VM gets a copy of.
pub fn uefi_files(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::X86_64 => (
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
        ),
        Arch::Aarch64 => (
            "/usr/share/AAVMF/AAVMF_CODE.fd",
            "/usr/share/AAVMF/AAVMF_VARS.fd",
        ),
    }
}

/// How a VM's CPU is provided. `auto` picks KVM only where KVM really runs stock kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The on-disk format of an image as delivered (after decompression).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// Where a remote host is reached: `[user@]server[:port]`, with `[v6]` brackets when an
/// IPv6 address carries a port. Absent parts are left to ssh's own defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshAddress {
    pub user: Option<String>,
    pub hostname: String,
    pub port: Option<u16>,
}

impl FromStr for SshAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "Invalid host address `{s}`: {why}; expected `user@server`, `server` or `user@server:port`"
            )
        };
        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it is empty or contains spaces"));
        }
        // ssh would read it as an option (`-oProxyCommand=…`).
        if s.starts_with('-') {
            return Err(bad("it starts with `-`, which ssh reads as an option"));
        }
        let (user, rest) = match s.rsplit_once('@') {
            Some(("", _)) => return Err(bad("the user before `@` is empty")),
            Some((user, rest)) => (Some(user.to_string()), rest),
            None => (None, s),
        };
        let (hostname, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("`[` without a closing `]`"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(bad("unexpected text after `]`")),
                },
            }
        } else if rest.matches(':').count() > 1 {
            (rest, None) // a bare IPv6 address
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if hostname.is_empty() {
            return Err(bad("the server name is empty"));
        }
        if hostname.starts_with('-') || user.as_deref().is_some_and(|u| u.starts_with('-')) {
            return Err(bad("a part starts with `-`, which ssh reads as an option"));
        }
        let port = port
            .map(|p| match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(bad(&format!("`{p}` is not a port number"))),
                Ok(port) => Ok(port),
            })
            .transpose()?;
        Ok(SshAddress {
            user,
            hostname: hostname.to_string(),
            port,
        })
    }
}

impl fmt::Display for SshAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        match (self.port, self.hostname.contains(':')) {
            (Some(port), true) => write!(f, "[{}]:{port}", self.hostname),
            (Some(port), false) => write!(f, "{}:{port}", self.hostname),
            (None, _) => write!(f, "{}", self.hostname),
        }
    }
}

deserialize_via_from_str!(SshAddress);

/// A stable, locally administered MAC for a VM's NIC, derived from names so it survives
/// restarts and is the same on every host (QEMU's own prefix 52:54:00 keeps tools happy).
pub fn mac_for(vm: &str, nic_index: usize) -> MacAddr {
    let hash = blake3::hash(format!("farm mac {vm} {nic_index}").as_bytes());
    let b = hash.as_bytes();
    MacAddr([0x52, 0x54, 0x00, b[0], b[1], b[2]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_stable_and_distinct() {
        assert_eq!(mac_for("a", 0), mac_for("a", 0));
        assert_ne!(mac_for("a", 0), mac_for("a", 1));
        assert_ne!(mac_for("a", 0), mac_for("b", 0));
        assert_eq!(mac_for("a", 0).0[..3], [0x52, 0x54, 0x00]);
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!("2G".parse::<ByteSize>().unwrap(), ByteSize(2 << 30));
        assert_eq!("512MiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 20));
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!(ByteSize(2 << 30).to_string(), "2G");
        assert!(
            "2Q".parse::<ByteSize>()
                .unwrap_err()
                .contains("unknown unit `Q`")
        );
        assert!("lots".parse::<ByteSize>().is_err());
    }

    #[test]
    fn cidrs_parse_and_know_their_subnet() {
        let c: IpCidr = "10.0.0.254/24".parse().unwrap();
        assert!(c.contains("10.0.0.21".parse().unwrap()));
        assert!(!c.contains("10.0.1.21".parse().unwrap()));
        assert!("10.0.0.1".parse::<IpCidr>().is_err());
        assert!("10.0.0.1/33".parse::<IpCidr>().is_err());
        assert!("10.0.0.300/24".parse::<IpCidr>().is_err());
        let v6: IpCidr = "fd00::1/64".parse().unwrap();
        assert!(v6.contains("fd00::2".parse().unwrap()));
    }

    #[test]
    fn macs_parse_and_display_lowercase() {
        let m: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
    }

    #[test]
    fn ssh_addresses_parse_with_optional_user_and_port() {
        let a: SshAddress = "root@lab.example:2222".parse().unwrap();
        assert_eq!(
            (a.user.as_deref(), a.hostname.as_str(), a.port),
            (Some("root"), "lab.example", Some(2222))
        );
        let b: SshAddress = "server".parse().unwrap();
        assert_eq!((b.user, b.port), (None, None));
        let c: SshAddress = "me@[::1]:22".parse().unwrap();
        assert_eq!((c.hostname.as_str(), c.port), ("::1", Some(22)));
        assert_eq!(c.to_string(), "me@[::1]:22");
        let d: SshAddress = "fe80::1".parse().unwrap();
        assert_eq!((d.hostname.as_str(), d.port), ("fe80::1", None));
        for bad in [
            "",
            "@server",
            "root@",
            "a b",
            "root@server:0",
            "root@server:ssh",
            "[::1",
        ] {
            let err = bad.parse::<SshAddress>().unwrap_err();
            assert!(err.starts_with("Invalid host address"), "{bad}: {err}");
        }
    }
}
