#!/bin/sh
# farm's boot script for the tiny image (busybox init's `sysinit` action, /etc/farm/boot.sh).
# It mounts the API filesystems, then applies the `farm/` directory of the NoCloud seed
# volume with the steps of /usr/lib/farm/seed-lib.sh (shared with the Debian images' agent),
# plus what is the tiny image's own: dropbear takes the seeded host key (converted with
# dropbearconvert), and busybox `ip`/udhcpc configure the NICs; without NIC lines in the
# seed the first NIC gets DHCP, as cloud-init's fallback does.
#
# Every step replaces what the previous boot wrote, so a reboot is harmless. It grows nothing:
# the tiny image is meant for short-lived nested guests.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

MOUNT=/run/farm-seed
. /usr/lib/farm/seed-lib.sh

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

# -b: udhcpc goes to the background if no lease comes at once, so boot never waits long.
dhcp() {
    udhcpc -b -t 5 -T 1 -i "$1" -s /etc/farm/udhcpc.script -p "/run/udhcpc.$1.pid" >/dev/null 2>&1
}

configure_nic() {
    dev=$(name_nic "$2" "nic$1") || return 0
    ip link set dev "$dev" up
    if [ "$3" = dhcp ]; then
        dhcp "$dev"
    else
        ip addr add "$3" dev "$dev"
        if [ -n "$4" ]; then ip route replace default via "$4" dev "$dev"; fi
    fi
    log "network $dev ($2) $3${4:+ via $4}"
}

# No addresses in the seed: DHCP on the first NIC, as cloud-init's fallback does, so a seed
# written by hand with keys only still gives a reachable guest.
fallback_network() {
    for address in /sys/class/net/*/address; do
        dir=${address%/address}
        [ -e "$dir/device" ] || continue
        dev=${dir##*/}
        ip link set dev "$dev" up
        dhcp "$dev"
        log "network $dev: DHCP (no addresses in the seed)"
        return 0
    done
}

apply_network() {
    if [ -f "$MOUNT/farm/network" ]; then
        for_each_seed_nic configure_nic
    else
        fallback_network
    fi
}

apply_seed_here() {
    apply_hostname
    apply_authorized_keys
    apply_host_key
    apply_network
}

main() {
    mount_api
    load_modules
    # No seed at all (a disk exported by `farm image export`, booted by another tool):
    # DHCP on the first NIC still, so the keys baked into the disk can log in.
    if ! with_seed; then
        log "no seed volume labelled cidata: nothing to apply"
        fallback_network
    fi
}

main "$@"
