# farm's guest-side seed library, installed as /usr/lib/farm/seed-lib.sh and sourced by both
# of farm's agents: `farm-seed` in the Debian images (dash, GNU tools, systemd) and the tiny
# image's boot script (busybox ash). It reads the `farm/` directory of the NoCloud seed
# volume (label `cidata`, written by farm's src/model/seed.rs), mounted at "$MOUNT":
#
#   farm/hostname                      the host name
#   farm/user, farm/authorized_keys    keys that may log in as that user
#   farm/ssh_host_ed25519_key[.pub]    the host key farm already pinned in known_hosts
#   farm/network                       one NIC per line (the Nth is renamed nicN): `MAC dhcp`,
#                                      `MAC ADDRESS/PREFIX GATEWAY` or `MAC ADDRESS/PREFIX`
#
# What differs between the two userlands (which sshd takes the host key, who configures
# addresses) stays in each agent; everything here runs on both.

KEYS_BEGIN='# farm-seed: keys from the seed volume (replaced at every boot)'
KEYS_END='# farm-seed: end'

log() { echo "farm-seed: $*"; }

# Field $2 of user $1's passwd entry (getent where there is one: busybox has none).
passwd_field() {
    if command -v getent >/dev/null 2>&1; then
        getent passwd "$1"
    else
        grep "^$1:" /etc/passwd
    fi | cut -d: -f"$2"
}

# Creates user $1 unless it exists: useradd where there is one, by hand otherwise
# (busybox-static has no adduser): a key-only account, no password can match.
ensure_user() {
    [ -n "$(passwd_field "$1" 1)" ] && return 0
    shell=/bin/sh
    [ -x /bin/bash ] && shell=/bin/bash
    if command -v useradd >/dev/null 2>&1; then
        useradd --create-home --shell "$shell" "$1"
    else
        uid=1000
        while cut -d: -f3 /etc/passwd | grep -qx "$uid"; do uid=$((uid + 1)); done
        echo "$1:x:$uid:$uid::/home/$1:$shell" >> /etc/passwd
        echo "$1:x:$uid:" >> /etc/group
        echo "$1:*:19000:0:99999:7:::" >> /etc/shadow
        mkdir -p "/home/$1"
        chown "$uid:$uid" "/home/$1"
    fi
    log "created user $1"
}

# Where blkid, findfs or udev's by-label link say the seed is; otherwise the first virtio
# disk but the root that mounts as FAT with a farm/ directory (busybox's volume_id may not
# read FAT labels).
find_seed() {
    for finder in "blkid -L cidata" "findfs LABEL=cidata"; do
        dev=$($finder 2>/dev/null) && [ -n "$dev" ] && { echo "$dev"; return 0; }
    done
    [ -e /dev/disk/by-label/cidata ] && { echo /dev/disk/by-label/cidata; return 0; }
    mkdir -p "$MOUNT"
    for dev in /dev/vd?; do
        [ -b "$dev" ] && [ "$dev" != /dev/vda ] || continue
        if mount -t vfat -o ro "$dev" "$MOUNT" 2>/dev/null; then
            found=0
            [ -d "$MOUNT/farm" ] && found=1
            umount "$MOUNT"
            [ $found = 1 ] && { echo "$dev"; return 0; }
        fi
    done
    return 1
}

apply_hostname() {
    [ -f "$MOUNT/farm/hostname" ] || return 0
    name=$(tr -d ' \t\r\n' < "$MOUNT/farm/hostname")
    [ -n "$name" ] || return 0
    echo "$name" > /etc/hostname
    echo "$name" > /proc/sys/kernel/hostname
    # Let the host resolve its own name (sudo, hostname -f) without DNS.
    {
        grep -v '^127\.0\.1\.1[[:space:]]' /etc/hosts 2>/dev/null || true
        printf '127.0.1.1\t%s %s\n' "$name" "${name%%.*}"
    } > /etc/hosts.farm-seed
    chmod 0644 /etc/hosts.farm-seed
    mv -f /etc/hosts.farm-seed /etc/hosts
    log "hostname $name"
}

apply_authorized_keys() {
    [ -f "$MOUNT/farm/authorized_keys" ] || return 0
    user=root
    if [ -f "$MOUNT/farm/user" ]; then user=$(tr -d ' \t\r\n' < "$MOUNT/farm/user"); fi
    ensure_user "$user"
    home=$(passwd_field "$user" 6)
    ids="$(passwd_field "$user" 3):$(passwd_field "$user" 4)"
    mkdir -p "$home/.ssh"
    chmod 0700 "$home/.ssh"
    chown "$ids" "$home/.ssh"
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
    chown "$ids" "$tmp"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$file"
    log "authorized_keys for $user: $(grep -c . "$MOUNT/farm/authorized_keys" || true) key(s)"
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

# Names the NIC with MAC $1 `$2` (the seed's Nth NIC is nicN, as cloud-init names it from
# the same seed's network-config, so a NIC has the same name in every image farm boots) and
# prints its name; fails when no NIC has that MAC. The link must still be down.
name_nic() {
    dev=$(nic_with_mac "$1") || { log "no NIC with MAC $1"; return 1; }
    if [ "$dev" != "$2" ]; then
        if [ -e "/sys/class/net/$2" ]; then
            log "cannot name $dev $2: the name is taken"
        else
            ip link set dev "$dev" down
            ip link set dev "$dev" name "$2" && dev=$2
        fi
    fi
    echo "$dev"
}

# Calls `$1 INDEX MAC ADDRESS GATEWAY` for each NIC line of the seed, in order (ADDRESS is
# `dhcp` or ADDRESS/PREFIX; GATEWAY may be empty). The callback's stdin is /dev/null, so a
# command in it cannot eat the rest of the list.
for_each_seed_nic() {
    seed_nic_index=0
    while read -r seed_nic_mac seed_nic_addr seed_nic_gw; do
        [ -n "$seed_nic_mac" ] || continue
        "$1" "$seed_nic_index" "$seed_nic_mac" "$seed_nic_addr" "$seed_nic_gw" < /dev/null
        seed_nic_index=$((seed_nic_index + 1))
    done < "$MOUNT/farm/network"
}

# Mounts the seed volume on "$MOUNT", runs `apply_seed_here` (each agent's own steps) when it
# has a farm/ directory, and unmounts it. Returns 1 when there is no seed volume.
with_seed() {
    seed_dev=$(find_seed) || return 1
    mkdir -p "$MOUNT"
    if grep -q "^[^ ]* $MOUNT " /proc/mounts 2>/dev/null; then umount "$MOUNT"; fi
    mount -t vfat -o ro "$seed_dev" "$MOUNT" || { log "cannot mount $seed_dev"; return 0; }
    if [ -d "$MOUNT/farm" ]; then
        log "applying seed from $seed_dev"
        apply_seed_here
    else
        log "seed on $seed_dev has no farm/ directory: nothing to apply"
    fi
    umount "$MOUNT"
}
