//! NoCloud seed volumes: the per-instance facts (hostname, keys, host key, addresses) a VM
//! reads on its first boot.
//!
//! The volume is a small FAT filesystem labelled `cidata`, written in pure Rust with the
//! `fatfs` crate so neither farm nor a remote hypervisor needs `mkfs.vfat`, `mtools` or
//! `genisoimage` at run time. It carries the same facts twice:
//!
//! - `meta-data`, `user-data` and `network-config` for real cloud-init, so stock cloud images
//!   (Debian genericcloud, Ubuntu) configure themselves from it;
//! - a `farm/` directory with one fact per file in a trivially parseable form, read by farm's
//!   own first-boot agent (`src/guest_agent/farm-seed.sh`) in the Debian images farm builds,
//!   which have no cloud-init: parsing YAML in POSIX shell is not something to rely on.
//!
//! Pure: [`render_files`] gives the files and [`seed_image_bytes`] the whole volume in
//! memory, which callers write (locally, or onto a remote hypervisor) as they need.

use std::io::{self, Cursor, Write};
use std::net::IpAddr;

use crate::model::values::{IpCidr, MacAddr};

/// The size of every seed image. 2 MiB holds the few KiB of text with room to spare, and is
/// small enough that copying it to a remote hypervisor for each instance costs nothing.
pub const SEED_IMAGE_BYTES: u64 = 2 * 1024 * 1024;

/// The volume label cloud-init's NoCloud data source and farm's agent look for.
pub const SEED_LABEL: &str = "cidata";

/// Everything one instance's seed says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedSpec {
    /// Changing it makes cloud-init treat the next boot as a first boot again.
    pub instance_id: String,
    pub hostname: String,
    /// The account that gets `authorized_keys`; `root` unless set otherwise.
    pub user: String,
    /// OpenSSH public key lines (`ssh-ed25519 AAAA… comment`).
    pub authorized_keys: Vec<String>,
    /// An ed25519 host key pair (private key in OpenSSH PEM form, public key line). Given,
    /// it replaces the keys the image would generate, so farm can pin it in `known_hosts`
    /// before the VM ever boots and never has to trust on first use.
    pub host_key: Option<(String, String)>,
    pub nics: Vec<SeedNic>,
    /// A build VM's seed: cloud-init runs its init modules only (network, users, keys,
    /// growpart). The image's config and final modules (locale, apt sources, grub-dpkg,
    /// keys to the console, …) run at each instance's first boot, where they belong; in a
    /// build VM under TCG they cost ~10 s of every cold build for nothing.
    pub init_modules_only: bool,
}

/// How one NIC, recognised by its MAC address, gets its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedNic {
    pub mac: MacAddr,
    /// A static address; `None` means DHCP.
    pub address: Option<IpCidr>,
    /// The default route through this NIC; only meaningful with a static address.
    pub gateway: Option<IpAddr>,
}

impl SeedSpec {
    /// A seed for `root` with no keys and no NICs; fill in the rest field by field.
    pub fn new(instance_id: impl Into<String>, hostname: impl Into<String>) -> Self {
        Self {
            instance_id: instance_id.into(),
            hostname: hostname.into(),
            user: "root".to_string(),
            authorized_keys: Vec::new(),
            host_key: None,
            nics: Vec::new(),
            init_modules_only: false,
        }
    }

