//! `farm graph`: the topology as DOT, and as SVG where graphviz is installed.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;
use clap::Args;

use crate::model::lab::graph::render_dot;
use crate::project::{Project, ProjectOptions};

#[derive(Debug, Args)]
pub struct GraphArgs {
    /// Where to write the DOT file [default: `.farm/topology.dot` beside farm.toml];
    /// `-` prints it on stdout.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

pub fn run(options: &ProjectOptions, args: GraphArgs) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let dot = render_dot(&project.loaded.config, &project.loaded.topology);
    let path = args
        .output
        .unwrap_or_else(|| project.project_dir().join(".farm").join("topology.dot"));
    if path.as_os_str() == "-" {
        print!("{dot}");
        return Ok(());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs_err::create_dir_all(dir)?;
    }
    fs_err::write(&path, &dot)?;
    println!("{}", path.display());
    let svg = path.with_extension("svg");
    match Command::new("dot")
        .arg("-Tsvg")
        .arg("-o")
        .arg(&svg)
        .arg(&path)
        .status()
    {
        Ok(status) if status.success() => println!("{}", svg.display()),
        Ok(status) => {
            return Err(anyhow::anyhow!("`dot -Tsvg` exited with {status}"))
                .with_context(|| format!("Cannot render `{}` to SVG", path.display()));
        }
        Err(_) => eprintln!(
            "graphviz is not installed, so only the DOT file was written\nhint: apt-get install graphviz, or paste the DOT file into any Graphviz viewer"
        ),
    }
    Ok(())
}
