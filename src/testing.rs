//! farm's verbs as a Rust API, for tests written in Rust: a [`Lab`] loaded from a
//! farm.toml, and a [`Vm`] handle per VM that reaches it at any depth (through its jump
//! chain, and its hypervisor's QMP). The same code as `farm exec`, `farm wait`, `farm cp`,
//! `farm link`, `farm capture`, `farm screenshot`, `farm crash` and `farm reboot`
//! (`run::verbs`), so a Rust test and a shell script see one behaviour; and whole-lab
//! snapshots, so every test starts from a saved moment in seconds.
//!
//! ```no_run
//! use std::time::Duration;
//! let lab = farm::testing::Lab::open("farm.toml".as_ref(), None)?;
//! lab.restore("converged")?;
//! let l2 = lab.vm("debian_vs_vde_amd64");
//! l2.wait_for_port(22, Duration::from_secs(60))?;
//! assert!(l2.succeed("cat /etc/motd")?.contains("example_03"));
//! # Ok::<(), farm::testing::TestingError>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::lab::snapshot::SnapshotManifest;
use crate::model::lab::wait::WaitFor;
use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions};
use crate::run::state::StatePaths;
pub use crate::run::verbs::Shaping;
use crate::run::verbs::{Transfer, VerbError};

#[derive(Debug, thiserror::Error)]
pub enum TestingError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Verb(#[from] VerbError),
    #[error(transparent)]
    Snapshot(#[from] crate::run::snapshot::SnapshotError),
    #[error("VM `{vm}`: `{command}` exited with {status}, {expected}\n{output}")]
    Unexpected {
        vm: String,
        command: String,
        status: i32,
        expected: &'static str,
        output: String,
    },
}

/// A lab: its farm.toml, store and state directory.
pub struct Lab {
    project: Project,
    state_root: PathBuf,
    reporter: Reporter,
}

impl Lab {
    /// The lab of `config`, with the store `store` (`cache/` beside farm.toml when `None`)
    /// and its state in `.farm/` beside farm.toml, as the commands have them.
    pub fn open(config: &Path, store: Option<&Path>) -> Result<Lab, TestingError> {
        let project = Project::load(&ProjectOptions {
            config: config.to_path_buf(),
            store: store.map(Path::to_path_buf),
        })?;
        let state_root = crate::run::lab::state_dir_for(&project, None);
        Ok(Lab {
            project,
            state_root,
            reporter: Reporter::new(false),
        })
    }

    /// The same lab with its state in `dir` (as `--state`).
    pub fn with_state(mut self, dir: &Path) -> Lab {
        self.state_root = dir.to_path_buf();
        self
    }

    /// A handle on VM `name` (checked when it is used).
    pub fn vm(&self, name: &str) -> Vm<'_> {
        Vm {
            lab: self,
            name: name.to_string(),
        }
    }

    /// Stops what runs and starts every VM of `snapshot` from it; how long until every VM
    /// answered ssh.
    pub fn restore(&self, snapshot: &str) -> Result<SnapshotManifest, TestingError> {
        Ok(crate::run::snapshot::restore(
            &self.project,
            &self.state_root,
            snapshot,
            &self.reporter,
        )?)
    }

    /// Saves the running lab as `snapshot`; it runs on.
    pub fn save(&self, snapshot: &str) -> Result<SnapshotManifest, TestingError> {
        Ok(crate::run::snapshot::save(
            &self.project,
            &self.state_root,
            snapshot,
            &[],
            false,
            &self.reporter,
        )?)
    }

    fn verbs(&self) -> crate::run::verbs::Lab<'_> {
        crate::run::verbs::Lab {
            topology: &self.project.loaded.topology,
            state: StatePaths::new(&self.state_root),
        }
    }
}

/// One VM of a [`Lab`], at any depth. Commands run as root through the VM's shell.
pub struct Vm<'a> {
    lab: &'a Lab,
    name: String,
}

