//! Command-line interface: clap definitions, one file per subcommand; each turns its
//! arguments into options and calls the library. Exit codes: 0 success, 1 failure,
//! 2 bad input (invalid farm.toml, unknown name, bad flags).

mod build;
mod cache;
mod check;
mod down;
mod gc;
mod graph;
mod image;
mod lab;
mod logs;
mod show;
mod snapshot;
mod ssh;
mod status;
mod store;
mod test;
mod up;
mod verbs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::ConfigError;
use crate::progress::Reporter;
use crate::project::ProjectOptions;
use crate::store::StoreError;

#[derive(Debug, Parser)]
#[command(
    name = "farm",
    version,
    about = "Build cached, verified VM images from one farm.toml and run nested VM labs from them"
)]
pub struct Cli {
    /// The project's farm.toml; `images/` and `platforms/` beside it are read too.
    #[arg(
        short = 'f',
        long,
        global = true,
        env = "FARM_CONFIG",
        default_value = "farm.toml"
    )]
    pub config: PathBuf,

    /// The store directory [default: `cache/` beside farm.toml].
    #[arg(long, global = true, env = "FARM_STORE")]
    pub store: Option<PathBuf>,

    /// Print no progress or status lines (errors are still printed).
    #[arg(short, long, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Realise derivations into the store: fetch and verify images, build platform layers.
    Build(build::BuildArgs),
    /// Print what `farm build` would do: cached, fetch, or build, for each derivation.
    Plan(build::PlanArgs),
    /// Print a derivation and its hash.
    Show(show::ShowArgs),
    /// Validate farm.toml and print the topology it describes.
    Check(check::CheckArgs),
    /// Inspect and verify the store.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Write built platforms out as standalone artifacts for other tools.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Remove store entries that no project, instance or running VM needs, and leftovers.
    Gc(gc::GcArgs),
    /// Build what is missing, then start the topology's VMs and wait for ssh; idempotent.
    Up(up::UpArgs),
    /// Stop VMs (deepest first) and remove their overlays.
    Down(down::DownArgs),
    /// Show every VM as a tree under its host: platform, address, state (running,
    /// unreachable, stopped, missing, changed, orphaned), accelerator.
    Status(status::StatusArgs),
    /// Open a shell, or run a command, on a VM through the generated ssh_config.
    Ssh(ssh::SshArgs),
    /// Run a command as root on a VM at any level; farm exits with its status.
    Exec(verbs::ExecArgs),
    /// Wait until a port listens, a file exists, a command succeeds or a unit is active in a VM.
    Wait(verbs::WaitArgs),
    /// Copy files between this machine and a VM at any level (`VM:PATH` on the VM's side).
    Cp(verbs::CpArgs),
    /// Cut (`down`) or plug back (`up`) the cable of a VM's NIC on a network; on a VDE
    /// network, also delay, drop or slow its frames.
    Link(verbs::LinkArgs),
    /// Capture the frames of a VM's NIC into a pcap (until `--stop`, or `--for` a while).
    Capture(verbs::CaptureArgs),
    /// Write a VM's display to a PNG.
    Screenshot(verbs::ScreenshotArgs),
    /// Cut a VM's power: its qemu stops at once (`farm up` starts it again).
    Crash(verbs::CrashArgs),
    /// Reboot a VM from inside and wait until it answers ssh again.
    Reboot(verbs::RebootArgs),
    /// Run farm.toml's tests against the lab, each from its start snapshot.
    Test(test::TestArgs),
    /// Print a VM's serial console, wherever it runs.
    Logs(logs::LogsArgs),
    /// Print an Ansible inventory of the VMs, reached through farm's ssh_config.
    Inventory(ssh::InventoryArgs),
    /// Write the topology (hosts, VMs, networks) as a Graphviz DOT file, and SVG if `dot` is installed.
    Graph(graph::GraphArgs),
    /// Save the running lab, nested VMs included, and restore it in seconds.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
}

pub use crate::project::UsageError;

