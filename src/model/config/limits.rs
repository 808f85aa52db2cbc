//! What farm.toml's values may be: every unit, bound and name rule `farm check` enforces,
//! in one place (README's reference lists the same). Each check returns why a value cannot
//! work and what to write instead, for a diagnostic at the value.

use std::net::IpAddr;

use crate::model::values::{Arch, ByteSize, IpCidr, MacAddr};

/// A value that cannot work: what is wrong, and what to write instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub hint: String,
}

fn refuse(message: impl Into<String>, hint: impl Into<String>) -> Refusal {
    Refusal {
        message: message.into(),
        hint: hint.into(),
    }
}

const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;

/// The range and granularity of a size field.
#[derive(Clone, Copy, Debug)]
pub struct SizeRule {
    pub min: u64,
    pub max: u64,
    /// Sizes are whole multiples of this; `granule_name` says it in words.
    pub granule: u64,
    pub granule_name: &'static str,
}

/// A VM's memory: no guest farm boots fits in less; qemu's x86 and arm boards stop well
/// before the upper bound. qemu's `-m` counts MiB, so a part of one would be dropped.
pub const MEMORY: SizeRule = SizeRule {
    min: 64 * MIB,
    max: 16 * TIB,
    granule: MIB,
    granule_name: "MiB",
};
/// A VM's disk: no bootable image is smaller; qcow2's own limit is far above. Disks are
/// made of 512-byte sectors.
pub const DISK_SIZE: SizeRule = SizeRule {
    min: 64 * MIB,
    max: 64 * TIB,
    granule: 512,
    granule_name: "512-byte sectors",
};
/// vCPUs: qemu's `q35` and `virt` machines take up to 255 without extra options.
pub const CPUS: (i64, i64) = (1, 255);

/// Parses a size field (`memory`, `disk_size`): a number with a unit, within `bounds`.
pub fn size(field: &str, text: &str, rule: SizeRule) -> Result<ByteSize, Refusal> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit()) {
        return Err(refuse(
            format!("`{field} = {trimmed}` has no unit"),
            format!(
                "farm does not guess whether that is bytes or MiB: write `{field} = \"{trimmed}M\"` or `\"{}G\"` (units K, M, G, T; 1024-based)",
                trimmed.parse::<u64>().map_or(1, |n| (n / 1024).max(1))
            ),
        ));
    }
    let size: ByteSize = trimmed
        .parse()
        .map_err(|e: String| refuse(e, "write a number with a unit: `512M`, `2G`, `1T`"))?;
    let (low, high) = (rule.min, rule.max);
    if size.0 < low || size.0 > high {
        return Err(refuse(
            format!(
                "`{field} = \"{trimmed}\"` is {} a VM can use",
                if size.0 < low {
                    "less than"
                } else {
                    "more than"
                }
            ),
            format!("{field} goes from {} to {}", ByteSize(low), ByteSize(high)),
        ));
    }
    if !size.0.is_multiple_of(rule.granule) {
        return Err(refuse(
            format!(
                "`{field} = \"{trimmed}\"` is not a whole number of {}",
                rule.granule_name
            ),
            "use M or G units",
        ));
    }
    Ok(size)
}

pub fn cpus(value: i64) -> Result<u32, Refusal> {
    let (low, high) = CPUS;
    if !(low..=high).contains(&value) {
        return Err(refuse(
            format!("`cpus = {value}` is not a number of vCPUs a VM can have"),
            format!("cpus goes from {low} to {high}"),
        ));
    }
    Ok(value as u32)
}

/// A port on a hypervisor's 127.0.0.1 or in a guest.
pub fn port(field: &str, value: u16) -> Result<u16, Refusal> {
    if value == 0 {
        return Err(refuse(
            format!("`{field} = 0` is not a port"),
            "ports go from 1 to 65535; leave `ssh_port` out and farm picks a free one",
        ));
    }
    Ok(value)
}

/// A test's `timeout`: `90s`, `5m`, `1h` or a number of seconds, from 1 s to a day.
pub fn duration(field: &str, text: &str) -> Result<std::time::Duration, Refusal> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit.trim() {
        "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        _ => None,
    };
    match (digits.parse::<u64>().ok(), scale) {
        (Some(n), Some(scale)) if (1..=86_400).contains(&(n * scale)) => {
            Ok(std::time::Duration::from_secs(n * scale))
        }
        _ => Err(refuse(
            format!("`{field} = \"{text}\"` is not a duration farm takes"),
            "write seconds, minutes or hours: `90s`, `5m`, `1h` (from 1 s to 24 h)",
        )),
    }
}

