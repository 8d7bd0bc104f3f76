//! Times the phases of one training step of `bigroc train diffusion` (the default small CIFAR-10
//! UNet: 64 channels, learned sigma, the hybrid loss; AdamW; EMA), each phase ended by a device
//! synchronization, to show where a GPU lease's training time goes. Prints one JSON line.
//!
//! cargo run --release --example diffusion_train_step -- [BATCH] [REPS] [DEVICE]
//!
//! Phases: `forward` (q_sample, UNet, loss terms), `backward`, `optimizer` (AdamW over every
//! parameter), `ema`, and `readback` (the three scalars the trainer reads back every iteration for
//! its log, each a wait for the device). A random batch (default 128) of 32x32 images in [-1, 1]
//! with random labels and timesteps. One warm-up step, then the median of REPS (default 5) for
//! each phase; `step` is the median of the whole steps.

use std::time::Instant;

use anyhow::Result;
use bigroc::diffusion::{DiffusionConfig, GaussianDiffusion, NoiseSchedule};
use bigroc::train::diffusion::{batch_losses, cifar10_unet, Ema, TrainableUNet};
use bigroc::train::optim::{Optimizer, OptimizerConfig};
use candle_core::{DType, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let batch: usize = args.get(1).map(|b| b.parse()).transpose()?.unwrap_or(128);
    let reps: usize = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(5).max(1);
    let device = bigroc::device::parse_device(args.get(3).map(String::as_str).unwrap_or("cpu"))?;

    let config = cifar10_unet(Some(10));
    let net = TrainableUNet::new(&config, 0, &device)?;
    let params = net.parameters();
    let mut opt = Optimizer::new(OptimizerConfig::adamw(0.0), params.clone());
    let mut ema = Ema::new(0.9999, &params)?;
    let diffusion = GaussianDiffusion::new(&DiffusionConfig {
        steps: 1000,
        noise_schedule: NoiseSchedule::Linear,
        learn_sigma: true,
        sigma_small: false,
        timestep_respacing: String::new(),
        rescale_timesteps: false,
    })?;
    let x0 = Tensor::rand(-1f32, 1f32, (batch, 3, 32, 32), &device)?;
    let y = Tensor::rand(0f32, 10f32, batch, &device)?.floor()?.to_dtype(DType::U32)?;
    let noise = x0.randn_like(0.0, 1.0)?;
    let t: Vec<usize> = (0..batch).map(|i| (i * 997) % 1000).collect();

    let phases = ["forward", "backward", "optimizer", "ema", "readback"];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); phases.len() + 1];
    for rep in 0..=reps {
        let mut marks = vec![Instant::now()];
        let terms = batch_losses(&net, &diffusion, true, &x0, &t, &noise, Some(&y))?;
        let loss = terms.loss.mean_all()?;
        device.synchronize()?;
        marks.push(Instant::now());
        let grads = loss.backward()?;
        device.synchronize()?;
        marks.push(Instant::now());
        opt.step(&grads, 1e-4)?;
        device.synchronize()?;
        marks.push(Instant::now());
        ema.update(&params)?;
        device.synchronize()?;
        marks.push(Instant::now());
        loss.to_scalar::<f32>()?;
        terms.mse.detach().mean_all()?.to_scalar::<f32>()?;
        if let Some(vb) = &terms.vb {
            vb.detach().mean_all()?.to_scalar::<f32>()?;
        }
        marks.push(Instant::now());
        if rep == 0 {
            continue; // warm-up
        }
        for (i, pair) in marks.windows(2).enumerate() {
            times[i].push((pair[1] - pair[0]).as_secs_f64());
        }
        times[phases.len()].push((marks[marks.len() - 1] - marks[0]).as_secs_f64());
    }
    let step = median(times[phases.len()].clone());
    let mut report = serde_json::json!({
        "batch": batch, "parameters": net.parameter_count(), "device": format!("{device:?}"),
        "threads": candle_core::utils::get_num_threads(), "step_s": step, "img_per_s": batch as f64 / step,
    });
    for (name, t) in phases.iter().zip(&times) {
        report[format!("{name}_s")] = serde_json::json!(median(t.clone()));
    }
    println!("{report}");
    Ok(())
}