pub fn main() -> ExitCode {
    crate::sys::process::handle_interrupts();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Plan(_)
            | Command::Show(_)
            | Command::Check(_)
            | Command::Store(_)
            | Command::Inventory(_)
    ) {
        crate::sys::process::exit_quietly_on_closed_stdout();
    }
    let reporter = Reporter::new(cli.quiet);
    let options = ProjectOptions {
        config: cli.config.clone(),
        store: cli.store.clone(),
    };
    if let Command::Exec(args) = cli.command {
        return match verbs::exec(&options, args) {
            Ok(code) => code,
            Err(err) => {
                print_error(&err, &options);
                exit_code_for(&err)
            }
        };
    }
    let result = match cli.command {
        Command::Build(args) => build::run(&options, args, &reporter),
        Command::Plan(args) => build::plan(&options, args, &reporter),
        Command::Show(args) => show::run(&options, args),
        Command::Check(args) => check::run(&options, args),
        Command::Store(command) => store::run(&options, command, &reporter),
        Command::Image(command) => image::run(&options, command, &reporter),
        Command::Gc(args) => gc::run(&options, args, &reporter),
        Command::Up(args) => up::run(&options, args, &reporter),
        Command::Down(args) => down::run(&options, args, &reporter),
        Command::Status(args) => status::run(&options, args, &reporter),
        Command::Ssh(args) => ssh::run_ssh(&options, args),
        Command::Exec(_) => unreachable!("handled above: it exits with the command's status"),
        Command::Wait(args) => verbs::wait(&options, args, &reporter),
        Command::Cp(args) => verbs::cp(&options, args, &reporter),
        Command::Test(args) => test::run(&options, args, &reporter),
        Command::Link(args) => verbs::link(&options, args, &reporter),
        Command::Capture(args) => verbs::capture(&options, args, &reporter),
        Command::Screenshot(args) => verbs::screenshot(&options, args, &reporter),
        Command::Crash(args) => verbs::crash(&options, args, &reporter),
        Command::Reboot(args) => verbs::reboot(&options, args, &reporter),
        Command::Logs(args) => logs::run(&options, args),
        Command::Inventory(args) => ssh::run_inventory(&options, args),
        Command::Graph(args) => graph::run(&options, args),
        Command::Snapshot(command) => snapshot::run(&options, command, &reporter),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            print_error(&err, &options);
            exit_code_for(&err)
        }
    }
}

fn exit_code_for(err: &anyhow::Error) -> ExitCode {
    let bad_input = err.chain().any(|cause| {
        cause.downcast_ref::<ConfigError>().is_some()
            || cause.downcast_ref::<UsageError>().is_some()
            || matches!(
                cause.downcast_ref::<crate::run::snapshot::SnapshotError>(),
                Some(crate::run::snapshot::SnapshotError::Refused(_))
            )
            || cause
                .downcast_ref::<crate::maintain::ChooseError>()
                .is_some_and(crate::maintain::ChooseError::is_bad_input)
            || cause
                .downcast_ref::<crate::binary_cache::keys::KeyError>()
                .is_some_and(crate::binary_cache::keys::KeyError::is_bad_input)
            || cause.downcast_ref::<StoreError>().is_some_and(|e| {
                // A `--store` that names nothing, or a file: the command line is wrong.
                matches!(
                    e,
                    StoreError::NoStore { .. } | StoreError::NotADirectory { .. }
                )
            })
    });
    ExitCode::from(if bad_input { 2 } else { 1 })
}

fn print_error(err: &anyhow::Error, options: &ProjectOptions) {
    if let Some(ConfigError::Invalid { rendered, .. }) = err.downcast_ref::<ConfigError>() {
        eprintln!("{rendered}");
        return;
    }
    eprintln!("error: {err}");
    // Many messages already end with their cause; each line is said once.
    for cause in crate::model::text::unsaid_causes(err.as_ref()) {
        eprintln!("  caused by: {cause}");
    }
    // A full disk somewhere below: farm writes to the store and the project's `.farm/`.
    let store = options.store_dir();
    let project = options
        .config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if let Some(note) = crate::sys::space::full_note(err.as_ref(), &[&store, project]) {
        eprintln!("{note}");
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_subcommand_has_consistent_arguments() {
        super::Cli::command().debug_assert();
    }
}