/// The longest name of an image, platform, target, network, host or VM.
pub const NAME_MAX_LEN: usize = 64;

/// What such a name may be, for hints.
pub const NAME_RULE: &str = "names use letters, digits, `-`, `_` and `.`, start with a letter or digit, and have at most 64 characters";

/// Names of images, platforms, targets, networks, hosts and VMs (declared, or generated
/// by a `deploy`): letters, digits, `-`, `_`, `.`, starting with a letter or digit,
/// [`NAME_MAX_LEN`] at most. They become store entry and state directory names.
pub fn is_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX_LEN
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A snapshot's name: a file name of letters, digits, `-`, `_` and `.`, not starting with
/// `.`, [`NAME_MAX_LEN`] at most. Also what a cache's snapshot record must be named.
pub fn is_snapshot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX_LEN
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Whether `name` is an RFC 1123 host name: dot-separated labels of 1 to 63 letters,
/// digits and inner hyphens, 253 characters at most.
pub fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

pub fn hostname(name: &str) -> Result<(), Refusal> {
    if is_hostname(name) {
        return Ok(());
    }
    Err(refuse(
        format!("`{name}` is not a valid host name"),
        "use dot-separated labels of 1 to 63 letters, digits and inner `-` (253 characters at most)",
    ))
}

/// A login name the guest's `useradd` accepts: lower-case letters, digits, `_`, `-`,
/// starting with a letter or `_`, 32 characters at most.
pub fn login(user: &str) -> Result<(), Refusal> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && user
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c));
    if ok {
        return Ok(());
    }
    Err(refuse(
        format!("`{user}` is not a login name"),
        "use lower-case letters, digits, `_` and `-`, starting with a letter (32 at most), such as `root` or `ops`",
    ))
}

/// A path in the guest a `files` entry writes: absolute, naming a file.
pub fn guest_path(path: &str) -> Result<(), Refusal> {
    if path.is_empty() {
        return Err(refuse(
            "A `files` entry has an empty guest path",
            "write the absolute path the file gets in the guest, such as `\"/etc/motd\" = \"files/motd\"`",
        ));
    }
    if !path.starts_with('/') {
        return Err(refuse(
            format!("The guest path `{path}` is relative"),
            format!("write it from the root of the guest's filesystem: `/{path}`"),
        ));
    }
    if path.ends_with('/') || path.contains(['\0', '\n']) {
        return Err(refuse(
            format!("The guest path `{path}` does not name a file"),
            "give the file's full path, such as `/etc/motd`",
        ));
    }
    Ok(())
}

/// The schemes of vdeplug4 URLs (`libvdeplug_*` plugins Debian ships).
const VDEPLUG_SCHEMES: [&str; 14] = [
    "vde",
    "vxvde",
    "vxlan",
    "tap",
    "udp",
    "ptp",
    "hub",
    "switch",
    "cmd",
    "slirp",
    "null",
    "multi",
    "seqpacket",
    "bundle",
];

