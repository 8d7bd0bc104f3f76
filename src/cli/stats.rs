//! `bigroc stats`: cache the FID statistics and Inception features of a reference set.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use bigroc::eval::pipeline::{load_side, Needs};
use bigroc::eval::stats_file::write_stats;
use bigroc::eval::Selection;
use clap::Args;

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Image folder, sample .npz (`arr_0`), or .tar of an image folder.
    #[arg(long)]
    input: PathBuf,
    /// Output .npz with `mu`, `sigma` (float64) and `features` (and `logits` when available).
    #[arg(long)]
    output: PathBuf,
    /// Only these images of the input, as START:END[:STEP] (e.g. 0:5000, 1::2).
    #[arg(long)]
    subset: Option<Selection>,
    #[command(flatten)]
    network: super::InceptionArgs,
}

pub fn run(a: StatsArgs) -> Result<()> {
    let start = Instant::now();
    let net = a.network.network()?;
    let mut bar = bigroc::progress::ImageProgress::new("features");
    let side = load_side(
        &a.input,
        a.subset.unwrap_or_default(),
        Needs { features: true },
        &net,
        a.network.batch(),
        &mut |done, total| {
            bar.update(done, total);
        },
    )?;
    bar.finish();
    let (stats, features) = (side.stats.unwrap(), side.features.unwrap());
    write_stats(&a.output, &stats, &features)?;
    println!(
        "wrote {} ({} images, {}-d features{}) in {:.1} s",
        a.output.display(),
        features.count,
        stats.dim,
        if features.logits.is_some() {
            ", with logits"
        } else {
            ""
        },
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
