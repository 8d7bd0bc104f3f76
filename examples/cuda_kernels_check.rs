//! Checks the crate's CUDA kernels against the same arithmetic from candle ops in f64 on the CPU:
//! the fused group norm (forward and the gradients of x, scale and shift) and the channel affine
//! epilogue (forward and the gradients of x, shift and the residual). Needs a GPU and `--features
//! cuda`: `cargo run --release --features cuda --example cuda_kernels_check`. Exits non-zero when a
//! relative error reaches 1e-4.

use anyhow::{bail, Result};
use bigroc_models::channel_affine::channel_affine;
use bigroc_models::group_norm::{group_norm_affine, group_norm_affine_composed};
use candle_core::{DType, Device, Tensor, Var};

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(diff / b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30))
}

/// `f(inputs)`, then the gradients of `sum(f * weight)` with respect to every input, on `dev` in
/// `dtype`.
fn with_grads(inputs: &[&Tensor], weight: &Tensor, dev: &Device, dtype: DType, f: impl Fn(&[&Tensor]) -> Result<Tensor>) -> Result<Vec<Tensor>> {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_device(dev)?.to_dtype(dtype)?)).collect::<candle_core::Result<_>>()?;
    let tensors: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let y = f(&tensors)?;
    let grads = (&y * weight.to_device(dev)?.to_dtype(dtype)?)?.sum_all()?.backward()?;
    let mut out = vec![y];
    for t in &tensors {
        out.push(grads.get(t).expect("every input has a gradient").clone());
    }
    Ok(out)
}

fn report(what: &str, names: &[&str], want: &[Tensor], got: &[Tensor], worst: &mut f64) -> Result<()> {
    let errs: Vec<f64> = want.iter().zip(got).map(|(w, g)| rel_err(g, w)).collect::<Result<_>>()?;
    let line: Vec<String> = names.iter().zip(&errs).map(|(n, e)| format!("{n} {e:.2e}")).collect();
    println!("{what}: rel err {}", line.join(" "));
    *worst = errs.iter().fold(*worst, |m, &e| m.max(e));
    Ok(())
}

fn main() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let cpu = Device::Cpu;
    let mut worst: f64 = 0.0;
    for (shape, groups) in [(vec![4, 64, 32, 32], 32), (vec![3, 128, 8, 8], 32), (vec![5, 96, 7, 5], 8), (vec![2, 2048], 32)] {
        for silu in [false, true] {
            let (n, c) = (shape[0], shape[1]);
            let x = Tensor::randn(0.5f64, 3.0, shape.as_slice(), &cpu)?;
            let scale = Tensor::randn(1f64, 0.5, (n, c), &cpu)?;
            let shift = Tensor::randn(0f64, 0.5, (n, c), &cpu)?;
            let weight = Tensor::randn(0f64, 1.0, shape.as_slice(), &cpu)?;
            let want = with_grads(&[&x, &scale, &shift], &weight, &cpu, DType::F64, |t| Ok(group_norm_affine_composed(t[0], groups, 1e-5, t[1], t[2], silu)?))?;
            let got = with_grads(&[&x, &scale, &shift], &weight, &gpu, DType::F32, |t| Ok(group_norm_affine(t[0], groups, 1e-5, t[1], t[2], silu)?))?;
            report(&format!("group norm {shape:?} groups {groups} silu {silu}"), &["y", "dx", "dscale", "dshift"], &want, &got, &mut worst)?;
        }
    }
    // The channel affine: on the CPU `channel_affine` composes candle ops, on the GPU it is the kernels.
    for shape in [vec![4usize, 64, 32, 32], vec![3, 96, 7, 5], vec![2, 128, 16], vec![8, 10]] {
        let (n, c) = (shape[0], shape[1]);
        for (scaled, per_sample, relu) in (0..8).map(|k| (k & 1 != 0, k & 2 != 0, k & 4 != 0)) {
            let len = if per_sample { n * c } else { c };
            let x = Tensor::randn(0f64, 1.0, shape.as_slice(), &cpu)?;
            let scale = Tensor::randn(1f64, 0.5, len, &cpu)?;
            let shift = Tensor::randn(0f64, 0.5, len, &cpu)?;
            let residual = Tensor::randn(0f64, 1.0, shape.as_slice(), &cpu)?;
            let weight = Tensor::randn(0f64, 1.0, shape.as_slice(), &cpu)?;
            for with_residual in [false, true] {
                let run = |dev: &Device, dtype: DType| {
                    let scale = scale.to_device(dev)?.to_dtype(dtype)?;
                    let inputs: Vec<&Tensor> = if with_residual { vec![&x, &shift, &residual] } else { vec![&x, &shift] };
                    with_grads(&inputs, &weight, dev, dtype, |t| Ok(channel_affine(t[0], scaled.then_some(&scale), t[1], t.get(2).copied(), relu)?))
                };
                let (want, got) = (run(&cpu, DType::F64)?, run(&gpu, DType::F32)?);
                let what = format!("channel affine {shape:?} scale {scaled} per-sample {per_sample} residual {with_residual} relu {relu}");
                report(&what, &["y", "dx", "dshift", "dresidual"], &want, &got, &mut worst)?;
            }
        }
    }
    println!("worst {worst:.2e}");
    if !(worst < 1e-4) {
        bail!("FAIL: a CUDA kernel differs from candle ops by {worst:.2e} (relative), over 1e-4")
    }
    println!("PASS");
    Ok(())
}