pub fn vde_url(url: &str) -> Result<(), Refusal> {
    let scheme = url.split_once("://").map(|(s, _)| s);
    if scheme.is_some_and(|s| VDEPLUG_SCHEMES.contains(&s)) {
        return Ok(());
    }
    Err(refuse(
        format!("`{url}` is not a vdeplug4 URL"),
        format!(
            "use one of {} such as `vxvde://234.0.0.1`, or leave `url` out for a switch farm runs",
            VDEPLUG_SCHEMES
                .iter()
                .map(|s| format!("`{s}://`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// An image to download: farm fetches http and https.
pub fn image_url(url: &str) -> Result<(), Refusal> {
    let parsed = match url::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(e) => {
            return Err(refuse(
                format!("`{url}` is not a URL: {e}"),
                "write `url = \"https://host/path/disk.qcow2\"`, or `path = \"…\"` for a file on this machine",
            ));
        }
    };
    match parsed.scheme() {
        "http" | "https" if parsed.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        "http" | "https" => Err(refuse(
            format!("`{url}` names no host"),
            "write `url = \"https://host/path/disk.qcow2\"`",
        )),
        scheme => Err(refuse(
            format!("`{url}` is a `{scheme}` URL; farm downloads http and https"),
            "for a file on this machine write `path = \"…\"` instead of `url`",
        )),
    }
}

/// A binary cache URL: `http(s)://host/path`, `s3://bucket/prefix`,
/// `oci://registry/repository`, or `file:///path`.
pub fn substituter(url: &str) -> Result<(), Refusal> {
    let hint = "write `https://host/path`, `s3://bucket/prefix`, `oci://registry/repository`, or `file:///srv/farm-cache` for a directory";
    let parsed = url::Url::parse(url)
        .map_err(|e| refuse(format!("`{url}` is not a cache URL: {e}"), hint))?;
    match parsed.scheme() {
        "http" | "https" if parsed.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        "file" if parsed.path().len() > 1 => Ok(()),
        "http" | "https" | "file" => Err(refuse(format!("`{url}` names no host or path"), hint)),
        "s3" if parsed.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        "s3" => Err(refuse(
            format!("`{url}` names no bucket"),
            "write `s3://bucket/prefix`",
        )),
        "oci" if parsed.host_str().is_some_and(|h| !h.is_empty()) && parsed.path().len() > 1 => {
            Ok(())
        }
        "oci" => Err(refuse(
            format!("`{url}` names no registry or repository"),
            "write `oci://registry.example/team/farm-cache`",
        )),
        scheme => Err(refuse(
            format!(
                "`{url}` is a `{scheme}` URL; farm reads caches over http, https, s3, oci and file"
            ),
            hint,
        )),
    }
}

/// A `NAME:BASE64` ed25519 public key, as `farm store keygen` prints it.
pub fn trusted_public_key(text: &str) -> Result<crate::model::signing::PublicKey, Refusal> {
    text.parse().map_err(|e| {
        refuse(
            format!("`{text}` is not a public key: {e}"),
            "copy the line from the `.public` file `farm store keygen NAME` wrote",
        )
    })
}

/// A Debian mirror mmdebstrap can read: http(s), or `file://` for a local mirror in an
/// offline lab.
pub fn debian_mirror(mirror: &str) -> Result<(), Refusal> {
    let hint = "write the mirror's base URL, such as `http://deb.debian.org/debian` or `file:///srv/mirror/debian`";
    let parsed = url::Url::parse(mirror)
        .map_err(|e| refuse(format!("`{mirror}` is not a mirror URL: {e}"), hint))?;
    match parsed.scheme() {
        "http" | "https" if parsed.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        "file" if parsed.path().len() > 1 => Ok(()),
        scheme => Err(refuse(
            format!("`{mirror}` is not a mirror mmdebstrap can read (`{scheme}`)"),
            hint,
        )),
    }
}

/// A suite or codename: `bookworm`, `stable`, `bookworm-backports`.
pub fn debian_suite(suite: &str) -> Result<(), Refusal> {
    let ok = suite.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && suite
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c));
    if ok {
        return Ok(());
    }
    Err(refuse(
        format!("`{suite}` is not a Debian suite name"),
        "write a codename or suite such as `bookworm`, `trixie` or `stable`",
    ))
}

/// mmdebstrap's variants (`man mmdebstrap`).
const DEBIAN_VARIANTS: [&str; 11] = [
    "extract",
    "custom",
    "essential",
    "apt",
    "required",
    "minbase",
    "buildd",
    "important",
    "debootstrap",
    "standard",
    "-",
];

pub fn debian_variant(variant: &str) -> Result<(), Refusal> {
    if DEBIAN_VARIANTS.contains(&variant) {
        return Ok(());
    }
    Err(refuse(
        format!("`{variant}` is not an mmdebstrap variant"),
        format!(
            "use one of {} (farm's default is `minbase`)",
            DEBIAN_VARIANTS.map(|v| format!("`{v}`")).join(", ")
        ),
    ))
}

/// A package as `apt-get install` takes it: a Debian package name (lower-case letters,
/// digits, `+`, `-`, `.`, starting with a letter or digit, two characters at least),
/// optionally `:arch`, then `=version` or `/release`. Anything else fails inside the build
/// VM, and a leading `-` would be read as an option.
pub fn package(spec: &str) -> Result<(), Refusal> {
    let (name_arch, pin) = match spec.find(['=', '/']) {
        Some(i) => (&spec[..i], Some(&spec[i + 1..])),
        None => (spec, None),
    };
    let (name, arch) = match name_arch.split_once(':') {
        Some((name, arch)) => (name, Some(arch)),
        None => (name_arch, None),
    };
    let name_ok = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    let arch_ok = arch.is_none_or(|a| {
        !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    });
    let pin_ok = pin.is_none_or(|p| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.~:".contains(c))
    });
    if name_ok && arch_ok && pin_ok {
        return Ok(());
    }
    Err(refuse(
        format!("`{spec}` is not a Debian package"),
        "write a package name such as `qemu-utils`, optionally with `=VERSION` or `/RELEASE`",
    ))
}

/// A MAC a NIC can keep: unicast (a multicast address cannot be a NIC's; guests replace
/// it and the seed's NIC is never found) and not all zeros.
pub fn nic_mac(mac: &MacAddr) -> Result<(), Refusal> {
    if mac.0 == [0; 6] {
        return Err(refuse(
            format!("`{mac}` is not a NIC's address"),
            "leave `mac` out (farm derives a stable one) or use QEMU's prefix: `52:54:00:…`",
        ));
    }
    if mac.0[0] & 1 == 1 {
        return Err(refuse(
            format!("`{mac}` is a multicast address, which a NIC cannot have"),
            "the first byte must be even: leave `mac` out, or use QEMU's prefix `52:54:00:…`",
        ));
    }
    Ok(())
}

/// An address a NIC can have in its subnet: neither the network's own address nor its
/// broadcast address (IPv4, prefixes up to /30).
pub fn host_address(address: &IpCidr) -> Result<(), Refusal> {
    let IpAddr::V4(v4) = address.addr else {
        return Ok(());
    };
    if address.prefix > 30 {
        return Ok(());
    }
    let bits = u32::from(v4);
    let host_mask = u32::MAX >> address.prefix;
    let what = match bits & host_mask {
        0 => "the network's own address",
        m if m == host_mask => "the subnet's broadcast address",
        _ => return Ok(()),
    };
    Err(refuse(
        format!("`{address}` is {what}, not a host's"),
        "pick an address between the first and the last of the subnet",
    ))
}

/// The machine types qemu 7.2 knows for an architecture (`qemu-system-* -machine help`),
/// without the versioned aliases, which are accepted by prefix.
fn machines(arch: Arch) -> (&'static [&'static str], &'static [&'static str]) {
    match arch {
        Arch::X86_64 => (
            &["q35", "pc", "microvm", "isapc", "x-remote", "none"],
            &["pc-q35-", "pc-i440fx-"],
        ),
        Arch::Aarch64 => (
            &[
                "virt",
                "sbsa-ref",
                "none",
                "raspi3b",
                "raspi3ap",
                "xlnx-zcu102",
                "xlnx-versal-virt",
                "sabrelite",
                "mcimx7d-sabre",
                "mcimx6ul-evk",
                "npcm750-evb",
                "ast2600-evb",
                "fby35",
                "imx25-pdk",
            ],
            &["virt-"],
        ),
    }
}