    /// Rejects values that would break the line-oriented `farm/` files or the guest's
    /// configuration (a newline in a key would smuggle an extra line into
    /// `authorized_keys`), before anything is written.
    pub fn validate(&self) -> Result<(), SeedError> {
        let invalid = |field: &'static str, value: &str, reason: &str| SeedError::Invalid {
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        };
        if self.instance_id.is_empty()
            || self.instance_id.len() > 128
            || !self
                .instance_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(invalid(
                "instance id",
                &self.instance_id,
                "use 1 to 128 letters, digits, `-`, `_`, `.` or `:`",
            ));
        }
        if !crate::model::config::limits::is_hostname(&self.hostname) {
            return Err(invalid(
                "hostname",
                &self.hostname,
                "use dot-separated labels of 1 to 63 letters, digits and inner `-`",
            ));
        }
        let user_ok = !self.user.is_empty()
            && self.user.len() <= 32
            && self
                .user
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && self
                .user
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c));
        if !user_ok {
            return Err(invalid(
                "user",
                &self.user,
                "use a lower-case login name such as `root` or `farm`",
            ));
        }
        for key in &self.authorized_keys {
            if key.trim().is_empty() || key.contains(['\n', '\r']) {
                return Err(invalid(
                    "authorized key",
                    key,
                    "give one OpenSSH public key per entry, on a single line",
                ));
            }
        }
        if let Some((private, public)) = &self.host_key {
            if !private.contains("-----BEGIN OPENSSH PRIVATE KEY-----") {
                return Err(invalid(
                    "host private key",
                    "<redacted>",
                    "expected an OpenSSH private key (`ssh-keygen -t ed25519`)",
                ));
            }
            if !public.trim().starts_with("ssh-ed25519 ") || public.trim().contains(['\n', '\r']) {
                return Err(invalid(
                    "host public key",
                    public,
                    "expected one `ssh-ed25519 AAAA…` line",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("Invalid seed {field} `{value}`: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "The seed's files do not fit in a {size} byte FAT volume: {source}\nhint: keep seed files small (keys and addresses only)"
    )]
    Fat {
        size: u64,
        #[source]
        source: io::Error,
    },
}

/// A string as a YAML double-quoted scalar. JSON string syntax is a subset of YAML's, so
/// serde_json's escaping is exactly right and handles quotes, backslashes and control bytes.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serialises")
}

/// The files of the seed, path (with `/` separators) and content, in a fixed order.
///
/// Call [`SeedSpec::validate`] first; rendering itself never fails.
pub fn render_files(spec: &SeedSpec) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |path: &str, text: String| files.push((path.to_string(), text.into_bytes()));

    add(
        "meta-data",
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            yaml_str(&spec.instance_id),
            yaml_str(&spec.hostname)
        ),
    );
    add("user-data", render_user_data(spec));
    if !spec.nics.is_empty() {
        add("network-config", render_network_config(&spec.nics));
    }

    add("farm/instance-id", format!("{}\n", spec.instance_id));
    add("farm/hostname", format!("{}\n", spec.hostname));
    add("farm/user", format!("{}\n", spec.user));
    add("farm/authorized_keys", lines(&spec.authorized_keys));
    if let Some((private, public)) = &spec.host_key {
        add("farm/ssh_host_ed25519_key", with_newline(private));
        add("farm/ssh_host_ed25519_key.pub", with_newline(public.trim()));
    }
    if !spec.nics.is_empty() {
        let network: Vec<String> = spec.nics.iter().map(farm_network_line).collect();
        add("farm/network", lines(&network));
    }
    files
}

/// `MAC dhcp`, `MAC ADDRESS/PREFIX GATEWAY` or `MAC ADDRESS/PREFIX` (no gateway): what the
/// agent reads with a plain `read mac addr gw`.
fn farm_network_line(nic: &SeedNic) -> String {
    match (nic.address, nic.gateway) {
        (None, _) => format!("{} dhcp", nic.mac),
        (Some(address), Some(gateway)) => format!("{} {address} {gateway}", nic.mac),
        (Some(address), None) => format!("{} {address}", nic.mac),
    }
}

fn lines(items: &[String]) -> String {
    items.iter().map(|l| format!("{}\n", l.trim())).collect()
}

fn with_newline(text: &str) -> String {
    if text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    }
}

fn yaml_list(indent: &str, items: &[String]) -> String {
    if items.is_empty() {
        return " []\n".to_string();
    }
    let mut out = "\n".to_string();
    for item in items {
        out.push_str(&format!("{indent}- {}\n", yaml_str(item.trim())));
    }
    out
}

