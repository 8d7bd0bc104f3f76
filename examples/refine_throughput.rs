//! Times BIGRoC's refine workload (7 targeted L2 steps, use_best) on one weights file: the bigroc
//! side of `cargo xtask bench`. Prints one JSON line. One warm-up run, then the median of REPS
//! (default 3).
//!
//! cargo run --release --example refine_throughput -- WEIGHTS BATCH SIZE [REPS] [DEVICE]
//!
//! WEIGHTS is a classifier weights file (`xtask/reference/bench_refine.py` writes the ones the
//! reference runs), or `random:cifar50` / `random:imagenet50` for a ResNet-50 with freshly
//! initialized weights (when the reference, and so its weights files, are not available).

#[path = "../benches/support/timing.rs"]
mod timing;

use anyhow::{bail, Context, Result};
use bigroc::classifier::{Classifier, ClassifierInfo};
use bigroc::refine::{refine, EpsScale, Norm, RefineSettings};
use bigroc::train::classifier::TrainableResNet;
use bigroc_models::resnet::{ResNet, ResNetConfig};
use candle_core::{DType, Device, Tensor};

/// The classifier `spec` names: a weights file, or `random:cifar50` / `random:imagenet50`.
fn classifier(spec: &str, device: &Device) -> Result<Classifier> {
    let Some(name) = spec.strip_prefix("random:") else {
        return Classifier::load(spec, device);
    };
    let config = match name {
        "cifar50" => ResNetConfig::cifar(50, 1.0, 10)?,
        "imagenet50" => ResNetConfig::imagenet(50, 1000)?,
        other => bail!("unknown random classifier `{other}` (cifar50, imagenet50)"),
    };
    // Plain tensors rather than the trainer's variables, so that gradients are taken with respect
    // to the input only, as with a loaded file.
    let weights = TrainableResNet::new(&config, 0, device)?.weights(false)?;
    let model = ResNet::new(&config, candle_nn::VarBuilder::from_tensors(weights, DType::F32, device))?;
    Ok(Classifier { model, config, info: ClassifierInfo::default(), source: spec.to_string() })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: refine_throughput WEIGHTS BATCH SIZE [REPS] [DEVICE]";
    let weights = args.get(1).context(usage)?;
    let batch: usize = args.get(2).context(usage)?.parse()?;
    let size: usize = args.get(3).context(usage)?.parse()?;
    let reps: usize = args.get(4).map(|r| r.parse()).transpose()?.unwrap_or(3).max(1);
    let device = bigroc::device::parse_device(args.get(5).map(String::as_str).unwrap_or("cpu"))?;
    let classifier = classifier(weights, &device)?;
    let x = Tensor::rand(0f32, 1f32, (batch, 3, size, size), &device)?;
    let labels = Tensor::zeros(batch, candle_core::DType::U32, &device)?; // toward class 0
    let settings = RefineSettings::paper(Norm::L2, 0.5, EpsScale::Unit);
    let run = || -> Result<()> {
        let out = refine(&classifier, &x, &labels, &settings)?;
        out.images.sum_all()?.to_scalar::<f32>()?; // wait for the device
        Ok(())
    };
    let median = timing::median_seconds(reps, run)?;
    println!(
        "{}",
        serde_json::json!({"seconds": median, "img_per_s": batch as f64 / median, "batch": batch, "size": size,
            "threads": candle_core::utils::get_num_threads(), "device": format!("{device:?}")})
    );
    Ok(())
}