pub fn machine(arch: Arch, name: &str) -> Result<(), Refusal> {
    let (names, prefixes) = machines(arch);
    if names.contains(&name) || prefixes.iter().any(|p| name.starts_with(p)) {
        return Ok(());
    }
    Err(refuse(
        format!("qemu has no machine type `{name}` for {arch}"),
        format!(
            "leave `machine` out for the default ({}), or use one of: {}",
            names[0],
            names.iter().take(4).copied().collect::<Vec<_>>().join(", ")
        ),
    ))
}

/// The key types OpenSSH's `authorized_keys` takes.
const KEY_TYPES: [&str; 9] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-ed448",
];

/// Checks an `authorized_keys` file's content: public keys only. A private key above all
/// is refused: it would be baked into a layer that anyone with the store can read.
pub fn public_keys(file: &str, text: &str) -> Result<usize, Refusal> {
    if text.contains("PRIVATE KEY-----") {
        return Err(refuse(
            format!("`{file}` is a private key"),
            format!(
                "`authorized_keys` takes public keys (`{file}.pub`): a private key would be written into a layer anyone with the store can read"
            ),
        ));
    }
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            words.windows(2).any(|w| {
                KEY_TYPES.contains(&w[0])
                    && w[1].len() > 16
                    && w[1]
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
            })
        })
        .count();
    if keys == 0 {
        return Err(refuse(
            format!("`{file}` holds no OpenSSH public key"),
            "give a file with lines like `ssh-ed25519 AAAA… comment` (what `ssh-keygen` writes to `*.pub`)",
        ));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_need_units_and_bounds() {
        assert_eq!(size("memory", "2G", MEMORY).unwrap(), ByteSize(2 << 30));
        let bare = size("memory", "1024", MEMORY).unwrap_err();
        assert_eq!(bare.message, "`memory = 1024` has no unit");
        assert!(
            bare.hint.contains("`memory = \"1024M\"` or `\"1G\"`"),
            "{}",
            bare.hint
        );
        assert!(
            size("memory", "0", MEMORY)
                .unwrap_err()
                .message
                .contains("no unit")
        );
        assert_eq!(
            size("memory", "100T", MEMORY).unwrap_err().message,
            "`memory = \"100T\"` is more than a VM can use"
        );
        assert_eq!(
            size("disk_size", "1K", DISK_SIZE).unwrap_err().hint,
            "disk_size goes from 64M to 64T"
        );
        assert_eq!(
            size("memory", "65537K", MEMORY).unwrap_err().message,
            "`memory = \"65537K\"` is not a whole number of MiB"
        );
        assert!(size("disk_size", "65537K", DISK_SIZE).is_ok());
        assert!(cpus(0).is_err() && cpus(100_000).is_err() && cpus(4).is_ok());
        assert!(port("ssh_port", 0).is_err() && port("ssh_port", 2201).is_ok());
    }

    #[test]
    fn names_addresses_and_urls() {
        assert!(hostname("web-1.lab").is_ok());
        for bad in [
            "bad_host name!",
            "web-",
            "-web",
            &"a".repeat(64),
            &"a.".repeat(130),
        ] {
            assert!(hostname(bad).is_err(), "{bad}");
        }
        assert!(login("ops").is_ok() && login("Ops").is_err() && login("1x").is_err());
        assert!(guest_path("/etc/motd").is_ok());
        assert!(guest_path("etc/motd").is_err() && guest_path("").is_err());
        assert!(vde_url("vxvde://234.0.0.1/if=nic1").is_ok());
        assert!(vde_url("http://x").is_err() && vde_url("234.0.0.1").is_err());
        assert!(image_url("https://x/y.qcow2").is_ok() && image_url("ftp://x/y").is_err());
        assert!(nic_mac(&"52:54:00:00:00:01".parse().unwrap()).is_ok());
        assert!(nic_mac(&"01:00:5e:00:00:01".parse().unwrap()).is_err());
        assert!(nic_mac(&"00:00:00:00:00:00".parse().unwrap()).is_err());
        assert!(host_address(&"10.0.0.0/24".parse().unwrap()).is_err());
        assert!(host_address(&"10.0.0.255/24".parse().unwrap()).is_err());
        assert!(host_address(&"10.0.0.1/24".parse().unwrap()).is_ok());
        assert!(machine(Arch::X86_64, "q35").is_ok());
        assert!(machine(Arch::X86_64, "pc-q35-7.2").is_ok());
        assert!(machine(Arch::Aarch64, "q35").is_err());
        assert!(machine(Arch::Aarch64, "virt-7.2").is_ok());
    }

    #[test]
    fn key_files_must_hold_public_keys() {
        let public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHzq me@here\n";
        assert_eq!(public_keys("k.pub", public), Ok(1));
        let private =
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n-----END OPENSSH PRIVATE KEY-----\n";
        assert_eq!(
            public_keys("k", private).unwrap_err().message,
            "`k` is a private key"
        );
        assert!(public_keys("notes.txt", "hello\n").is_err());
        let with_options = "from=\"10.0.0.1\" ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ x\n";
        assert_eq!(public_keys("k.pub", with_options), Ok(1));
    }
}
