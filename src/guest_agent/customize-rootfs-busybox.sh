#!/bin/sh
# Run by farm as mmdebstrap's last --customize-hook for `debian = { init = "busybox" }`:
# `sh customize-rootfs-busybox.sh ROOTFS AGENT_DIR`. The tree keeps Debian's apt, dpkg and
# whatever `packages` named, but boots as farm's tiny image does: farm's initramfs mounts
# /dev/vda, busybox init runs the tiny image's boot script (seed, NICs), then dropbear.
# No systemd and no udev, so it boots in minutes even as a guest inside a guest.
set -eu

root=$1
agent=$2

install -D -m 0755 "$agent/boot.sh" "$root/etc/farm/boot.sh"
install -D -m 0755 "$agent/sshd.sh" "$root/etc/farm/sshd.sh"
install -D -m 0755 "$agent/udhcpc.script" "$root/etc/farm/udhcpc.script"
install -D -m 0644 "$agent/seed-lib.sh" "$root/usr/lib/farm/seed-lib.sh"
install -D -m 0644 "$agent/inittab" "$root/etc/inittab"

# busybox supplies every applet Debian has no program for: init itself, `ip`, udhcpc,
# poweroff. Debian's own programs (mount, grep, sh) stay. The links are owned by no
# package, so a package that ships one of these paths later simply replaces it.
chroot "$root" /bin/busybox --list-full | while read -r applet; do
    [ -n "$applet" ] || continue
    case "$applet" in /*) path=$applet ;; *) path=/$applet ;; esac
    [ -e "$root$path" ] || [ -L "$root$path" ] && continue
    mkdir -p "$root${path%/*}"
    ln -s /bin/busybox "$root$path"
done

# udhcpc's hook writes the DNS servers of the lease here: a plain file, not a link to a
# resolver that does not run.
rm -f "$root/etc/resolv.conf"
: > "$root/etc/resolv.conf"

# The initrd in /boot is replaced by farm's (the builder writes it); initramfs-tools must not
# replace it back when a later package triggers it.
mkdir -p "$root/etc/initramfs-tools"
if [ -f "$root/etc/initramfs-tools/update-initramfs.conf" ]; then
    sed -i 's/^update_initramfs=.*/update_initramfs=no/' "$root/etc/initramfs-tools/update-initramfs.conf"
fi

# No identity from the build: the boot script sets the hostname and installs farm's pinned
# host key (dropbear makes one on first connection without a seed).
: > "$root/etc/machine-id"
echo debian > "$root/etc/hostname"
rm -f "$root"/etc/dropbear/dropbear_*_host_key
mkdir -p "$root/etc/dropbear" "$root/root/.ssh"
chmod 0700 "$root/root" "$root/root/.ssh"
