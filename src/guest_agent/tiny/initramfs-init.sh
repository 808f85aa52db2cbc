#!/bin/busybox sh
# /init of farm's tiny image initramfs. Its only job is to reach the root disk: the Debian
# cloud kernel has virtio as modules, so they are loaded here (in the order the builder
# computed from each module's `depends=`, listed in /etc/farm-modules), then the root disk is
# mounted and control passes to busybox init on the disk. The root is /dev/vda (farm's own
# disks: ext4 on the whole disk), or the kernel's `root=` (an exported disk's partition). No udev, no fsck: the disk is a
# throwaway overlay and every second counts under (nested) TCG.
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r module; do
    [ -n "$module" ] || continue
    insmod "/lib/modules/$module.ko" 2>/dev/null || echo "tiny-initramfs: could not load $module"
done < /etc/farm-modules

root=/dev/vda
for word in $(cat /proc/cmdline); do
    case "$word" in root=/dev/*) root="${word#root=}" ;; esac
done
# virtio_blk probes asynchronously: wait up to ~10 s for the root disk.
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
    echo "tiny-initramfs: cannot mount $root; dropping to a shell"
    exec sh
fi
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /proc /sys
exec switch_root /newroot /sbin/init
