//! `bigroc accuracy`: clean and adversarial accuracy of a classifier on labelled images.

use std::path::PathBuf;

use anyhow::{bail, Result};
use bigroc::accuracy::accuracy;
use bigroc::classifier::Classifier;
use bigroc::refine::{Norm, PgdConfig};
use bigroc::train::batches::ImageSet;
use clap::Args;

#[derive(Debug, Args)]
pub struct AccuracyArgs {
    /// Classifier weights (safetensors from `convert` or `train classifier`; local or hf://);
    /// default: the embedded robust CIFAR-10 classifier.
    #[arg(long)]
    pub classifier: Option<String>,
    /// Labelled images: an ImageFolder directory or .tar, or CIFAR-10 binary/python batches.
    #[arg(long)]
    pub data: PathBuf,
    /// Also attack every image (untargeted PGD from the clean image, best iterate kept).
    #[arg(long, value_enum)]
    pub attack: Option<Norm>,
    /// Attack radius, pixels in [0, 1].
    #[arg(long, default_value_t = 0.5)]
    pub eps: f64,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Attack step size (default 2.5 * eps / steps, the usual PGD evaluation setting).
    #[arg(long)]
    pub step_size: Option<f64>,
    #[arg(long, default_value_t = 250)]
    pub batch_size: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Also write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(a: AccuracyArgs) -> Result<()> {
    let device = bigroc::device::parse_device(&a.device)?;
    let classifier = Classifier::load(&bigroc::defaults::classifier_spec(a.classifier.clone())?, &device)?;
    let data = ImageSet::open(&a.data)?;
    data.validate(&a.data.display().to_string())?;
    if data.classes.len() != classifier.num_classes() {
        bail!("{} has {} classes, classifier {} has {}", a.data.display(), data.classes.len(), classifier.source, classifier.num_classes())
    }
    classifier.check_input_size(data.height, data.width)?;
    let attack = a.attack.map(|norm| PgdConfig {
        norm,
        eps: a.eps,
        step_size: a.step_size.unwrap_or(2.5 * a.eps / a.steps.max(1) as f64),
        steps: a.steps,
        use_best: true,
    });
    let mut progress = bigroc::progress::ImageProgress::new("accuracy");
    let started = std::time::Instant::now();
    let acc = accuracy(&|x| classifier.logits(x), &data, a.batch_size, attack.as_ref(), &device, &mut |done, total| progress.update(done, total))?;
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    println!("images      {}", acc.images);
    println!("clean       {:.2}%", 100.0 * acc.clean);
    if let (Some(adv), Some(p)) = (acc.adversarial, &attack) {
        println!("adversarial {:.2}%  ({:?} eps {} , {} steps of {})", 100.0 * adv, p.norm, p.eps, p.steps, p.step_size);
    }
    println!("time        {seconds:.1} s");
    if let Some(path) = &a.json {
        let value = serde_json::json!({"classifier": classifier.source, "data": a.data, "accuracy": acc, "attack": attack, "seconds": seconds});
        bigroc::output::atomic_write(path, |tmp| Ok(std::fs::write(tmp, serde_json::to_vec_pretty(&value)?)?))?;
    }
    Ok(())
}
