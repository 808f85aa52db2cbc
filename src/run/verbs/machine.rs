//! The verbs that act on a VM's virtual hardware, through its qemu wherever it runs:
//! `farm link` (a NIC's cable, and the line of its wire), `farm capture` (a NIC's frames),
//! `farm screenshot`, `farm crash` and `farm reboot`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use std::time::{Duration, Instant};

pub use crate::model::lab::wire::Shaping;

use super::{Lab, VerbError, log_verb};
use crate::model::lab::instance::InstanceSpec;
use crate::model::lab::wait::WaitFor;
use crate::model::shell::{quote_path, shell_quote};
use crate::run::host::Host;

/// How long a verb waits for a VM's QMP (or its wire's management socket) to answer.
const CONNECT_FOR: Duration = Duration::from_secs(5);

/// A capture farm started and has not stopped yet: kept in `.farm/captures/`, so the
/// `farm capture --stop` of another process (and `farm test`, after each test) finds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capture {
    pub vm: String,
    pub network: String,
    /// The pcap qemu writes, on the VM's site.
    pub site_file: PathBuf,
    /// Where it goes on this machine when the capture stops.
    pub to: PathBuf,
}

/// A stopped capture's pcap and how many frames it holds, or why it was lost.
pub type CaptureStopped = Result<(PathBuf, usize), VerbError>;

