//! The tiny image's root tree: busybox and its applet links, dropbear with the libraries it
//! links, sftp-server, the modules, farm's boot scripts and the seed library, and the few
//! files of `/etc` a system needs.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::modules::index_modules;
use super::{TinyImageError, lines};
use crate::build::tools::ToolRunner;
use crate::model::build::tiny_recipe::{
    BOOT_SCRIPT, DROPBEAR_LIBS, SEED_LIBRARY, SSHD_SCRIPT, UDHCPC_SCRIPT, inittab, library_layout,
};
use crate::model::values::Arch;

/// busybox's applets with their install paths (`/bin/sh`, `/sbin/init`, …), from the
/// unpacked binary itself, so the links match the busybox that is shipped; another
/// architecture's busybox runs under `emulator` (qemu user mode).
pub(super) fn busybox_applets(
    log: &ToolRunner,
    busybox: &Path,
    emulator: Option<&Path>,
) -> Result<Vec<String>, TinyImageError> {
    let run = match emulator {
        Some(emulator) => log.program(emulator, "qemu-user").args([busybox]),
        None => log.program(busybox, "busybox"),
    };
    let out = run
        .args(["--list-full"])
        .hint(|| "the unpacked program does not run on this host".into())
        .run()?;
    Ok(out
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty() && l != "bin/busybox")
        .collect())
}

/// Writes the root tree the disk is made of.
pub(super) fn root_tree(
    arch: Arch,
    root: &Path,
    unpacked: &Path,
    module_dir: &Path,
    modules: &[String],
    applets: &[String],
) -> Result<(), TinyImageError> {
    let layout = library_layout(arch);
    let mode = |path: &Path, mode: u32| {
        fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode))
    };
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        layout.dir,
        "lib/modules/farm",
        "etc/farm",
        "etc/dropbear",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "var/log",
        "home",
        "mnt",
    ] {
        fs_err::create_dir_all(root.join(dir))?;
    }
    fs_err::create_dir_all(root.join("root/.ssh"))?;
    mode(&root.join("root"), 0o700)?;
    mode(&root.join("root/.ssh"), 0o700)?;
    mode(&root.join("tmp"), 0o1777)?;
    // /var/run, /var/tmp as in Debian.
    std::os::unix::fs::symlink("../run", root.join("var/run"))?;
    std::os::unix::fs::symlink("../tmp", root.join("var/tmp"))?;

    let copy_exe = |from: &Path, to: &str| -> Result<(), TinyImageError> {
        if !from.exists() {
            return Err(TinyImageError::Missing {
                path: from.to_path_buf(),
            });
        }
        let dest = root.join(to);
        fs_err::copy(from, &dest)?;
        mode(&dest, 0o755)?;
        Ok(())
    };
    copy_exe(&unpacked.join("bin/busybox"), "bin/busybox")?;
    for applet in applets {
        let link = root.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        let depth = applet.matches('/').count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        std::os::unix::fs::symlink(target, &link)?;
    }
    copy_exe(&unpacked.join("usr/sbin/dropbear"), "usr/sbin/dropbear")?;
    for tool in ["dropbearconvert", "dropbearkey", "dbclient"] {
        copy_exe(
            &unpacked.join("usr/bin").join(tool),
            &format!("usr/bin/{tool}"),
        )?;
    }
    // Where dropbear looks for the SFTP subsystem (Debian's path, as in the package).
    fs_err::create_dir_all(root.join("usr/lib/openssh"))?;
    copy_exe(
        &unpacked.join("usr/lib/openssh/sftp-server"),
        "usr/lib/openssh/sftp-server",
    )?;
    std::os::unix::fs::symlink("openssh/sftp-server", root.join("usr/lib/sftp-server"))?;
    for lib in std::iter::once(layout.loader).chain(DROPBEAR_LIBS) {
        let from = [layout.dir.to_string(), format!("usr/{}", layout.dir)]
            .iter()
            .map(|d| unpacked.join(d).join(lib))
            .find(|p| p.exists())
            .ok_or_else(|| TinyImageError::Missing {
                path: unpacked.join(layout.dir).join(lib),
            })?;
        // fs_err::copy follows the package's `libz.so.1 -> libz.so.1.2.13` link.
        copy_exe(&from, &format!("{}/{lib}", layout.dir))?;
    }
    // The interpreter path written in every executable of the architecture
    // (`/lib64/ld-linux-x86-64.so.2`, `/lib/ld-linux-aarch64.so.1`).
    let interpreter = root.join(layout.interpreter);
    if let Some(dir) = interpreter.parent() {
        fs_err::create_dir_all(dir)?;
    }
    let up = "../".repeat(layout.interpreter.matches('/').count());
    std::os::unix::fs::symlink(
        format!("{up}{}/{}", layout.dir, layout.loader),
        &interpreter,
    )?;

    let index = index_modules(module_dir)?;
    for module in modules {
        fs_err::copy(
            &index[module],
            root.join(format!("lib/modules/farm/{module}.ko")),
        )?;
    }

    fs_err::create_dir_all(root.join("usr/lib/farm"))?;
    let inittab = inittab(arch);
    let files: [(&str, &str, u32); 15] = [
        ("etc/farm/modules", &lines(modules), 0o644),
        ("etc/farm/boot.sh", BOOT_SCRIPT, 0o755),
        ("usr/lib/farm/seed-lib.sh", SEED_LIBRARY, 0o644),
        ("etc/farm/sshd.sh", SSHD_SCRIPT, 0o755),
        ("etc/farm/udhcpc.script", UDHCPC_SCRIPT, 0o755),
        ("etc/inittab", &inittab, 0o644),
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        ),
        (
            "etc/group",
            "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
            0o644,
        ),
        // `*`: no password can match, yet the account is not "locked" (`!`), which some
        // sshds treat as refusing key logins too.
        ("etc/shadow", "root:*:19000:0:99999:7:::\n", 0o600),
        ("etc/shells", "/bin/sh\n/bin/ash\n", 0o644),
        (
            "etc/hosts",
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            0o644,
        ),
        ("etc/hostname", "tiny\n", 0o644),
        (
            "etc/profile",
            "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport HOME=${HOME:-/root}\n",
            0o644,
        ),
        ("etc/resolv.conf", "", 0o644),
        ("etc/fstab", "/dev/vda / ext4 rw 0 1\n", 0o644),
    ];
    for (path, text, perm) in files {
        let dest = root.join(path);
        fs_err::write(&dest, text)?;
        mode(&dest, perm)?;
    }
    Ok(())
}
