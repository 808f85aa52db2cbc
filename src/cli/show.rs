//! `farm show NAME`: a derivation, its hash, and whether the store holds it.

use clap::Args;

use crate::project::{Project, ProjectOptions};
use crate::store::Store;

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// An image, a platform (all targets it is built for), a `<platform>_<target>`, or a VM.
    pub name: String,
    /// Print JSON: `[{name, hash, derivation, in_store}]`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(options: &ProjectOptions, args: ShowArgs) -> anyhow::Result<()> {
    let project = Project::load(options)?;
    let ids = project.resolve(&args.name)?;
    let store = Store::open_existing(&project.store_dir)?;
    let mut shown = Vec::new();
    for id in &ids {
        let node = &project.graph.nodes[id];
        let entry = store
            .as_ref()
            .and_then(|s| s.lookup(&node.hash, &node.name).ok().flatten());
        if args.json {
            shown.push(serde_json::json!({
                "name": node.name,
                "hash": node.hash.to_string(),
                "derivation": serde_json::to_value(&node.derivation)?,
                "in_store": entry.as_ref().map(|e| e.dir.display().to_string()),
            }));
        } else {
            println!("name: {}", node.name);
            println!("hash: {}", node.hash);
            match &entry {
                Some(e) => println!("store: {}", e.dir.display()),
                None => println!("store: not built"),
            }
            println!("derivation: {}", node.derivation.pretty());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
    }
    Ok(())
}
