//! One classifier-guided ancestral sampling step of the robust-guidance paper's CIFAR-10
//! configuration (improved-diffusion UNet, 128 channels, 3 res blocks; time-dependent classifier
//! of width 32; 250 respaced steps) at batch 16, random weights, f32 on the CPU.
//!
//!     cargo bench --bench guided_step
//!
//! Next to its own measurement it runs the PyTorch reference for the same step
//! (`xtask/reference/bench_guided_step.py`, with as many threads as candle uses) and prints both
//! times and their ratio. Set `BIGROC_REF_PYTHON` to the reference interpreter (default
//! `/tmp/refvenv/bin/python`); without it only bigroc is timed.

use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

use anyhow::Result;
use bigroc::adm::preset;
use bigroc::diffusion::{ClassifierGuidance, DiffusionConfig, GaussianDiffusion, Guided};
use bigroc_models::adm::{EncoderUNetModel, UNetModel};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};

const BATCH: usize = 16;

/// Random weights for every parameter `build` asks for (names and shapes discovered through a
/// VarMap, then replaced by plain tensors so that inference builds no autograd graph).
fn random_weights<T>(build: impl Fn(VarBuilder) -> candle_core::Result<T>) -> Result<T> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let mut tensors = HashMap::new();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let t = var.as_tensor();
        let fan_in = if t.rank() > 1 { t.elem_count() / t.dim(0)? } else { 1 };
        let std = if name.ends_with("norm.weight") || name.ends_with(".0.weight") && t.rank() == 1 {
            0.1
        } else {
            1.0 / (fan_in as f64).sqrt()
        };
        tensors.insert(name.clone(), t.randn_like(0.0, std)?);
    }
    Ok(build(VarBuilder::from_tensors(tensors, DType::F32, &dev))?)
}

struct Setup {
    unet: UNetModel,
    classifier: EncoderUNetModel,
    diffusion: GaussianDiffusion,
    x: Tensor,
    y: Tensor,
    noise: Tensor,
}

fn setup() -> Result<Setup> {
    let p = preset("cifar10")?;
    let unet_cfg = p.unet()?;
    let clf_cfg = p.classifier()?;
    let unet = random_weights(|vb| UNetModel::new(&unet_cfg, vb))?;
    let classifier = random_weights(|vb| EncoderUNetModel::new(&clf_cfg, vb))?;
    let diffusion = GaussianDiffusion::new(&DiffusionConfig {
        timestep_respacing: p.timestep_respacing.into(),
        ..p.diffusion.clone()
    })?;
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (BATCH, 3, 32, 32), &dev)?;
    let y = Tensor::from_vec((0..BATCH as u32).map(|i| i % 10).collect(), BATCH, &dev)?;
    let noise = x.randn_like(0.0, 1.0)?;
    Ok(Setup {
        unet,
        classifier,
        diffusion,
        x,
        y,
        noise,
    })
}

fn step(s: &Setup) -> Result<Tensor> {
    let guidance = ClassifierGuidance {
        classifier: &s.classifier,
        scale: 1.0,
    };
    let g = Guided {
        model: &s.unet,
        cond: Some(&guidance),
        labels: Some(&s.y),
        clip_denoised: true,
    };
    Ok(s.diffusion.p_sample(&g, &s.x, 125, &s.noise)?.sample)
}

fn reference_seconds(threads: usize) -> Option<f64> {
    let python = std::env::var("BIGROC_REF_PYTHON").unwrap_or_else(|_| "/tmp/refvenv/bin/python".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/xtask/reference/bench_guided_step.py");
    let out = Command::new(&python)
        .args([script, "--batch", &BATCH.to_string(), "--threads", &threads.to_string()])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("guided_step_seconds ")?.trim().parse().ok()),
        Ok(o) => {
            eprintln!("reference benchmark failed: {}", String::from_utf8_lossy(&o.stderr));
            None
        }
        Err(e) => {
            eprintln!("reference benchmark skipped: cannot run {python}: {e}");
            None
        }
    }
}

fn bench(c: &mut Criterion) {
    let s = setup().expect("benchmark setup");
    step(&s).expect("warm-up step");
    let mut group = c.benchmark_group("guided_step");
    group.sample_size(10);
    group.bench_function("cifar10_batch16_f32", |b| b.iter(|| step(&s).unwrap()));
    group.finish();

    // side by side with the reference, same thread count, median of 5 each
    let threads = candle_core::utils::get_num_threads();
    let mut ours = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        step(&s).unwrap();
        ours.push(t0.elapsed().as_secs_f64());
    }
    ours.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let ours = ours[2];
    println!("guided step, CIFAR-10 config, batch {BATCH}, {threads} threads: bigroc {ours:.3} s");
    if let Some(theirs) = reference_seconds(threads) {
        println!(
            "guided step, CIFAR-10 config, batch {BATCH}, {threads} threads: PyTorch reference {theirs:.3} s; bigroc/reference = {:.2}",
            ours / theirs
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