impl Vm<'_> {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `command`: its exit status, and its stdout then its stderr.
    pub fn execute(&self, command: &str) -> Result<(i32, String), TestingError> {
        let (status, stdout, stderr) = self.lab.verbs().exec_captured(&self.name, command)?;
        let mut output = String::from_utf8_lossy(&stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&stderr));
        Ok((status, output))
    }

    /// Runs `command`, which must succeed; its stdout.
    pub fn succeed(&self, command: &str) -> Result<String, TestingError> {
        let (status, stdout, stderr) = self.lab.verbs().exec_captured(&self.name, command)?;
        if status != 0 {
            return Err(self.unexpected(command, status, "expected 0", &stdout, &stderr));
        }
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    }

    /// Runs `command`, which must fail; its stdout and stderr.
    pub fn fail(&self, command: &str) -> Result<String, TestingError> {
        let (status, output) = self.execute(command)?;
        if status == 0 {
            return Err(TestingError::Unexpected {
                vm: self.name.clone(),
                command: command.to_string(),
                status,
                expected: "expected a failure",
                output,
            });
        }
        Ok(output)
    }

    fn unexpected(
        &self,
        command: &str,
        status: i32,
        expected: &'static str,
        stdout: &[u8],
        stderr: &[u8],
    ) -> TestingError {
        TestingError::Unexpected {
            vm: self.name.clone(),
            command: command.to_string(),
            status,
            expected,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(stdout),
                String::from_utf8_lossy(stderr)
            ),
        }
    }

    fn wait(&self, what: WaitFor, timeout: Duration) -> Result<Duration, TestingError> {
        Ok(self.lab.verbs().wait(&self.name, &what, timeout)?)
    }

    /// Until a TCP port listens; how long that took.
    pub fn wait_for_port(&self, port: u16, timeout: Duration) -> Result<Duration, TestingError> {
        self.wait(WaitFor::Port(port), timeout)
    }

    /// Until a path exists.
    pub fn wait_for_file(&self, path: &str, timeout: Duration) -> Result<Duration, TestingError> {
        self.wait(WaitFor::File(path.to_string()), timeout)
    }

    /// Until a systemd unit is active (a failed unit fails at once).
    pub fn wait_for_unit(&self, unit: &str, timeout: Duration) -> Result<Duration, TestingError> {
        self.wait(WaitFor::Unit(unit.to_string()), timeout)
    }

    /// Until `command` succeeds.
    pub fn wait_until_succeeds(
        &self,
        command: &str,
        timeout: Duration,
    ) -> Result<Duration, TestingError> {
        self.wait(WaitFor::Until(command.to_string()), timeout)
    }

    /// Until a line of the serial console (since its qemu started) matches the extended
    /// regular expression `regex`.
    pub fn wait_for_console_text(
        &self,
        regex: &str,
        timeout: Duration,
    ) -> Result<Duration, TestingError> {
        self.wait(WaitFor::Console(regex.to_string()), timeout)
    }

    /// Copies a local file (or, with `recursive`, a directory's contents) into the VM.
    pub fn copy_to(&self, local: &Path, remote: &str, recursive: bool) -> Result<(), TestingError> {
        let copy = Transfer::ToVm {
            local: local.to_path_buf(),
            remote: remote.to_string(),
        };
        Ok(self.lab.verbs().copy(&self.name, &copy, recursive)?)
    }

    /// Copies a file (or, with `recursive`, a directory's contents) out of the VM.
    pub fn copy_from(
        &self,
        remote: &str,
        local: &Path,
        recursive: bool,
    ) -> Result<(), TestingError> {
        let copy = Transfer::FromVm {
            remote: remote.to_string(),
            local: local.to_path_buf(),
        };
        Ok(self.lab.verbs().copy(&self.name, &copy, recursive)?)
    }

    /// Cuts the cable of its NIC on `network` (`user` for QEMU's user network).
    pub fn block(&self, network: &str) -> Result<(), TestingError> {
        Ok(self.lab.verbs().link(&self.name, network, false)?)
    }

    /// Plugs the cable of its NIC on `network` back.
    pub fn unblock(&self, network: &str) -> Result<(), TestingError> {
        Ok(self.lab.verbs().link(&self.name, network, true)?)
    }

    /// Delays, drops or slows the frames of its NIC on the VDE network `network`.
    pub fn shape(&self, network: &str, shaping: &Shaping) -> Result<(), TestingError> {
        Ok(self.lab.verbs().shape(&self.name, network, shaping)?)
    }

    /// Starts capturing the frames of its NIC on `network`; [`Vm::stop_capture`] writes them
    /// to `pcap`.
    pub fn start_capture(&self, network: &str, pcap: &Path) -> Result<(), TestingError> {
        Ok(self.lab.verbs().start_capture(&self.name, network, pcap)?)
    }

    /// Stops the capture on `network`: the pcap's path and how many frames it holds.
    pub fn stop_capture(&self, network: &str) -> Result<(PathBuf, usize), TestingError> {
        Ok(self.lab.verbs().stop_capture(&self.name, network)?)
    }

    /// Writes its display to `png`.
    pub fn screenshot(&self, png: &Path) -> Result<(), TestingError> {
        Ok(self.lab.verbs().screenshot(&self.name, png)?)
    }

    /// Cuts its power: its qemu stops at once, the VMs inside it with it.
    pub fn crash(&self) -> Result<(), TestingError> {
        Ok(self.lab.verbs().crash(&self.name)?)
    }

    /// Reboots it from inside and waits until it answers in a new boot.
    pub fn reboot(&self, timeout: Duration) -> Result<Duration, TestingError> {
        Ok(self.lab.verbs().reboot(&self.name, timeout)?)
    }

    /// Its whole serial console, read where it runs.
    pub fn console(&self) -> String {
        self.lab.verbs().console(&self.name)
    }
}
