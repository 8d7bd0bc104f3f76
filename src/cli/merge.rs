//! `bigroc merge`: join the .npz shards of a sharded run.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The shard files (any order).
    #[arg(required = true)]
    shards: Vec<PathBuf>,
    #[arg(long)]
    output: PathBuf,
}

pub fn run(a: MergeArgs) -> Result<()> {
    let n = bigroc::merge::merge_shards(&a.shards, &a.output)?;
    println!("merged {} images from {} shards into {}", n, a.shards.len(), a.output.display());
    Ok(())
}