impl Lab<'_> {
    /// Runs `work` on `vm`'s QMP; a failure says it could not `what`.
    fn on_qmp<T>(
        &self,
        vm: &str,
        what: &str,
        spec: &InstanceSpec,
        host: &dyn Host,
        work: impl FnOnce(&mut crate::sys::qmp::Qmp) -> Result<T, crate::sys::qmp::QmpError>,
    ) -> Result<T, VerbError> {
        let failed = |why: String| VerbError::Qemu {
            vm: vm.to_string(),
            what: what.to_string(),
            why,
        };
        crate::run::host::with_qmp(
            host,
            &spec.paths.qmp(),
            CONNECT_FOR,
            |qmp| work(qmp).map_err(|e| failed(e.to_string())),
            failed,
        )
    }

    /// Cuts (`up = false`) or restores the cable of `vm`'s NIC on `network` (`user` for
    /// QEMU's user network): QMP `set_link` on its qemu, wherever it runs. The guest sees
    /// its carrier go; what was sent meanwhile is lost.
    pub fn link(&self, vm: &str, network: &str, up: bool) -> Result<(), VerbError> {
        let started = Instant::now();
        let what = format!("switch its link on `{network}`");
        let (spec, host) = self.site_of(vm)?;
        let result = spec
            .netdev_of(network)
            .map_err(|why| VerbError::Qemu {
                vm: vm.to_string(),
                what: what.clone(),
                why,
            })
            .and_then(|netdev| {
                self.on_qmp(vm, &what, &spec, &*host, |qmp| {
                    qmp.command("set_link", serde_json::json!({ "name": netdev, "up": up }))
                        .map(drop)
                })
            });
        let state = if up { "up" } else { "down" };
        log_verb(
            "link",
            vm,
            &format!("{network} {state}"),
            started,
            result.is_ok(),
        );
        result
    }

    /// Changes the line of `vm`'s NIC on the VDE network `network`, through its wire's
    /// management socket (see `model::lab::wire`): at once, both ways, the VM running on.
    pub fn shape(&self, vm: &str, network: &str, shaping: &Shaping) -> Result<(), VerbError> {
        let started = Instant::now();
        let (spec, host) = self.site_of(vm)?;
        let failed = |why: String| VerbError::Qemu {
            vm: vm.to_string(),
            what: format!("shape its line on `{network}`"),
            why,
        };
        let result = spec.wire_of(network).map_err(failed).and_then(|wire| {
            let mut result = Err(failed("its wire's management socket is gone".into()));
            host.with_socket(&wire.files.mgmt, &mut |local| {
                result = (|| {
                    let mut session =
                        crate::sys::wirefilter::Wirefilter::connect(local, CONNECT_FOR)?;
                    for command in shaping.commands() {
                        session.command(&command)?;
                    }
                    Ok::<_, crate::sys::wirefilter::WirefilterError>(())
                })()
                .map_err(|e| failed(e.to_string()));
            })?;
            result
        });
        let what = format!("{network} {}", shaping.describe());
        log_verb("link", vm, &what, started, result.is_ok());
        result
    }

    /// Starts capturing the frames of `vm`'s NIC on `network` into a pcap (qemu's
    /// `filter-dump`, both directions, written where the VM runs); [`Lab::stop_capture`]
    /// brings it to `to`.
    pub fn start_capture(&self, vm: &str, network: &str, to: &Path) -> Result<(), VerbError> {
        let started = Instant::now();
        let what = format!("capture on `{network}`");
        let failed = |why: String| VerbError::Qemu {
            vm: vm.to_string(),
            what: what.clone(),
            why,
        };
        let record = capture_record(&self.state, vm, network);
        if record.exists() {
            return Err(failed(format!(
                "a capture of it runs already\nhint: `farm capture --stop {vm} {network}` ends it"
            )));
        }
        let (spec, host) = self.site_of(vm)?;
        let netdev = spec.netdev_of(network).map_err(failed)?;
        let capture = Capture {
            vm: vm.to_string(),
            network: network.to_string(),
            site_file: spec.paths.dir.join(format!("capture-{network}.pcap")),
            to: std::path::absolute(to).map_err(|e| failed(e.to_string()))?,
        };
        let result = self.on_qmp(vm, &what, &spec, &*host, |qmp| {
            qmp.command(
                "object-add",
                serde_json::json!({
                    "qom-type": "filter-dump",
                    "id": capture_id(network),
                    "netdev": netdev,
                    "file": capture.site_file,
                }),
            )
            .map(drop)
        });
        let result = result.and_then(|()| {
            let json = serde_json::to_vec_pretty(&capture).expect("a capture serializes");
            crate::sys::files::replace_file(&record, &json, 0o600)
                .map_err(|e| failed(format!("cannot write `{}`: {e}", record.display())))
        });
        log_verb(
            "capture",
            vm,
            &format!("{network} start"),
            started,
            result.is_ok(),
        );
        result
    }

    /// Stops the capture of `vm`'s NIC on `network` and brings its pcap to where it was
    /// asked to go: that path, and how many frames it holds. A VM that stopped or was
    /// restored meanwhile has no filter any more; what was captured until then is kept.
    pub fn stop_capture(&self, vm: &str, network: &str) -> Result<(PathBuf, usize), VerbError> {
        let results = std::env::var_os(crate::model::lab::test_report::RESULTS_ENV);
        self.stop_capture_keeping(vm, network, results.as_deref().map(Path::new))
    }

    /// [`Lab::stop_capture`], a copy of the pcap kept in `results` too (a test's results
    /// directory: the script may put its own copy where its cleanup removes it).
    fn stop_capture_keeping(
        &self,
        vm: &str,
        network: &str,
        results: Option<&Path>,
    ) -> Result<(PathBuf, usize), VerbError> {
        let started = Instant::now();
        let what = format!("stop its capture on `{network}`");
        let failed = |why: String| VerbError::Qemu {
            vm: vm.to_string(),
            what: what.clone(),
            why,
        };
        let record = capture_record(&self.state, vm, network);
        let capture: Capture = fs_err::read(&record)
            .map_err(|_| {
                failed(format!(
                    "no capture of it runs\nhint: `farm capture {vm} {network} FILE.pcap` starts one"
                ))
            })
            .and_then(|bytes| {
                serde_json::from_slice(&bytes)
                    .map_err(|e| failed(format!("`{}` is damaged: {e}", record.display())))
            })?;
        let (spec, host) = self.site_of(vm)?;
        // Gone with a qemu that stopped or was replaced: nothing to remove then.
        let _ = self.on_qmp(vm, &what, &spec, &*host, |qmp| {
            qmp.command(
                "object-del",
                serde_json::json!({ "id": capture_id(network) }),
            )
            .map(drop)
        });
        let result = host
            .get(&capture.site_file)
            .map_err(VerbError::from)
            .and_then(|bytes| {
                let bytes = bytes.ok_or_else(|| {
                    failed(format!(
                        "its pcap `{}` is gone from {}",
                        capture.site_file.display(),
                        host.name()
                    ))
                })?;
                crate::sys::files::replace_file(&capture.to, &bytes, 0o644)
                    .map_err(|e| failed(format!("cannot write `{}`: {e}", capture.to.display())))?;
                if let Some(results) = results {
                    keep_in(results, &capture, &bytes);
                }
                Ok(pcap_frames(&bytes))
            });
        let _ = host.run(&format!("rm -f {}", quote_path(&capture.site_file)));
        let _ = fs_err::remove_file(&record);
        log_verb(
            "capture",
            vm,
            &format!("{network} stop"),
            started,
            result.is_ok(),
        );
        result.map(|frames| (capture.to, frames))
    }

    /// Stops every capture still running (`farm test` does after each test, its pcaps
    /// kept in the test's `results` too); each one's VM, network, and pcap or why it was
    /// lost.
    pub fn stop_all_captures(&self, results: &Path) -> Vec<(Capture, CaptureStopped)> {
        let records = fs_err::read_dir(self.state.captures_dir())
            .map(|dir| dir.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        records
            .iter()
            .filter_map(|path| serde_json::from_slice::<Capture>(&fs_err::read(path).ok()?).ok())
            .map(|capture| {
                let stopped =
                    self.stop_capture_keeping(&capture.vm, &capture.network, Some(results));
                (capture, stopped)
            })
            .collect()
    }

    /// Writes `vm`'s display to `to` as a PNG (QMP `screendump`, written where the VM runs
    /// and brought here).
    pub fn screenshot(&self, vm: &str, to: &Path) -> Result<(), VerbError> {
        let started = Instant::now();
        let what = "take a screenshot";
        let failed = |why: String| VerbError::Qemu {
            vm: vm.to_string(),
            what: what.to_string(),
            why,
        };
        let (spec, host) = self.site_of(vm)?;
        let result = if !spec.qemu().has_display() {
            Err(failed("it has no display (an aarch64 VM has none)".into()))
        } else {
            let site_file = spec.paths.dir.join("screenshot.png");
            let result = self
                .on_qmp(vm, what, &spec, &*host, |qmp| {
                    qmp.command(
                        "screendump",
                        serde_json::json!({ "filename": site_file, "format": "png" }),
                    )
                    .map(drop)
                })
                .and_then(|()| host.get(&site_file).map_err(VerbError::from))
                .and_then(|bytes| match bytes {
                    Some(png) if png.starts_with(b"\x89PNG\r\n\x1a\n") => {
                        crate::sys::files::replace_file(to, &png, 0o644)
                            .map_err(|e| failed(format!("cannot write `{}`: {e}", to.display())))
                    }
                    _ => Err(failed("qemu wrote no PNG".into())),
                });
            let _ = host.run(&format!("rm -f {}", quote_path(&site_file)));
            result
        };
        log_verb(
            "screenshot",
            vm,
            &to.display().to_string(),
            started,
            result.is_ok(),
        );
        result
    }

    /// Stops `vm`'s qemu at once, as a power cut: nothing in the guest is told, and the VMs
    /// inside a hypervisor go with it. `farm up` starts it again on its overlay.
    pub fn crash(&self, vm: &str) -> Result<(), VerbError> {
        let started = Instant::now();
        let (spec, host) = self.site_of(vm)?;
        let result = crate::run::backend::stop_spec(&*host, &spec, Duration::ZERO, None)
            .map(drop)
            .map_err(|e| VerbError::Qemu {
                vm: vm.to_string(),
                what: "crash it".into(),
                why: e.to_string(),
            });
        // Its shared connection went with it.
        self.state.stop_shared_connection(vm);
        log_verb("crash", vm, "", started, result.is_ok());
        result
    }

    /// Reboots `vm` from inside (`reboot`) and waits up to `timeout` until it answers ssh
    /// in a new boot; how long that took.
    pub fn reboot(&self, vm: &str, timeout: Duration) -> Result<Duration, VerbError> {
        let started = Instant::now();
        let mut ask = self.ssh(vm);
        ask.args(["--", "cat /proc/sys/kernel/random/boot_id"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let out =
            crate::sys::process::output_within(ask, Duration::from_secs(60)).map_err(|source| {
                VerbError::Spawn {
                    program: "ssh",
                    source,
                }
            })?;
        let boot = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.is_none_or(|s| !s.success()) || boot.is_empty() {
            return Err(self.unreachable(vm));
        }
        let mut reboot = self.ssh(vm);
        reboot
            .args(["--", "reboot"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its connection may end with the guest's sshd, before `reboot` returns.
        let _ = crate::sys::process::output_within(reboot, Duration::from_secs(30));
        self.state.stop_shared_connection(vm);
        let new_boot = WaitFor::Until(format!(
            "[ \"$(cat /proc/sys/kernel/random/boot_id)\" != {} ]",
            shell_quote(&boot)
        ));
        let left = timeout.saturating_sub(started.elapsed());
        let waited = self.wait(vm, &new_boot, left).map_err(|e| match e {
            VerbError::TimedOut { vm, console, .. } => VerbError::TimedOut {
                vm,
                what: "new boot answering ssh".into(),
                timeout,
                console,
            },
            other => other,
        });
        log_verb("reboot", vm, "", started, waited.is_ok());
        waited.map(|_| started.elapsed())
    }
}

/// Keeps a copy of `capture`'s pcap in `results/pcaps/`, beside those before it.
fn keep_in(results: &Path, capture: &Capture, pcap: &[u8]) {
    let dir = results.join("pcaps");
    let name = |n: u32| dir.join(format!("{}-{}-{n}.pcap", capture.vm, capture.network));
    let free = (1..)
        .map(name)
        .find(|path| !path.exists())
        .expect("a free name");
    let _ = crate::sys::files::replace_file(&free, pcap, 0o644);
}

/// Where the record of a running capture is kept.
fn capture_record(state: &crate::run::state::StatePaths, vm: &str, network: &str) -> PathBuf {
    state.captures_dir().join(format!("{vm}.{network}.json"))
}

/// How many frames a pcap holds: its records after the 24-byte file header, each a 16-byte
/// header and the frame's captured bytes (in the byte order its magic number says).
fn pcap_frames(pcap: &[u8]) -> usize {
    let little = match pcap.get(..4) {
        Some([0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]) => true,
        Some([0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d]) => false,
        _ => return 0,
    };
    let (mut at, mut frames) = (24usize, 0);
    while let Some(len) = pcap.get(at + 8..at + 12) {
        let len: [u8; 4] = len.try_into().expect("four bytes");
        let len = if little {
            u32::from_le_bytes(len)
        } else {
            u32::from_be_bytes(len)
        } as usize;
        at += 16 + len;
        if at > pcap.len() {
            break;
        }
        frames += 1;
    }
    frames
}

/// The QOM id of a capture's filter on `network`.
fn capture_id(network: &str) -> String {
    format!("farm-capture-{network}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pcaps_frames_are_counted_whole() {
        let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1];
        pcap.resize(24, 0);
        for len in [60u32, 42] {
            pcap.extend_from_slice(&[0; 8]);
            pcap.extend_from_slice(&len.to_le_bytes());
            pcap.extend_from_slice(&len.to_le_bytes());
            pcap.resize(pcap.len() + len as usize, 0xee);
        }
        assert_eq!(pcap_frames(&pcap), 2);
        assert_eq!(
            pcap_frames(&pcap[..pcap.len() - 1]),
            1,
            "a cut frame is not one"
        );
        assert_eq!(pcap_frames(b"not a pcap"), 0);
    }
}
