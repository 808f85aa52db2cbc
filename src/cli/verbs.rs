//! `farm exec`, `wait`, `cp`, `link`, `capture`, `screenshot`, `crash` and `reboot`: the verbs a test script calls on a running lab,
//! at any level (see `run::verbs`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::model::lab::wait::WaitFor;
use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions, UsageError};
use crate::run::state::StatePaths;
use crate::run::verbs::{Lab, Shaping, Transfer};

use super::lab::{StateArgs, check_vm_names};

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The VM.
    pub name: String,
    /// The command, run as root by the VM's shell (after `--`): one argument is a command
    /// line (`'echo $HOME; ls'`), several a command and its arguments, each kept whole.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("condition").required(true).args(["port", "file", "until", "unit", "console"])))]
pub struct WaitArgs {
    /// The VM.
    pub name: String,
    /// Until this TCP port listens in the VM.
    #[arg(long)]
    pub port: Option<u16>,
    /// Until this path exists in the VM.
    #[arg(long)]
    pub file: Option<String>,
    /// Until this shell command succeeds in the VM.
    #[arg(long)]
    pub until: Option<String>,
    /// Until this systemd unit is active (a failed unit fails the wait at once).
    #[arg(long)]
    pub unit: Option<String>,
    /// Until a line of the VM's serial console since its qemu started matches this
    /// extended regular expression (`grep -E`).
    #[arg(long, value_name = "REGEX")]
    pub console: Option<String>,
    /// Seconds to wait at most.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["state_of_link", "delay", "loss", "rate"])))]
pub struct LinkArgs {
    /// The VM.
    pub name: String,
    /// Its NIC, by network: a VDE network's name, or `user` for QEMU's user network.
    pub network: String,
    /// Cut the cable (`down`) or plug it back (`up`).
    #[arg(value_enum)]
    pub state_of_link: Option<LinkState>,
    /// On a VDE network: delay every frame, both ways (`150ms`, `2s`; `0` for none).
    #[arg(long, value_parser = crate::model::lab::wire::parse_delay)]
    pub delay: Option<u64>,
    /// On a VDE network: drop this share of frames, both ways (`5%`; `0` for none).
    #[arg(long, value_parser = crate::model::lab::wire::parse_loss)]
    pub loss: Option<f64>,
    /// On a VDE network: the line's bandwidth, both ways (`512kbit`, `10mbit`; `0` for no limit).
    #[arg(long, value_parser = crate::model::lab::wire::parse_rate)]
    pub rate: Option<u64>,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// The VM.
    pub name: String,
    /// Its NIC, by network: a VDE network's name, or `user` for QEMU's user network.
    pub network: String,
    /// The pcap to write when the capture stops (not with `--stop`).
    #[arg(required_unless_present = "stop")]
    pub file: Option<PathBuf>,
    /// Capture this long, then stop (`10s`, `2m`); without it the capture runs until
    /// `farm capture --stop`.
    #[arg(long = "for", value_name = "DURATION", conflicts_with = "stop")]
    pub duration: Option<String>,
    /// Stop the running capture and write its pcap.
    #[arg(long)]
    pub stop: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
pub struct ScreenshotArgs {
    /// The VM.
    pub name: String,
    /// The PNG to write.
    pub file: PathBuf,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LinkState {
    Up,
    Down,
}

#[derive(Debug, Args)]
pub struct CrashArgs {
    /// The VM.
    pub name: String,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
pub struct RebootArgs {
    /// The VM.
    pub name: String,
    /// Seconds to wait at most for it to answer again.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: `VM:PATH` or a local path.
    pub from: String,
    /// Where to: a local path or `VM:PATH` (one side is a VM).
    pub to: String,
    /// Copy directories and what they hold.
    #[arg(short, long)]
    pub recursive: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

/// The lab of `project` whose VM `name` is up.
fn lab_with<'a>(project: &'a Project, state: &StateArgs, name: &str) -> anyhow::Result<Lab<'a>> {
    check_vm_names(project, &[name.to_string()])?;
    let state = StatePaths::new(&state.dir(project));
    if !state.instance(name).dir.is_dir() {
        anyhow::bail!("VM `{name}` is not up\nhint: `farm up {name}` starts it");
    }
    Ok(Lab {
        topology: &project.loaded.topology,
        state,
    })
}

/// Runs the command; farm exits with its status.
pub fn exec(options: &ProjectOptions, args: ExecArgs) -> anyhow::Result<ExitCode> {
    let project = Project::load(options)?;
    let lab = lab_with(&project, &args.state, &args.name)?;
    let code = lab.exec(&args.name, &args.command)?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

pub fn wait(options: &ProjectOptions, args: WaitArgs, reporter: &Reporter) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let lab = lab_with(&project, &args.state, &args.name)?;
    let what = match (args.port, args.file, args.until, args.unit, args.console) {
        (Some(port), ..) => WaitFor::Port(port),
        (_, Some(file), ..) => WaitFor::File(file),
        (_, _, Some(command), ..) => WaitFor::Until(command),
        (_, _, _, Some(unit), _) => WaitFor::Unit(unit),
        (.., Some(regex)) => WaitFor::Console(regex),
        _ => unreachable!("clap requires one condition"),
    };
    let took = lab.wait(&args.name, &what, Duration::from_secs(args.timeout))?;
    reporter.status(
        "waited",
        format!(
            "{} for {} ({:.1} s)",
            args.name,
            what.describe(),
            took.as_secs_f64()
        ),
    );
    Ok(())
}

pub fn cp(options: &ProjectOptions, args: CpArgs, reporter: &Reporter) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let vm_of = |side: &str| {
        side.split_once(':')
            .map(|(vm, _)| vm.to_string())
            .filter(|vm| project.loaded.topology.vms.contains_key(vm))
    };
    let vm = match (vm_of(&args.from), vm_of(&args.to)) {
        (Some(vm), None) | (None, Some(vm)) => vm,
        _ => {
            return Err(UsageError {
                message: format!(
                    "`farm cp {} {}` copies between this machine and one VM",
                    args.from, args.to
                ),
                hint: "write the VM's side as `VM:PATH`, with a VM of farm.toml".to_string(),
            }
            .into());
        }
    };
    let lab = lab_with(&project, &args.state, &vm)?;
    let path_of = |side: &str| side.split_once(':').map_or("", |(_, p)| p).to_string();
    let copy = if vm_of(&args.from).is_some() {
        Transfer::FromVm {
            remote: path_of(&args.from),
            local: args.to.clone().into(),
        }
    } else {
        Transfer::ToVm {
            local: args.from.clone().into(),
            remote: path_of(&args.to),
        }
    };
    let started = std::time::Instant::now();
    lab.copy(&vm, &copy, args.recursive)?;
    reporter.status(
        "copied",
        format!(
            "{} to {} ({:.1} s)",
            args.from,
            args.to,
            started.elapsed().as_secs_f64()
        ),
    );
    Ok(())
}

/// Cuts the VM's power: its qemu stops at once.
pub fn crash(options: &ProjectOptions, args: CrashArgs, reporter: &Reporter) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let lab = lab_with(&project, &args.state, &args.name)?;
    lab.crash(&args.name)?;
    reporter.status(
        "crashed",
        format!("{} (`farm up` starts it again)", args.name),
    );
    Ok(())
}

pub fn reboot(
    options: &ProjectOptions,
    args: RebootArgs,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let lab = lab_with(&project, &args.state, &args.name)?;
    let took = lab.reboot(&args.name, Duration::from_secs(args.timeout))?;
    reporter.status(
        "rebooted",
        format!("{} ({:.1} s)", args.name, took.as_secs_f64()),
    );
    Ok(())
}

pub fn link(options: &ProjectOptions, args: LinkArgs, reporter: &Reporter) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let lab = lab_with(&project, &args.state, &args.name)?;
    let shaping = Shaping {
        delay_ms: args.delay,
        loss_percent: args.loss,
        rate_bytes: args.rate,
    };
    if !shaping.is_empty() {
        lab.shape(&args.name, &args.network, &shaping)?;
        reporter.status(
            "shaped",
            format!("{} on {}: {}", args.name, args.network, shaping.describe()),
        );
    }
    if let Some(state) = args.state_of_link {
        let up = state == LinkState::Up;
        lab.link(&args.name, &args.network, up)?;
        reporter.status(
            if up { "linked" } else { "unlinked" },
            format!("{} on {}", args.name, args.network),
        );
    }
    Ok(())
}

