#!/bin/sh
# farm's boot script for the tiny image (busybox init's `sysinit` action, /etc/farm/boot.sh).
# It does what farm-seed.sh does in the Debian images, with busybox only: mounts the API
# filesystems, then applies the `farm/` directory of the NoCloud seed volume (label `cidata`,
# written by farm's src/seed.rs):
#
#   farm/hostname                      the host name
#   farm/user, farm/authorized_keys    keys that may log in as that user
#   farm/ssh_host_ed25519_key          the host key farm already pinned in known_hosts
#                                      (converted for dropbear with dropbearconvert)
#   farm/network                       one NIC per line (the Nth is renamed nicN): `MAC dhcp`,
#                                      `MAC ADDRESS/PREFIX GATEWAY` or `MAC ADDRESS/PREFIX`;
#                                      absent: DHCP on the first NIC
#
# Every step replaces what the previous boot wrote, so a reboot is harmless. It grows nothing:
# the tiny image is meant for short-lived nested guests.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

MOUNT=/run/farm-seed
KEYS_BEGIN='# farm-seed: keys from the seed volume (replaced at every boot)'
KEYS_END='# farm-seed: end'

log() { echo "farm-seed: $*"; }

# Debian's busybox-static has no `mountpoint` applet; /proc/mounts says the same (and
# before /proc is mounted, nothing is).
mounted() { grep -q "^[^ ]* $1 " /proc/mounts 2>/dev/null; }

mount_api() {
    mounted /proc || mount -t proc proc /proc
    mounted /sys || mount -t sysfs sysfs /sys
    mounted /dev || mount -t devtmpfs devtmpfs /dev
    mkdir -p /dev/pts /dev/shm
    mounted /dev/pts || mount -t devpts -o gid=5,mode=620 devpts /dev/pts
    mounted /run || mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
    mounted /tmp || mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
    mount -o remount,rw / 2>/dev/null || true
    ip link set lo up
}

# The initramfs normally loaded every module already; this covers a boot without it.
load_modules() {
    [ -f /etc/farm/modules ] || return 0
    while read -r module; do
        [ -n "$module" ] || continue
        grep -q "^$module " /proc/modules && continue
        insmod "/lib/modules/farm/$module.ko" 2>/dev/null || true
    done < /etc/farm/modules
}

find_seed() {
    dev=$(findfs LABEL=cidata 2>/dev/null) && [ -n "$dev" ] && { echo "$dev"; return 0; }
    # findfs depends on busybox's volume_id; fall back to trying every virtio disk.
    for dev in /dev/vd?; do
        [ -b "$dev" ] || continue
        [ "$dev" = /dev/vda ] && continue
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
    name=$(tr -d ' \t\r\n' < "$MOUNT/farm/hostname")
    [ -n "$name" ] || return 0
    short=${name%%.*}
    echo "$name" > /etc/hostname
    hostname "$name"
    grep -v '^127\.0\.1\.1[[:space:]]' /etc/hosts > /etc/hosts.tmp 2>/dev/null || true
    printf '127.0.1.1\t%s %s\n' "$name" "$short" >> /etc/hosts.tmp
    mv -f /etc/hosts.tmp /etc/hosts
    log "hostname $name"
}

apply_authorized_keys() {
    [ -f "$MOUNT/farm/authorized_keys" ] || return 0
    user=root
    if [ -f "$MOUNT/farm/user" ]; then user=$(tr -d ' \t\r\n' < "$MOUNT/farm/user"); fi
    if ! grep -q "^$user:" /etc/passwd; then
        # busybox-static has no adduser: write the account by hand (key-only, locked).
        uid=1000
        while cut -d: -f3 /etc/passwd | grep -qx "$uid"; do uid=$((uid + 1)); done
        echo "$user:x:$uid:$uid::/home/$user:/bin/sh" >> /etc/passwd
        echo "$user:x:$uid:" >> /etc/group
        echo "$user:*:19000:0:99999:7:::" >> /etc/shadow
        mkdir -p "/home/$user"
        chown "$uid:$uid" "/home/$user"
        log "created user $user"
    fi
    home=$(grep "^$user:" /etc/passwd | cut -d: -f6)
    uid=$(grep "^$user:" /etc/passwd | cut -d: -f3)
    gid=$(grep "^$user:" /etc/passwd | cut -d: -f4)
    mkdir -p "$home/.ssh"
    chmod 0700 "$home/.ssh"
    chown "$uid:$gid" "$home/.ssh"
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
    chown "$uid:$gid" "$tmp"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$file"
    log "authorized_keys for $user: $(grep -c . "$MOUNT/farm/authorized_keys") key(s)"
}

apply_host_key() {
    [ -f "$MOUNT/farm/ssh_host_ed25519_key" ] || return 0
    # Only the pinned key may answer: remove every other host key.
    mkdir -p /etc/dropbear
    rm -f /etc/dropbear/dropbear_*_host_key
    cp "$MOUNT/farm/ssh_host_ed25519_key" /run/farm-host-key
    chmod 0600 /run/farm-host-key
    if dropbearconvert openssh dropbear /run/farm-host-key \
        /etc/dropbear/dropbear_ed25519_host_key >/dev/null 2>&1; then
        chmod 0600 /etc/dropbear/dropbear_ed25519_host_key
        log "installed the seeded ed25519 host key"
    else
        log "could not convert the seeded host key for dropbear"
    fi
    rm -f /run/farm-host-key
}

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

# No addresses in the seed: DHCP on the first NIC, as cloud-init's fallback does, so a seed
# written by hand with keys only still gives a reachable guest.
fallback_network() {
    for address in /sys/class/net/*/address; do
        dir=${address%/address}
        [ -e "$dir/device" ] || continue
        dev=${dir##*/}
        ip link set dev "$dev" up
        udhcpc -b -t 5 -T 1 -i "$dev" -s /etc/farm/udhcpc.script \
            -p "/run/udhcpc.$dev.pid" >/dev/null 2>&1
        log "network $dev: DHCP (no addresses in the seed)"
        return 0
    done
}

apply_network() {
    [ -f "$MOUNT/farm/network" ] || { fallback_network; return 0; }
    index=0
    while read -r mac addr gw; do
        [ -n "$mac" ] || continue
        want=nic$index
        index=$((index + 1))
        dev=$(nic_with_mac "$mac") || { log "no NIC with MAC $mac"; continue; }
        if [ "$dev" != "$want" ] && [ ! -e "/sys/class/net/$want" ]; then
            ip link set dev "$dev" down
            ip link set dev "$dev" name "$want" && dev=$want
        fi
        ip link set dev "$dev" up
        if [ "$addr" = dhcp ]; then
            # -b: go to the background if no lease comes at once, so boot never waits long.
            udhcpc -b -t 5 -T 1 -i "$dev" -s /etc/farm/udhcpc.script \
                -p "/run/udhcpc.$dev.pid" >/dev/null 2>&1
        else
            ip addr add "$addr" dev "$dev"
            if [ -n "$gw" ]; then ip route replace default via "$gw" dev "$dev"; fi
        fi
        log "network $dev ($mac) ${addr}${gw:+ via $gw}"
    done < "$MOUNT/farm/network"
}

main() {
    mount_api
    load_modules
    mkdir -p "$MOUNT"
    seed_dev=$(find_seed || true)
    if [ -z "$seed_dev" ]; then
        log "no seed volume labelled cidata: nothing to apply"
        return 0
    fi
    mount -t vfat -o ro "$seed_dev" "$MOUNT" || { log "cannot mount $seed_dev"; return 0; }
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
}

main "$@"
