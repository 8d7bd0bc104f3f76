//! Times BIGRoC's refine workload (7 targeted L2 steps, use_best) on one weights file: the bigroc
//! side of `cargo xtask bench`. Prints one JSON line.
//!
//! cargo run --release --example refine_throughput -- WEIGHTS BATCH SIZE [REPS] [DEVICE]

use std::time::Instant;

use anyhow::{Context, Result};
use bigroc::classifier::Classifier;
use bigroc::refine::{refine, EpsScale, Norm, RefineSettings};
use candle_core::Tensor;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: refine_throughput WEIGHTS BATCH SIZE [REPS] [DEVICE]";
    let weights = args.get(1).context(usage)?;
    let batch: usize = args.get(2).context(usage)?.parse()?;
    let size: usize = args.get(3).context(usage)?.parse()?;
    let reps: usize = args.get(4).map(|r| r.parse()).transpose()?.unwrap_or(3);
    let device = bigroc::device::parse_device(args.get(5).map(String::as_str).unwrap_or("cpu"))?;
    let classifier = Classifier::load(weights, &device)?;
    let x = Tensor::rand(0f32, 1f32, (batch, 3, size, size), &device)?;
    let labels = Tensor::zeros(batch, candle_core::DType::U32, &device)?; // toward class 0
    let settings = RefineSettings::paper(Norm::L2, 0.5, EpsScale::Unit);
    let run = || -> Result<()> {
        let out = refine(&classifier, &x, &labels, &settings)?;
        out.images.sum_all()?.to_scalar::<f32>()?; // wait for the device
        Ok(())
    };
    run()?; // warm-up
    let mut times = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        run()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({"seconds": median, "img_per_s": batch as f64 / median, "batch": batch, "size": size, "device": format!("{device:?}")})
    );
    Ok(())
}
