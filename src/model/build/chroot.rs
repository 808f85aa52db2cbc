//! The shell of a `builder = "chroot"` build (see `values::Builder`): farm's tiny appliance
//! VM has the image's disk as its second disk; `SETUP` mounts the image's root filesystem
//! (and what its fstab mounts beneath it) with the API filesystems and DNS a package
//! manager needs, each step runs in a chroot of it through [`wrap`], and `TEARDOWN` puts back
//! what setup changed, trims and unmounts before the appliance powers off.
//!
//! Why scripts in the appliance rather than tools on the host: the host needs no root, no
//! nbd and no kernel modules; the appliance is a VM like any build VM, so disk checkpoints
//! between steps work the same way. Setup may run again on a checkpoint taken mid-build,
//! so what it changes on the image's disk is marked (`/var/lib/farm-chroot/`,
//! `POLICY_MARK`) and teardown undoes it whichever setup made it.

use crate::model::shell::shell_quote;

/// Where the appliance mounts the image's root filesystem.
pub const ROOT: &str = "/run/farm-root";

/// The block device qemu names the image's disk in the appliance (its second
/// `-drive if=virtio`), and the kernel's name for it.
pub const DISK_DEVICE: &str = "virtio1";

/// The line that marks the `policy-rc.d` setup writes, so teardown removes only its own.
const POLICY_MARK: &str = "# farm chroot build: no service starts while steps run";

