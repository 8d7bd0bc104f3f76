//! Time of one training step (train-mode forward, mean cross-entropy, backward) of a CIFAR ResNet on
//! the CPU, the model's weights in a VarMap as a trainer holds them.
//!
//!     cargo run --release -p bigroc-models --example resnet_train_timing -- [depth] [wm] [batch] [steps]
//!
//! Defaults: ResNet-18, width multiplier 0.5, batch 128, 3 timed steps after one warm-up step.

use std::time::Instant;

use bigroc_models::resnet::{ResNet, ResNetConfig};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let depth: usize = arg(0, "18").parse().expect("depth");
    let wm: f64 = arg(1, "0.5").parse().expect("width multiplier");
    let batch: usize = arg(2, "128").parse().expect("batch");
    let steps: usize = arg(3, "3").parse().expect("steps");

    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = ResNet::new(
        &ResNetConfig::cifar(depth, wm, 10)?,
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )?;
    let x = Tensor::rand(0f32, 1., (batch, 3, 32, 32), &dev)?;
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
    let target = Tensor::new(labels, &dev)?;
    // (forward, backward) seconds of one step.
    let step = || -> Result<(f64, f64)> {
        let start = Instant::now();
        let logits = model.forward_t(&x, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &target)?;
        let forward = start.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        assert!(varmap
            .all_vars()
            .iter()
            .any(|v| grads.get(v.as_tensor()).is_some()));
        Ok((forward, start.elapsed().as_secs_f64() - forward))
    };
    let warm = step()?;
    let times: Vec<(f64, f64)> = (0..steps).map(|_| step()).collect::<Result<_>>()?;
    let n = times.len().max(1) as f64;
    let (fwd, bwd) = (
        times.iter().map(|t| t.0).sum::<f64>() / n,
        times.iter().map(|t| t.1).sum::<f64>() / n,
    );
    println!(
        "cifar ResNet-{depth} wm {wm}, batch {batch}, {} threads: fwd+bwd {:.2} s/step (forward {fwd:.2} s, backward {bwd:.2} s; warm-up step {:.2} s)",
        candle_core::utils::get_num_threads(),
        fwd + bwd,
        warm.0 + warm.1
    );
    Ok(())
}