fn render_user_data(spec: &SeedSpec) -> String {
    let mut out = String::from("#cloud-config\n");
    out.push_str(&format!("hostname: {}\n", yaml_str(&spec.hostname)));
    out.push_str("preserve_hostname: false\n");
    out.push_str("ssh_pwauth: false\n");
    if spec.user == "root" {
        // cloud-init gives the top-level keys to the image's default user and, with
        // `disable_root: false`, to root as plain keys (not a "log in as debian" stub).
        out.push_str("disable_root: false\n");
        out.push_str("ssh_authorized_keys:");
        out.push_str(&yaml_list("  ", &spec.authorized_keys));
    } else {
        // Listing only this user (no `default`) creates no distribution default user.
        out.push_str("users:\n");
        out.push_str(&format!("  - name: {}\n", yaml_str(&spec.user)));
        out.push_str("    shell: /bin/bash\n");
        out.push_str("    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n");
        out.push_str("    lock_passwd: true\n");
        out.push_str("    ssh_authorized_keys:");
        out.push_str(&yaml_list("      ", &spec.authorized_keys));
    }
    if let Some((private, public)) = &spec.host_key {
        out.push_str("ssh_keys:\n");
        out.push_str("  ed25519_private: |\n");
        for line in private.trim_end().lines() {
            out.push_str(&format!("    {line}\n"));
        }
        out.push_str(&format!("  ed25519_public: {}\n", yaml_str(public.trim())));
        // Generate no other host key types: the client pins only the ed25519 key, which is
        // there, so nothing is generated. (`[]` fails cloud-init's schema: minItems 1.)
        out.push_str("ssh_genkeytypes: [ed25519]\n");
    }
    if spec.init_modules_only {
        // One cheap module each (an empty list is not a list cloud-init runs happily).
        out.push_str("cloud_config_modules: [runcmd]\n");
        out.push_str("cloud_final_modules: [scripts-user]\n");
    }
    // No `runcmd`: cloud-init's schema rejects an empty list, and farm runs no commands here.
    out
}

fn render_network_config(nics: &[SeedNic]) -> String {
    let mut out = String::from("version: 2\nethernets:\n");
    for (index, nic) in nics.iter().enumerate() {
        out.push_str(&format!("  nic{index}:\n"));
        out.push_str("    match:\n");
        out.push_str(&format!(
            "      macaddress: {}\n",
            yaml_str(&nic.mac.to_string())
        ));
        match nic.address {
            None => out.push_str("    dhcp4: true\n"),
            Some(address) => {
                out.push_str("    dhcp4: false\n");
                out.push_str(&format!(
                    "    addresses:\n      - {}\n",
                    yaml_str(&address.to_string())
                ));
                if let Some(gateway) = nic.gateway {
                    // Deprecated in netplan, but the form Debian 12's cloud-init 22.4 renders
                    // right: it crashes on `routes: [{to: default}]` and turns `to: ::/0`
                    // into `::/64` (checked with `cloud-init devel net-convert`).
                    let key = if gateway.is_ipv4() {
                        "gateway4"
                    } else {
                        "gateway6"
                    };
                    out.push_str(&format!("    {key}: {}\n", yaml_str(&gateway.to_string())));
                }
            }
        }
    }
    out
}

/// The FAT volume label: `cidata` padded with spaces to the 11 bytes FAT stores. Lower case
/// is kept as written (blkid reports it verbatim); cloud-init accepts `cidata` and `CIDATA`.
fn fat_label() -> [u8; 11] {
    let mut label = [b' '; 11];
    label[..SEED_LABEL.len()].copy_from_slice(SEED_LABEL.as_bytes());
    label
}

