//! `farm cp`: copies between this machine and a VM through ssh alone (the guest needs
//! `cat`, and `tar` for directories; no sftp server).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::{Lab, VerbError, log_verb};
use crate::model::shell::shell_quote;

impl Lab<'_> {
    /// Copies between this machine and `vm` through ssh alone (the guest needs `cat`, and
    /// `tar` for directories; no sftp server): a file to a file, or into a directory that
    /// exists; with `recursive`, a directory's contents into `to`, created if need be.
    pub fn copy(&self, vm: &str, copy: &Transfer, recursive: bool) -> Result<(), VerbError> {
        let started = Instant::now();
        let (script, local_side) = copy.plan(recursive);
        let mut ssh = self.ssh(vm);
        ssh.arg("--").arg(&script).stderr(Stdio::piped());
        let result = local_side.run(ssh);
        log_verb("cp", vm, &copy.describe(), started, result.is_ok());
        result.map_err(|said| self.copy_failed(vm, copy, said))
    }

    /// A copy that failed: the VM's console too when the VM no longer answers.
    fn copy_failed(&self, vm: &str, copy: &Transfer, said: String) -> VerbError {
        let answers = self
            .ssh(vm)
            .args(["--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if answers {
            VerbError::CopyFailed {
                vm: vm.to_string(),
                what: copy.describe(),
                said,
            }
        } else {
            self.unreachable(vm)
        }
    }
}

/// One copy between this machine and a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transfer {
    ToVm { local: PathBuf, remote: String },
    FromVm { remote: String, local: PathBuf },
}

/// This machine's end of a copy: what ssh's stdin reads, or where its stdout goes.
enum LocalSide {
    /// A file sent to `cat` in the guest.
    SendFile(PathBuf),
    /// A directory sent to `tar` in the guest.
    SendDir(PathBuf),
    /// The guest's `cat`, written to this file (through a temporary beside it).
    ReceiveFile(PathBuf),
    /// The guest's `tar`, unpacked into this directory.
    ReceiveDir(PathBuf),
}

impl Transfer {
    fn describe(&self) -> String {
        match self {
            Transfer::ToVm { local, remote } => format!("`{}` to `{remote}`", local.display()),
            Transfer::FromVm { remote, local } => format!("`{remote}` to `{}`", local.display()),
        }
    }

    /// The guest's script, and what this machine does at its end.
    fn plan(&self, recursive: bool) -> (String, LocalSide) {
        match self {
            Transfer::ToVm { local, remote } if recursive => (
                format!("mkdir -p {r} && tar -C {r} -xf -", r = shell_quote(remote)),
                LocalSide::SendDir(local.clone()),
            ),
            Transfer::ToVm { local, remote } => {
                let name = local
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (
                    format!(
                        "d={r}; if [ -d \"$d\" ]; then d=\"$d\"/{n}; fi; cat > \"$d\"",
                        r = shell_quote(remote),
                        n = shell_quote(&name)
                    ),
                    LocalSide::SendFile(local.clone()),
                )
            }
            Transfer::FromVm { remote, local } if recursive => (
                format!("tar -C {} -cf - .", shell_quote(remote)),
                LocalSide::ReceiveDir(local.clone()),
            ),
            Transfer::FromVm { remote, local } => {
                let local = if local.is_dir() {
                    local.join(Path::new(remote).file_name().unwrap_or_default())
                } else {
                    local.clone()
                };
                (
                    format!("cat {}", shell_quote(remote)),
                    LocalSide::ReceiveFile(local),
                )
            }
        }
    }
}

impl LocalSide {
    /// Runs `ssh` (its stderr piped) with this end attached; what went wrong otherwise.
    fn run(self, mut ssh: Command) -> Result<(), String> {
        let failed = |e: std::io::Error| e.to_string();
        let said = |out: &std::process::Output| {
            let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if text.is_empty() {
                format!("exit {}", out.status)
            } else {
                text
            }
        };
        match self {
            LocalSide::SendFile(file) => {
                let input = fs_err::File::open(&file).map_err(failed)?.into_parts().0;
                let out = ssh
                    .stdin(input)
                    .stdout(Stdio::null())
                    .output()
                    .map_err(failed)?;
                out.status.success().then_some(()).ok_or_else(|| said(&out))
            }
            LocalSide::SendDir(dir) => {
                if !dir.is_dir() {
                    return Err(format!("`{}` is not a directory", dir.display()));
                }
                let mut tar = Command::new("tar")
                    .arg("-C")
                    .arg(&dir)
                    .args(["-cf", "-", "."])
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(failed)?;
                let pipe = tar.stdout.take().expect("piped");
                let out = ssh
                    .stdin(pipe)
                    .stdout(Stdio::null())
                    .output()
                    .map_err(failed)?;
                let packed = tar.wait().map_err(failed)?;
                if !packed.success() {
                    return Err(format!("tar of `{}` failed ({packed})", dir.display()));
                }
                out.status.success().then_some(()).ok_or_else(|| said(&out))
            }
            LocalSide::ReceiveFile(file) => {
                let partial = file.with_extension("farm-partial");
                let output = fs_err::File::create(&partial)
                    .map_err(failed)?
                    .into_parts()
                    .0;
                let out = ssh
                    .stdin(Stdio::null())
                    .stdout(output)
                    .output()
                    .map_err(failed)?;
                if !out.status.success() {
                    let _ = fs_err::remove_file(&partial);
                    return Err(said(&out));
                }
                fs_err::rename(&partial, &file).map_err(failed)
            }
            LocalSide::ReceiveDir(dir) => {
                fs_err::create_dir_all(&dir).map_err(failed)?;
                let mut child = ssh
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(failed)?;
                let pipe = child.stdout.take().expect("piped");
                let unpacked = Command::new("tar")
                    .arg("-C")
                    .arg(&dir)
                    .args(["-xf", "-"])
                    .stdin(pipe)
                    .status()
                    .map_err(failed)?;
                let out = child.wait_with_output().map_err(failed)?;
                if !out.status.success() {
                    return Err(said(&out));
                }
                unpacked
                    .success()
                    .then_some(())
                    .ok_or_else(|| format!("unpacking into `{}` failed", dir.display()))
            }
        }
    }
}
