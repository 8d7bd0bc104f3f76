//! The guided-step workload, shared by `benches/guided_step.rs` (criterion) and
//! `examples/guided_step_throughput.rs` (the bigroc side of `cargo xtask bench`): one
//! classifier-guided ancestral sampling step of the robust-guidance paper's CIFAR-10 configuration
//! (improved-diffusion UNet, 128 channels, 3 res blocks; time-dependent classifier of width 32;
//! 250 respaced steps, at respaced step 125, guidance scale 1). The networks' torsos compute in
//! the dtype asked for (f32, or f16/bf16 as `sample --dtype`; norms and softmax stay f32).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use bigroc::adm::preset;
use bigroc::diffusion::{ClassifierGuidance, DiffusionConfig, GaussianDiffusion, Guided};
use bigroc_models::adm::{EncoderUNetModel, UNetModel};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

/// Random weights for every parameter `build` asks for (names and shapes discovered through a
/// VarMap, then replaced by plain tensors so that inference builds no autograd graph).
fn random_weights<T>(build: impl Fn(VarBuilder) -> candle_core::Result<T>, dtype: DType, dev: &Device) -> Result<T> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
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
    Ok(build(VarBuilder::from_tensors(tensors, dtype, dev))?)
}

/// Weights from a plain safetensors state dict (guided-diffusion's names), every key used.
fn file_weights<T>(path: &Path, build: impl Fn(VarBuilder) -> candle_core::Result<T>, dtype: DType, dev: &Device) -> Result<T> {
    let tensors = candle_core::safetensors::load(path, dev).with_context(|| format!("reading {}", path.display()))?;
    let (vb, usage) = bigroc::weights::strict_var_builder(tensors, dtype, dev, &path.display().to_string());
    let model = build(vb)?;
    usage.finish(|_| false)?;
    Ok(model)
}

pub struct Setup {
    pub unet: UNetModel,
    pub classifier: EncoderUNetModel,
    pub diffusion: GaussianDiffusion,
    pub x: Tensor,
    pub y: Tensor,
    pub noise: Tensor,
}

/// The models (from `weights` = (UNet file, classifier file) when given, else random), a random
/// batch `x` of `batch` 32x32 images, labels 0..9 repeated, and the step's noise; `dtype` is the
/// torsos' compute dtype.
pub fn setup(batch: usize, weights: Option<(&Path, &Path)>, dtype: DType, dev: &Device) -> Result<Setup> {
    let p = preset("cifar10")?;
    let unet_cfg = p.unet()?;
    let clf_cfg = p.classifier()?;
    let (unet, classifier) = match weights {
        Some((u, c)) => (
            file_weights(u, |vb| UNetModel::new(&unet_cfg, vb), dtype, dev)?,
            file_weights(c, |vb| EncoderUNetModel::new(&clf_cfg, vb), dtype, dev)?,
        ),
        None => (
            random_weights(|vb| UNetModel::new(&unet_cfg, vb), dtype, dev)?,
            random_weights(|vb| EncoderUNetModel::new(&clf_cfg, vb), dtype, dev)?,
        ),
    };
    let diffusion = GaussianDiffusion::new(&DiffusionConfig {
        timestep_respacing: p.timestep_respacing.into(),
        ..p.diffusion.clone()
    })?;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), dev)?;
    let y = Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect(), batch, dev)?;
    let noise = x.randn_like(0.0, 1.0)?;
    Ok(Setup { unet, classifier, diffusion, x, y, noise })
}

/// The dtype of a `--dtype NAME` flag anywhere in `args` (removed from them); f32 without one.
pub fn take_dtype_flag(args: &mut Vec<String>) -> Result<DType> {
    let Some(at) = args.iter().position(|a| a == "--dtype") else { return Ok(DType::F32) };
    let name = args.get(at + 1).context("--dtype needs a value: f32, f16 or bf16")?.clone();
    args.drain(at..at + 2);
    Ok(match name.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => anyhow::bail!("--dtype {other}: expected f32, f16 or bf16"),
    })
}

/// One guided step; the sample it returns.
pub fn step(s: &Setup) -> Result<Tensor> {
    let guidance = ClassifierGuidance { classifier: &s.classifier, scale: 1.0 };
    let g = Guided { model: &s.unet, cond: Some(&guidance), labels: Some(&s.y), clip_denoised: true };
    Ok(s.diffusion.p_sample(&g, &s.x, 125, &s.noise)?.sample)
}
