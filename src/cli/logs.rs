//! `farm logs VM [-f]`: a VM's serial console, read where the VM runs: a file here, or
//! over ssh on a remote host or inside a hypervisor VM. It only reads.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clap::Args;

use crate::model::lab::instance::InstancePaths;
use crate::model::lab::up_plan::SiteLayout;
use crate::model::shell::quote_path;
use crate::project::{Project, ProjectOptions};
use crate::run::state::StatePaths;

use super::lab::{StateArgs, check_vm_names};

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The VM.
    pub name: String,
    /// Keep printing what the console writes (no `-f`: that is farm's `--config`).
    #[arg(long)]
    pub follow: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

pub fn run(options: &ProjectOptions, args: LogsArgs) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    check_vm_names(&project, std::slice::from_ref(&args.name))?;
    let topology = &project.loaded.topology;
    let state = StatePaths::new(&args.state.dir(&project));
    let vm = &topology.vms[&args.name];
    if !state.instance(&args.name).dir.is_dir() {
        anyhow::bail!(
            "VM `{}` has not been started, so it has no console log\nhint: `farm up {}` starts it",
            args.name,
            args.name
        );
    }
    let layout = SiteLayout::of(topology, &vm.placement, state.root(), Path::new(""));
    let serial = InstancePaths::new(&layout.state_dir, &args.name).serial_log();
    if !layout.remote {
        return print_local(&serial, args.follow);
    }
    // On the VM's site, through the same ssh_config users get: `tail -F` follows a log
    // that a restart truncates.
    let path = quote_path(&serial);
    let remote = if args.follow {
        format!("tail -n +1 -F {path}")
    } else {
        format!("cat {path}")
    };
    let err = Command::new("ssh")
        .arg("-F")
        .arg(state.ssh_config())
        .args(["-o", "LogLevel=ERROR", vm.placement.name(), &remote])
        .exec();
    Err(anyhow::anyhow!(
        "Cannot run `ssh`: {err}\nhint: apt-get install openssh-client"
    ))
}

fn print_local(path: &Path, follow: bool) -> anyhow::Result<()> {
    let mut file = fs_err::File::open(path)?;
    let mut stdout = std::io::stdout();
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    stdout.write_all(&buf)?;
    if !follow {
        return Ok(());
    }
    let mut pos = file.stream_position()?;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let len = fs_err::metadata(path)?.len();
        if len < pos {
            pos = 0; // the VM restarted: its console log was truncated
        }
        if len > pos {
            file.seek(SeekFrom::Start(pos))?;
            buf.clear();
            file.read_to_end(&mut buf)?;
            stdout.write_all(&buf)?;
            stdout.flush()?;
            pos += buf.len() as u64;
        }
    }
}
