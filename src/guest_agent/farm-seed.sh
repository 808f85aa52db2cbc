#!/bin/sh
# farm-seed: farm's first-boot agent for the Debian images farm builds (which have no
# cloud-init). Run by farm-seed.service on every boot, before the network is configured and
# before sshd starts, it applies the `farm/` directory of the NoCloud seed volume with the
# steps of /usr/lib/farm/seed-lib.sh (shared with the tiny image), plus what is Debian's
# own: OpenSSH takes the seeded host key, systemd-networkd the NIC addresses, and the root
# filesystem grows to the disk.
#
# Every step replaces what the previous boot wrote, so running it again is harmless. Without
# a seed it changes nothing, except that sshd gets host keys if the image has none (farm
# removes the build host's keys from the image).
set -eu

MOUNT=/run/farm-seed/mnt
NETDIR=/run/systemd/network
. /usr/lib/farm/seed-lib.sh

ensure_host_keys() {
    # sshd refuses to start without a host key. The image's sshd serves only ed25519
    # (/etc/ssh/sshd_config.d/farm.conf), so make just that one: an RSA key takes seconds
    # under TCG.
    if [ ! -f /etc/ssh/ssh_host_ed25519_key ]; then
        log "no seeded host key: generating an ed25519 host key"
        ssh-keygen -q -t ed25519 -N '' -C "root@$(cat /proc/sys/kernel/hostname)" -f /etc/ssh/ssh_host_ed25519_key
    fi
}

apply_host_key() {
    [ -f "$MOUNT/farm/ssh_host_ed25519_key" ] || return 0
    # Only the pinned key may answer: remove every other host key so no client can be
    # offered a key farm did not pin.
    rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
    install -m 0600 -o root -g root "$MOUNT/farm/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
    install -m 0644 -o root -g root "$MOUNT/farm/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
    log "installed the seeded ed25519 host key"
}

# One networkd unit per seeded NIC, matched by MAC. networkd has not started yet, so the
# link is still down and can be renamed; a NIC that is not there yet still gets its unit.
network_unit() {
    name_nic "$2" "nic$1" >/dev/null || true
    unit="$NETDIR/10-farm-$(echo "$2" | tr -d ':').network"
    {
        echo "[Match]"
        # Type=ether keeps bridges and VLANs that inherit this MAC from matching.
        echo "Type=ether"
        echo "MACAddress=$2"
        echo
        echo "[Network]"
        if [ "$3" = dhcp ]; then
            echo "DHCP=ipv4"
        else
            echo "Address=$3"
            if [ -n "$4" ]; then echo "Gateway=$4"; fi
        fi
    } > "$unit"
    log "network nic$1 ($2) $3${4:+ via $4}"
}

apply_network() {
    mkdir -p "$NETDIR"
    rm -f "$NETDIR"/10-farm-*.network
    [ -f "$MOUNT/farm/network" ] || return 0
    for_each_seed_nic network_unit
}

apply_seed_here() {
    apply_hostname
    apply_authorized_keys
    apply_host_key
    apply_network
}

# An instance's overlay may be larger than the image it was made from (`disk_size`): grow
# the root filesystem to the disk. Images farm builds have ext4 directly on /dev/vda; online
# growth of a mounted ext4 needs nothing else. A no-op when the sizes already match.
grow_root() {
    [ "$(findmnt -no SOURCE / 2>/dev/null)" = /dev/vda ] || return 0
    command -v resize2fs >/dev/null 2>&1 || return 0
    resize2fs /dev/vda >/dev/null 2>&1 && log "root filesystem fills /dev/vda"
}

main() {
    grow_root || true
    trap 'umount "$MOUNT" 2>/dev/null || true' EXIT
    if ! with_seed; then
        # The device may not have been announced yet this early in boot.
        udevadm settle --timeout=10 2>/dev/null || true
        with_seed || log "no seed volume labelled cidata: nothing to apply"
    fi
    trap - EXIT
    ensure_host_keys
}

main "$@"
