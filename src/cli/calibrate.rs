//! `bigroc calibrate`: BIGRoC's debiasing vector for pseudo labels.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use bigroc::calibrate::mean_logits;
use bigroc::classifier::Classifier;
use bigroc::data::ImageSource;

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Generated images (folder or sample .npz).
    #[arg(long)]
    input: PathBuf,
    /// Classifier weights; default: the embedded one.
    #[arg(long)]
    classifier: Option<String>,
    /// Where to write d (.npy, one value per class).
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, value_parser = super::parse_size)]
    resize: Option<(usize, usize)>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: CalibrateArgs) -> Result<()> {
    let device = bigroc::device::parse_device(&a.device)?;
    let classifier = Classifier::load(&bigroc::defaults::classifier_spec(a.classifier)?, &device)?;
    let source = ImageSource::open(&a.input)?;
    let mean = mean_logits(&classifier, &source, a.batch_size, a.resize, &device)?;
    let d = bigroc::refine::labels::debias_from_mean_logits(&mean)?;
    bigroc::output::atomic_write(&a.output, |tmp| Ok(d.write_npy(tmp)?))?;
    println!("wrote the debias vector of {} classes over {} images to {}", d.dim(0)?, source.len(), a.output.display());
    Ok(())
}
