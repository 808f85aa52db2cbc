#!/bin/sh
# farm-seed: farm's first-boot agent for the Debian images farm builds (which have no
# cloud-init). Run by farm-seed.service on every boot, before the network is configured and
# before sshd starts, it applies the `farm/` directory of the NoCloud seed volume (label
# `cidata`, written by farm's src/seed.rs):
#
#   farm/hostname                      the host name
#   farm/user, farm/authorized_keys    keys that may log in as that user
#   farm/ssh_host_ed25519_key[.pub]    the host key farm already pinned in known_hosts
#   farm/network                       one NIC per line (the Nth is renamed nicN): `MAC dhcp`,
#                                      `MAC ADDRESS/PREFIX GATEWAY` or `MAC ADDRESS/PREFIX`
#
# Every step replaces what the previous boot wrote, so running it again is harmless. Without
# a seed it changes nothing, except that sshd gets host keys if the image has none (farm
# removes the build host's keys from the image).
set -eu

MOUNT=/run/farm-seed/mnt
NETDIR=/run/systemd/network
KEYS_BEGIN='# farm-seed: keys from the seed volume (replaced at every boot)'
KEYS_END='# farm-seed: end'

log() { echo "farm-seed: $*"; }

find_seed() {
    blkid -L cidata 2>/dev/null && return 0
    [ -e /dev/disk/by-label/cidata ] && { echo /dev/disk/by-label/cidata; return 0; }
    return 1
}

ensure_host_keys() {
    # sshd refuses to start without a host key. The image's sshd serves only ed25519
    # (/etc/ssh/sshd_config.d/farm.conf), so make just that one: an RSA key takes seconds
    # under TCG.
    if [ ! -f /etc/ssh/ssh_host_ed25519_key ]; then
        log "no seeded host key: generating an ed25519 host key"
        ssh-keygen -q -t ed25519 -N '' -C "root@$(cat /proc/sys/kernel/hostname)" -f /etc/ssh/ssh_host_ed25519_key
    fi
}

apply_hostname() {
    name=$(tr -d ' \t\r\n' < "$MOUNT/farm/hostname")
    [ -n "$name" ] || return 0
    short=${name%%.*}
    echo "$name" > /etc/hostname
    echo "$name" > /proc/sys/kernel/hostname
    # Let the host resolve its own name (sudo, hostname -f) without DNS.
    if grep -q '^127\.0\.1\.1[[:space:]]' /etc/hosts 2>/dev/null; then
        sed -i "s/^127\.0\.1\.1[[:space:]].*/127.0.1.1\t$name $short/" /etc/hosts
    else
        printf '127.0.1.1\t%s %s\n' "$name" "$short" >> /etc/hosts
    fi
    log "hostname $name"
}

apply_authorized_keys() {
    [ -f "$MOUNT/farm/authorized_keys" ] || return 0
    user=root
    if [ -f "$MOUNT/farm/user" ]; then user=$(tr -d ' \t\r\n' < "$MOUNT/farm/user"); fi
    if ! getent passwd "$user" >/dev/null; then
        useradd --create-home --shell /bin/bash "$user"
        log "created user $user"
    fi
    home=$(getent passwd "$user" | cut -d: -f6)
    group=$(id -gn "$user")
    install -d -m 0700 -o "$user" -g "$group" "$home/.ssh"
    file="$home/.ssh/authorized_keys"
    # Keep keys that do not come from the seed (e.g. baked into a platform layer): only the
    # block between the farm-seed markers is replaced.
    tmp="$file.farm-seed.tmp"
    {
        if [ -f "$file" ]; then
            sed "/^$KEYS_BEGIN\$/,/^$KEYS_END\$/d" "$file"
        fi
        echo "$KEYS_BEGIN"
        cat "$MOUNT/farm/authorized_keys"
        echo "$KEYS_END"
    } > "$tmp"
    chown "$user:$group" "$tmp"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$file"
    log "authorized_keys for $user: $(grep -c . "$MOUNT/farm/authorized_keys" || true) key(s)"
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

# The physical NIC (one with a `device` link: not a bridge or VLAN sharing the address) whose
# MAC is $1.
nic_with_mac() {
    for address in /sys/class/net/*/address; do
        dir=${address%/address}
        [ -e "$dir/device" ] || continue
        if [ "$(cat "$address")" = "$1" ]; then
            echo "${dir##*/}"
            return 0
        fi
    done
    return 1
}

# Names the seed's Nth NIC `nicN`, as cloud-init does with the same seed's network-config,
# so a NIC has the same name in every image farm boots and matches its place in farm.toml.
# networkd has not started yet, so the link is still down and can be renamed.
rename_nic() {
    mac=$1
    want=$2
    dev=$(nic_with_mac "$mac") || { log "no NIC with MAC $mac"; return 0; }
    [ "$dev" = "$want" ] && return 0
    if [ -e "/sys/class/net/$want" ]; then
        log "cannot name $dev $want: the name is taken"
        return 0
    fi
    ip link set dev "$dev" down
    ip link set dev "$dev" name "$want"
}

apply_network() {
    mkdir -p "$NETDIR"
    rm -f "$NETDIR"/10-farm-*.network
    [ -f "$MOUNT/farm/network" ] || return 0
    index=0
    while read -r mac addr gw; do
        [ -n "$mac" ] || continue
        rename_nic "$mac" "nic$index"
        index=$((index + 1))
        unit="$NETDIR/10-farm-$(echo "$mac" | tr -d ':').network"
        {
            echo "[Match]"
            # Type=ether keeps bridges and VLANs that inherit this MAC from matching.
            echo "Type=ether"
            echo "MACAddress=$mac"
            echo
            echo "[Network]"
            if [ "$addr" = dhcp ]; then
                echo "DHCP=ipv4"
            else
                echo "Address=$addr"
                if [ -n "$gw" ]; then echo "Gateway=$gw"; fi
            fi
        } > "$unit"
        log "network nic$((index - 1)) ($mac) ${addr}${gw:+ via $gw}"
    done < "$MOUNT/farm/network"
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
    seed_dev=$(find_seed || true)
    if [ -z "$seed_dev" ]; then
        # The device may not have been announced yet this early in boot.
        udevadm settle --timeout=10 2>/dev/null || true
        seed_dev=$(find_seed || true)
    fi
    if [ -z "$seed_dev" ]; then
        log "no seed volume labelled cidata: nothing to apply"
        ensure_host_keys
        return 0
    fi
    mkdir -p "$MOUNT"
    if mountpoint -q "$MOUNT"; then umount "$MOUNT"; fi
    mount -t vfat -o ro "$seed_dev" "$MOUNT"
    trap 'umount "$MOUNT" 2>/dev/null || true' EXIT
    if [ -d "$MOUNT/farm" ]; then
        log "applying seed from $seed_dev"
        if [ -f "$MOUNT/farm/hostname" ]; then apply_hostname; fi
        apply_authorized_keys
        apply_host_key
        apply_network
    else
        log "seed on $seed_dev has no farm/ directory: nothing to apply"
    fi
    umount "$MOUNT"
    trap - EXIT
    ensure_host_keys
}

main "$@"
