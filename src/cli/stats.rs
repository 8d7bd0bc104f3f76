//! `bigroc stats`: cache the FID statistics and Inception features of a reference set.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use bigroc::eval::pipeline::{load_side, LazyInception, Needs};
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
    /// Inception weights (TorchScript inception-2015-12-05.pt or pytorch-fid's .pth);
    /// default $BIGROC_INCEPTION.
    #[arg(long)]
    inception: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: StatsArgs) -> Result<()> {
    let start = Instant::now();
    let net = LazyInception::new(a.inception.clone(), bigroc::device::parse_device(&a.device)?);
    let mut bar = super::Progress::new("features");
    let side = load_side(
        &a.input,
        a.subset.unwrap_or_default(),
        Needs { features: true },
        &net,
        a.batch_size.max(1),
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