/// The whole seed image in memory, [`SEED_IMAGE_BYTES`] long.
///
/// Without fatfs's `chrono` feature every timestamp is the FAT epoch, so the same spec always
/// gives the same bytes.
pub fn seed_image_bytes(spec: &SeedSpec) -> Result<Vec<u8>, SeedError> {
    spec.validate()?;
    let fat = |source| SeedError::Fat {
        size: SEED_IMAGE_BYTES,
        source,
    };
    let mut disk = Cursor::new(vec![0u8; SEED_IMAGE_BYTES as usize]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new().volume_label(fat_label()),
    )
    .map_err(fat)?;
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(fat)?;
        {
            let root = fs.root_dir();
            for (path, content) in render_files(spec) {
                // fatfs takes `/`-separated paths; `create_dir` opens a directory that exists.
                if let Some((dirs, _)) = path.rsplit_once('/') {
                    root.create_dir(dirs).map_err(fat)?;
                }
                let mut file = root.create_file(&path).map_err(fat)?;
                file.truncate().map_err(fat)?;
                file.write_all(&content).map_err(fat)?;
                file.flush().map_err(fat)?;
            }
        }
        fs.unmount().map_err(fat)?;
    }
    Ok(disk.into_inner())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    const HOST_PRIVATE: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
    const HOST_PUBLIC: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHost farm-host";

    fn spec() -> SeedSpec {
        let mut spec = SeedSpec::new("vm-1", "debian-vs");
        spec.authorized_keys = vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUser me@laptop".into()];
        spec.host_key = Some((HOST_PRIVATE.into(), HOST_PUBLIC.into()));
        spec.nics = vec![
            SeedNic {
                mac: "52:54:00:00:00:01".parse().unwrap(),
                address: None,
                gateway: None,
            },
            SeedNic {
                mac: "52:54:00:00:00:02".parse().unwrap(),
                address: Some("10.0.0.21/24".parse().unwrap()),
                gateway: Some("10.0.0.254".parse().unwrap()),
            },
            SeedNic {
                mac: "52:54:00:00:00:03".parse().unwrap(),
                address: Some("fd00::5/64".parse().unwrap()),
                gateway: None,
            },
        ];
        spec
    }

    fn file(files: &[(String, Vec<u8>)], path: &str) -> String {
        let (_, content) = files
            .iter()
            .find(|(p, _)| p == path)
            .unwrap_or_else(|| panic!("no {path}"));
        String::from_utf8(content.clone()).unwrap()
    }

    #[test]
    fn a_build_vms_seed_runs_only_cloud_inits_init_modules() {
        let user_data = |spec: &SeedSpec| file(&render_files(spec), "user-data");
        let mut build = spec();
        assert!(!user_data(&build).contains("cloud_config_modules"));
        build.init_modules_only = true;
        let text = user_data(&build);
        assert!(
            text.contains("cloud_config_modules: [runcmd]\ncloud_final_modules: [scripts-user]\n"),
            "{text}"
        );
    }

    #[test]
    fn renders_cloud_init_files() {
        let files = render_files(&spec());
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "meta-data",
                "user-data",
                "network-config",
                "farm/instance-id",
                "farm/hostname",
                "farm/user",
                "farm/authorized_keys",
                "farm/ssh_host_ed25519_key",
                "farm/ssh_host_ed25519_key.pub",
                "farm/network",
            ]
        );
        assert_eq!(
            file(&files, "meta-data"),
            "instance-id: \"vm-1\"\nlocal-hostname: \"debian-vs\"\n"
        );
        assert_eq!(
            file(&files, "user-data"),
            "#cloud-config\n\
             hostname: \"debian-vs\"\n\
             preserve_hostname: false\n\
             ssh_pwauth: false\n\
             disable_root: false\n\
             ssh_authorized_keys:\n\
             \x20 - \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUser me@laptop\"\n\
             ssh_keys:\n\
             \x20 ed25519_private: |\n\
             \x20   -----BEGIN OPENSSH PRIVATE KEY-----\n\
             \x20   b3BlbnNzaC1rZXktdjEAAAAA\n\
             \x20   -----END OPENSSH PRIVATE KEY-----\n\
             \x20 ed25519_public: \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHost farm-host\"\n\
             ssh_genkeytypes: [ed25519]\n"
        );
        assert_eq!(
            file(&files, "network-config"),
            "version: 2\n\
             ethernets:\n\
             \x20 nic0:\n\
             \x20   match:\n\
             \x20     macaddress: \"52:54:00:00:00:01\"\n\
             \x20   dhcp4: true\n\
             \x20 nic1:\n\
             \x20   match:\n\
             \x20     macaddress: \"52:54:00:00:00:02\"\n\
             \x20   dhcp4: false\n\
             \x20   addresses:\n\
             \x20     - \"10.0.0.21/24\"\n\
             \x20   gateway4: \"10.0.0.254\"\n\
             \x20 nic2:\n\
             \x20   match:\n\
             \x20     macaddress: \"52:54:00:00:00:03\"\n\
             \x20   dhcp4: false\n\
             \x20   addresses:\n\
             \x20     - \"fd00::5/64\"\n"
        );
    }

    #[test]
    fn renders_farm_agent_files() {
        let files = render_files(&spec());
        assert_eq!(file(&files, "farm/hostname"), "debian-vs\n");
        assert_eq!(file(&files, "farm/user"), "root\n");
        assert_eq!(
            file(&files, "farm/authorized_keys"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUser me@laptop\n"
        );
        assert_eq!(file(&files, "farm/ssh_host_ed25519_key"), HOST_PRIVATE);
        assert_eq!(
            file(&files, "farm/ssh_host_ed25519_key.pub"),
            format!("{HOST_PUBLIC}\n")
        );
        assert_eq!(
            file(&files, "farm/network"),
            "52:54:00:00:00:01 dhcp\n\
             52:54:00:00:00:02 10.0.0.21/24 10.0.0.254\n\
             52:54:00:00:00:03 fd00::5/64\n"
        );
    }

    #[test]
    fn minimal_spec_has_no_optional_files() {
        let files = render_files(&SeedSpec::new("i", "h"));
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "meta-data",
                "user-data",
                "farm/instance-id",
                "farm/hostname",
                "farm/user",
                "farm/authorized_keys"
            ]
        );
        assert!(file(&files, "user-data").contains("ssh_authorized_keys: []\n"));
        assert!(!file(&files, "user-data").contains("ssh_keys"));
    }

    #[test]
    fn non_root_user_gets_a_users_entry() {
        let mut spec = spec();
        spec.user = "farm".into();
        let user_data = file(&render_files(&spec), "user-data");
        assert!(user_data.contains("users:\n  - name: \"farm\"\n"));
        assert!(user_data.contains(
            "    ssh_authorized_keys:\n      - \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUser me@laptop\"\n"
        ));
        assert!(!user_data.contains("disable_root"));
    }

    #[test]
    fn rejects_values_that_would_break_the_files() {
        /// Breaks one field of a valid spec.
        type Break = fn(&mut SeedSpec);
        let cases: Vec<(&str, Break)> = vec![
            ("hostname", |s| s.hostname = "bad_name".into()),
            ("hostname", |s| s.hostname = "-x".into()),
            ("instance id", |s| s.instance_id = "a\nb".into()),
            ("user", |s| s.user = "Root".into()),
            ("authorized key", |s| {
                s.authorized_keys.push("ssh-ed25519 A\nssh-rsa B".into())
            }),
            ("host public key", |s| {
                s.host_key = Some((HOST_PRIVATE.into(), "ssh-rsa AAAA".into()))
            }),
            ("host private key", |s| {
                s.host_key = Some(("nope".into(), HOST_PUBLIC.into()))
            }),
        ];
        for (field, break_it) in cases {
            let mut spec = spec();
            break_it(&mut spec);
            match spec.validate() {
                Err(SeedError::Invalid { field: got, .. }) => assert_eq!(got, field),
                other => panic!("expected invalid {field}, got {other:?}"),
            }
        }
        assert!(spec().validate().is_ok());
        assert!(SeedSpec::new("i-1", "host.example.org").validate().is_ok());
    }

    #[test]
    fn image_reads_back_with_label_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        fs_err::write(&path, seed_image_bytes(&spec()).unwrap()).unwrap();
        assert_eq!(fs_err::metadata(&path).unwrap().len(), SEED_IMAGE_BYTES);

        let image = fs_err::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(image, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "cidata");
        let root = fs.root_dir();
        for (path, content) in render_files(&spec()) {
            let mut read = Vec::new();
            root.open_file(&path)
                .unwrap_or_else(|e| panic!("{path}: {e}"))
                .read_to_end(&mut read)
                .unwrap();
            assert_eq!(read, content, "{path}");
        }
    }

    #[test]
    fn image_bytes_are_deterministic() {
        assert_eq!(
            seed_image_bytes(&spec()).unwrap(),
            seed_image_bytes(&spec()).unwrap()
        );
    }
}
