//! `farm image export`: a built platform as one standalone disk (`crate::image_export`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::image_export::{ExportError, ExportRequest, export};
use crate::model::build::export::{Checksum, ExportFormat};
use crate::model::text::human_bytes;
use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions};
use crate::store::Store;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Write a built platform as one standalone disk (its chain flattened, no backing
    /// file), with its checksum (`FILE.blake3` for `b3sum -c`, or `FILE.sha256`) and
    /// `FILE.farm.json` (the derivation it came from) beside it.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A platform built for one target, a `<platform>_<target>`, or an image.
    pub name: String,
    /// The disk to write.
    pub file: PathBuf,
    /// `qcow2` or `raw` (the same bytes every export of one derivation), `vmdk` or `vhdx`;
    /// `containerdisk`: a KubeVirt containerDisk as an OCI archive (also the same bytes).
    #[arg(long, default_value = "qcow2")]
    pub format: ExportFormat,
    /// qcow2 with compressed clusters (also the qcow2 inside a containerdisk): smaller,
    /// slower to read.
    #[arg(long)]
    pub compress: bool,
    /// The checksum beside FILE: `blake3` (`b3sum -c FILE.blake3`; farm's own hash, and
    /// as fast as the disk is written) or `sha256` (`sha256sum -c FILE.sha256`).
    #[arg(long, default_value = "blake3")]
    pub checksum: Checksum,
    /// containerdisk: also send the image to REGISTRY/REPOSITORY[:TAG] (plain HTTP for a
    /// registry on a loopback address; `FARM_OCI_USERNAME`/`FARM_OCI_PASSWORD` for
    /// credentials).
    #[arg(long, value_name = "REGISTRY/REPOSITORY:TAG")]
    pub push: Option<String>,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
    /// Build NAME first when the store lacks it (as `farm build NAME`, with its defaults).
    #[arg(long)]
    pub build: bool,
}

pub fn run(
    options: &ProjectOptions,
    command: ImageCommand,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let ImageCommand::Export(args) = command;
    if args.build {
        crate::cli::build::run(options, build_args(&args.name)?, reporter)?;
    }
    let project = Project::load(options)?;
    let store = Store::open_existing(&project.store_dir)?.ok_or_else(|| ExportError::NotBuilt {
        name: args.name.clone(),
        store: project.store_dir.clone(),
    })?;
    let _use = store.use_shared(reporter)?;
    let bar = reporter.bytes_for(
        "export",
        &format!("{} to `{}`", args.name, args.file.display()),
        Some(0),
    );
    let exported = export(
        &project,
        &store,
        &ExportRequest {
            name: &args.name,
            file: &args.file,
            format: args.format,
            compress: args.compress,
            checksum: args.checksum,
            force: args.force,
            push: args.push.as_deref(),
            progress: &bar,
        },
    )
    .with_context(|| format!("Cannot export `{}`", args.name));
    bar.finish_and_clear();
    let exported = exported?;
    reporter.line(format!(
        "{:>12} {} ({}) as `{}`: {} {}, {} {} ({:.1} s)",
        "exported",
        args.name,
        exported.entry,
        args.file.display(),
        args.format,
        human_bytes(exported.bytes),
        args.checksum,
        exported.checksum_hex,
        exported.elapsed.as_secs_f64()
    ));
    if let Some(target) = &args.push {
        reporter.line(format!("{:>12} {} to `{target}`", "pushed", args.name));
    }
    Ok(())
}

/// `farm build NAME`'s arguments, every option at its default (and its environment
/// variables honoured), as the command line would give them.
fn build_args(name: &str) -> anyhow::Result<crate::cli::build::BuildArgs> {
    use clap::{Args as _, FromArgMatches};
    let command = crate::cli::build::BuildArgs::augment_args(clap::Command::new("build"));
    let matches = command.try_get_matches_from(["build", name])?;
    Ok(crate::cli::build::BuildArgs::from_arg_matches(&matches)?)
}