pub fn capture(
    options: &ProjectOptions,
    args: CaptureArgs,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let lab = lab_with(&project, &args.state, &args.name)?;
    let duration = args
        .duration
        .as_deref()
        .map(|text| crate::model::config::limits::duration("--for", text))
        .transpose()
        .map_err(|refusal| UsageError {
            message: refusal.message,
            hint: refusal.hint,
        })?;
    if !args.stop {
        let file = args.file.as_deref().expect("clap requires the file");
        lab.start_capture(&args.name, &args.network, file)?;
        reporter.status(
            "capturing",
            format!("{} on {} into {}", args.name, args.network, file.display()),
        );
        match duration {
            Some(duration) => std::thread::sleep(duration),
            None => return Ok(()),
        }
    }
    let (file, frames) = lab.stop_capture(&args.name, &args.network)?;
    reporter.status(
        "captured",
        format!(
            "{frames} frames of {} on {} in {}",
            args.name,
            args.network,
            file.display()
        ),
    );
    Ok(())
}

pub fn screenshot(
    options: &ProjectOptions,
    args: ScreenshotArgs,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let lab = lab_with(&project, &args.state, &args.name)?;
    lab.screenshot(&args.name, &args.file)?;
    reporter.status(
        "screenshot",
        format!("of {} in {}", args.name, args.file.display()),
    );
    Ok(())
}
