//! Times one adversarial training step of the embedded default classifier's recipe (`bigroc train
//! classifier --depth 18 --width 0.5 --adversarial --attack-norm l2 --eps 0.5 --attack-step 0.25
//! --attack-steps 3 --momentum 0.9 --weight-decay 5e-4`, see weights/manifest.json): the bigroc
//! side of `cargo xtask bench`. Prints one JSON line.
//!
//! cargo run --release --example train_step_throughput -- [BATCH] [REPS] [DEVICE] [WEIGHTS]
//!
//! One step is what `train_classifier` does per batch: untargeted L2 PGD (best iterate) with the
//! model in eval mode, the train-mode cross-entropy of the attacked batch, its backward and one SGD
//! step (lr 0.1). The network starts from WEIGHTS (default: the embedded classifier, which the
//! reference side, `xtask/reference/bench_train_step.py`, reads from weights/ too) and keeps
//! training across the runs; the batch (default 128) is random 32x32 images with random labels.
//! One warm-up step, then the median of REPS (default 3).


#[path = "../benches/support/timing.rs"]
mod timing;

use anyhow::Result;
use bigroc::classifier::Classifier;
use bigroc::refine::{Norm, PgdConfig};
use bigroc::train::classifier::TrainableResNet;
use bigroc::train::optim::{Optimizer, OptimizerConfig};
use bigroc::weights::Checkpoint;
use candle_core::{DType, Tensor};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let batch: usize = args.get(1).map(|b| b.parse()).transpose()?.unwrap_or(128);
    let reps: usize = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(3).max(1);
    let device = bigroc::device::parse_device(args.get(3).map(String::as_str).unwrap_or("cpu"))?;
    let weights = args.get(4).cloned().unwrap_or_else(|| bigroc::defaults::DEFAULT_CLASSIFIER.to_string());

    let ck = Checkpoint::load(&weights, &device)?;
    let config = Classifier::from_checkpoint(&ck)?.config; // validates the file
    let net = TrainableResNet::from_tensors(&config, &ck.tensors, &device)?;
    let mut opt = Optimizer::new(OptimizerConfig::sgd(0.9, 5e-4), net.parameters());
    let attack = PgdConfig { norm: Norm::L2, eps: 0.5, step_size: 0.25, steps: 3, use_best: true };
    let x = Tensor::rand(0f32, 1f32, (batch, 3, 32, 32), &device)?;
    let y = Tensor::rand(0f32, config.num_classes as f32, batch, &device)?.floor()?.to_dtype(DType::U32)?;

    let run = || -> Result<()> {
        let adv = net.attack(&x, &y, Some(&attack))?;
        let (_, loss) = net.loss(&adv, &y)?;
        opt.step(&loss.backward()?, 0.1)?;
        loss.to_scalar::<f32>()?; // wait for the device (as the trainer does, for its log)
        Ok(())
    };
    let median = timing::median_seconds(reps, run)?;
    println!(
        "{}",
        serde_json::json!({"seconds": median, "img_per_s": batch as f64 / median, "batch": batch,
            "threads": candle_core::utils::get_num_threads(), "weights": weights, "device": format!("{device:?}")})
    );
    Ok(())
}
