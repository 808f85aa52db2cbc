#!/bin/sh
# Run by farm as mmdebstrap's last --customize-hook: `sh customize-rootfs.sh ROOTFS AGENT_DIR`.
# Turns the freshly bootstrapped tree into an image farm can boot and seed:
# ext4 on /dev/vda with direct kernel boot, farm's seed agent instead of cloud-init,
# systemd-networkd for addresses, no identity baked in (machine-id, host keys, hostname).
set -eu

root=$1
agent=$2

# The seed agent, run early at every boot, and the library it shares with the tiny image.
install -D -m 0755 "$agent/farm-seed.sh" "$root/usr/local/sbin/farm-seed"
install -D -m 0644 "$agent/seed-lib.sh" "$root/usr/lib/farm/seed-lib.sh"
install -D -m 0644 "$agent/farm-seed.service" "$root/etc/systemd/system/farm-seed.service"
chroot "$root" systemctl enable farm-seed.service systemd-networkd.service

# NICs the seed does not mention (or every NIC, without a seed) still get DHCP, so an
# unseeded image is reachable through QEMU user networking. The seed's per-MAC files in
# /run/systemd/network/10-farm-*.network sort first and win.
mkdir -p "$root/etc/systemd/network"
cat > "$root/etc/systemd/network/99-farm-default.network" <<'EOF'
[Match]
Type=ether
Name=!veth* vnet* tap* vde*

[Network]
DHCP=ipv4
EOF

# /etc/fstab and the initramfs fsck setting were written by farm's --essential-hook, before
# the kernel package built the initramfs.

# No identity from the build: systemd makes a machine-id at first boot, the seed agent sets
# the hostname and installs farm's pinned host key (or generates keys without a seed).
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
echo debian > "$root/etc/hostname"
rm -f "$root"/etc/ssh/ssh_host_*_key "$root"/etc/ssh/ssh_host_*_key.pub

# mmdebstrap copies the build host's resolv.conf; names resolve through systemd-resolved,
# which learns the DNS server from DHCP.
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

# Root logs in with a key (never a password); sshd serves only the ed25519 key farm pins.
mkdir -p "$root/etc/ssh/sshd_config.d"
cat > "$root/etc/ssh/sshd_config.d/farm.conf" <<'EOF'
PermitRootLogin prohibit-password
PasswordAuthentication no
HostKey /etc/ssh/ssh_host_ed25519_key
PrintMotd yes
EOF
# sshd shows /etc/motd itself (above): PAM's motd module runs the update-motd.d scripts at
# every session, which under TCG costs a third of a second per ssh command farm runs.
sed -i 's/^session[[:space:]]\+optional[[:space:]]\+pam_motd\.so/#&/' "$root/etc/pam.d/sshd"

# Nobody answers a console wizard on a farm VM: it would stop the first boot for good.
ln -sf /dev/null "$root/etc/systemd/system/systemd-firstboot.service"