/// Mounts the image's root filesystem at [`ROOT`]: the first ext4 filesystem on the image's
/// disk (`/dev/vdb` or a partition of it) with an `os-release`, then the local filesystems
/// its fstab mounts below `/`, the API filesystems, a `resolv.conf` that reaches the
/// appliance's DNS, and a `policy-rc.d` that keeps package scripts from starting services.
/// Writes the root's device to `/run/farm/root-device` in the chroot (for the grow step).
pub fn setup_script() -> String {
    format!(
        r#"set -e
R={ROOT}
POLICY_MARK={policy}
mkdir -p "$R"
grep -q " $R " /proc/mounts && {{ echo "already set up"; exit 0; }}
found=
for dev in /dev/vdb /dev/vdb[0-9]*; do
    [ -b "$dev" ] || continue
    if mount -t ext4 "$dev" "$R" 2>/dev/null; then
        if [ -e "$R/etc/os-release" ] || [ -e "$R/usr/lib/os-release" ]; then found=$dev; break; fi
        umount "$R"
    fi
done
if [ -z "$found" ]; then
    echo "farm's appliance found no ext4 root filesystem with an os-release on the image's disk (block devices: $(ls /dev/vdb* 2>/dev/null | tr '\n' ' '))" >&2
    exit 3
fi
echo "root filesystem: $found"
# Local filesystems the image mounts below / (/boot, /boot/efi...), by device, UUID or LABEL.
if [ -f "$R/etc/fstab" ]; then
    while read -r spec point type rest; do
        case "$spec" in ''|'#'*) continue ;; esac
        case "$point" in /|none|swap) continue ;; /*) ;; *) continue ;; esac
        case "$type" in ext2|ext3|ext4|vfat) ;; *) continue ;; esac
        case "$spec" in
            UUID=*|LABEL=*) dev=$(findfs "$spec" 2>/dev/null) || dev= ;;
            /dev/*) dev=$spec ;;
            *) dev= ;;
        esac
        if [ -z "$dev" ]; then echo "fstab: $spec is not on this disk; $point left unmounted"; continue; fi
        [ "$type" = vfat ] || type=ext4
        mkdir -p "$R$point"
        if mount -t "$type" "$dev" "$R$point"; then echo "mounted $dev on $point"; else echo "fstab: could not mount $dev on $point"; fi
    done < "$R/etc/fstab"
fi
mkdir -p "$R/dev" "$R/proc" "$R/sys" "$R/run" "$R/tmp"
mount -o bind /dev "$R/dev"
mkdir -p "$R/dev/pts"
mount -o bind /dev/pts "$R/dev/pts"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
mkdir -p "$R/run/farm"
echo "$found" > "$R/run/farm/root-device"
# DNS: the image's own resolv.conf stays as it was; while steps run it reaches the
# appliance's resolver. A link into /run (systemd-resolved's stub) gets its target written
# in the tmpfs; a file is covered by a bind mount; anything else is set aside and put back.
saved="$R/var/lib/farm-chroot"
conf="$R/etc/resolv.conf"
target=
if [ -L "$conf" ]; then target=$(chroot "$R" readlink -m /etc/resolv.conf 2>/dev/null) || target=; fi
case "$target" in
    /run/*)
        mkdir -p "$(dirname "$R$target")"
        cat /etc/resolv.conf > "$R$target"
        ;;
    *)
        if [ -f "$conf" ] && [ ! -L "$conf" ]; then
            mount -o bind /etc/resolv.conf "$conf"
        elif [ ! -d "$saved" ]; then
            mkdir -p "$saved"
            if [ -L "$conf" ] || [ -e "$conf" ]; then cp -P "$conf" "$saved/resolv.conf"; else : > "$saved/resolv.conf.absent"; fi
            rm -f "$conf"
            cat /etc/resolv.conf > "$conf"
        fi
        ;;
esac
policy="$R/usr/sbin/policy-rc.d"
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n%s\nexit 101\n' "$POLICY_MARK" > "$policy"
    chmod 0755 "$policy"
fi
"#,
        policy = shell_quote(POLICY_MARK),
    )
}

/// `script` as it runs in the chroot: as root, in a clean environment with the image's
/// own PATH, stdin passed through.
pub fn wrap(script: &str) -> String {
    format!(
        "chroot {ROOT} /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 /bin/sh -c {}",
        shell_quote(script)
    )
}

/// Undoes setup's changes to the image, discards its free blocks (the layer keeps only what
/// the steps wrote) and unmounts everything, deepest first.
pub fn teardown_script() -> String {
    format!(
        r#"R={ROOT}
POLICY_MARK={policy}
grep -q " $R " /proc/mounts || exit 0
policy="$R/usr/sbin/policy-rc.d"
if [ -f "$policy" ] && grep -qxF "$POLICY_MARK" "$policy"; then rm -f "$policy"; fi
conf="$R/etc/resolv.conf"
grep -q " $conf " /proc/mounts && umount "$conf"
saved="$R/var/lib/farm-chroot"
if [ -d "$saved" ]; then
    rm -f "$conf"
    if [ -e "$saved/resolv.conf" ] || [ -L "$saved/resolv.conf" ]; then cp -P "$saved/resolv.conf" "$conf"; fi
    rm -rf "$saved"
fi
for point in $(grep " $R" /proc/mounts | cut -d' ' -f2 | sort -r); do
    case "$(grep " $point " /proc/mounts | cut -d' ' -f3)" in ext4|vfat) fstrim "$point" >/dev/null 2>&1 ;; esac
    umount "$point" || umount -l "$point"
done
sync
"#,
        policy = shell_quote(POLICY_MARK),
    )
}

/// farm's first step in a chroot build: the root partition grown to the build disk (with
/// the image's own `growpart`, as cloud-init would on a first boot) and its filesystem
/// grown online. Without `growpart` a partitioned root keeps its size.
pub const GROW_SCRIPT: &str = r#"dev=$(cat /run/farm/root-device)
case "$dev" in
    /dev/vdb) resize2fs "$dev" ;;
    *)
        part=${dev#/dev/vdb}
        if command -v growpart >/dev/null; then
            growpart /dev/vdb "$part" || [ $? -eq 1 ]
            resize2fs "$dev"
        else
            echo "no growpart in the image: $dev keeps its size"
        fi
        ;;
esac"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_runs_in_the_chroot_quoted_whole() {
        let script = "echo 'a b' > /etc/x";
        let wrapped = wrap(script);
        assert!(wrapped.starts_with("chroot /run/farm-root /usr/bin/env -i PATH="));
        assert!(wrapped.ends_with(&format!("/bin/sh -c {}", shell_quote(script))));
    }

    #[test]
    fn teardown_removes_only_the_policy_setup_wrote() {
        assert!(setup_script().contains(&shell_quote(POLICY_MARK)));
        assert!(teardown_script().contains("grep -qxF \"$POLICY_MARK\""));
    }
}
