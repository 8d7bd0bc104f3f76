//! Times one classifier-guided sampling step of the CIFAR-10 ADM configuration (the workload of
//! `benches/guided_step.rs`): the bigroc side of `cargo xtask bench`. Prints one JSON line.
//!
//! cargo run --release --example guided_step_throughput -- BATCH [REPS] [DEVICE] [UNET CLASSIFIER]
//!     [--dtype f32|f16|bf16]
//!
//! UNET and CLASSIFIER are the random weights `xtask/reference/bench_guided_step.py --out DIR`
//! writes (DIR/guided_unet.safetensors, DIR/guided_classifier.safetensors), so that both sides run
//! the same networks; without them the weights are drawn here. One warm-up step, then the median
//! of REPS (default 3). `--dtype` is the networks' compute dtype (f16 is guided-diffusion's
//! `use_fp16`; norms and softmax stay f32).

#[path = "../benches/support/guided_step.rs"]
mod guided_step;

#[path = "../benches/support/timing.rs"]
mod timing;

use std::path::Path;

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().collect();
    let dtype = guided_step::take_dtype_flag(&mut args)?;
    let usage = "usage: guided_step_throughput BATCH [REPS] [DEVICE] [UNET CLASSIFIER] [--dtype f32|f16|bf16]";
    let batch: usize = args.get(1).context(usage)?.parse()?;
    let reps: usize = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(3).max(1);
    let device = bigroc::device::parse_device(args.get(3).map(String::as_str).unwrap_or("cpu"))?;
    let weights = match (args.get(4), args.get(5)) {
        (Some(u), Some(c)) => Some((Path::new(u), Path::new(c))),
        (None, None) => None,
        _ => anyhow::bail!("{usage}: give both weights files or neither"),
    };
    let s = guided_step::setup(batch, weights, dtype, &device)?;
    let run = || -> Result<()> {
        guided_step::step(&s)?.sum_all()?.to_scalar::<f32>()?; // wait for the device
        Ok(())
    };
    let median = timing::median_seconds(reps, run)?;
    println!(
        "{}",
        serde_json::json!({"seconds": median, "batch": batch, "threads": candle_core::utils::get_num_threads(),
            "weights": if weights.is_some() { "shared" } else { "random" }, "device": format!("{device:?}"),
            "dtype": format!("{dtype:?}")})
    );
    Ok(())
}
