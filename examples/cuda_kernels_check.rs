//! Checks the crate's CUDA kernels against the same arithmetic from candle ops in f64 on the CPU:
//! the fused group norm (forward and the gradients of x, scale and shift) and the channel affine
//! epilogue (forward and the gradients of x, shift and the residual; and the training-mode batch
//! norm built on it, against the crate's CPU batch norm), and the convolutions built on
//! the im2col/col2im kernels (forward and the gradients of the input and the kernel, against the
//! crate's CPU convolution), and the attention's softmax (candle-nn's forward kernel, the crate's
//! backward), and the fused AdamW and EMA updates (against the same updates from candle ops on the
//! GPU, which they should equal exactly). Needs a GPU and `--features
//! cuda`: `cargo run --release --features cuda --example cuda_kernels_check`. Exits non-zero when a
//! relative error reaches 1e-4, after a last line `BIGROC_CUDA_KERNELS=no-KIND,...` naming the kinds
//! that failed (what `xtask/device/lease.sh` runs with then).

use anyhow::{bail, Result};
use bigroc_models::channel_affine::channel_affine;
use bigroc_models::conv::conv2d_trainable;
use bigroc_models::group_norm::{group_norm_affine, group_norm_affine_composed};
use bigroc_models::ops::batch_norm_train;
use bigroc_models::optimizer_step::{ema_composed, ema_update, AdamW};
use bigroc_models::softmax::softmax_last_dim;
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

/// The largest relative error seen per kernel kind (`bigroc_models::own_cuda_kernel`'s names).
#[derive(Default)]
struct Worst(Vec<(&'static str, f64)>);

impl Worst {
    fn of(&mut self, kind: &'static str) -> &mut f64 {
        if let Some(i) = self.0.iter().position(|(k, _)| *k == kind) {
            return &mut self.0[i].1;
        }
        self.0.push((kind, 0.0));
        &mut self.0.last_mut().expect("just pushed").1
    }
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
    let mut worst = Worst::default();
    for (shape, groups) in [(vec![4, 64, 32, 32], 32), (vec![3, 128, 8, 8], 32), (vec![5, 96, 7, 5], 8), (vec![2, 2048], 32)] {
        for silu in [false, true] {
            let (n, c) = (shape[0], shape[1]);
            let x = Tensor::randn(0.5f64, 3.0, shape.as_slice(), &cpu)?;
            let scale = Tensor::randn(1f64, 0.5, (n, c), &cpu)?;
            let shift = Tensor::randn(0f64, 0.5, (n, c), &cpu)?;
            let weight = Tensor::randn(0f64, 1.0, shape.as_slice(), &cpu)?;
            let want = with_grads(&[&x, &scale, &shift], &weight, &cpu, DType::F64, |t| Ok(group_norm_affine_composed(t[0], groups, 1e-5, t[1], t[2], silu)?))?;
            let got = with_grads(&[&x, &scale, &shift], &weight, &gpu, DType::F32, |t| Ok(group_norm_affine(t[0], groups, 1e-5, t[1], t[2], silu)?))?;
            report(&format!("group norm {shape:?} groups {groups} silu {silu}"), &["y", "dx", "dscale", "dshift"], &want, &got, worst.of("group-norm"))?;
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
                report(&what, &["y", "dx", "dshift", "dresidual"], &want, &got, worst.of("channel-affine"))?;
            }
        }
    }
    // Training-mode batch norm: on the GPU tensor ops and the channel affine, on the CPU in f64 the
    // crate's fused CPU batch norm.
    for shape in [[128usize, 32, 32, 32], [6, 64, 7, 5], [128, 256, 4, 4]] {
        let c = shape[1];
        let x = Tensor::randn(0.3f64, 2.0, shape.as_slice(), &cpu)?;
        let w = Tensor::randn(1f64, 0.3, c, &cpu)?;
        let b = Tensor::randn(0f64, 0.3, c, &cpu)?;
        let weight = Tensor::randn(0f64, 1.0, shape.as_slice(), &cpu)?;
        let run = |dev: &Device, dtype: DType| with_grads(&[&x, &w, &b], &weight, dev, dtype, |t| Ok(batch_norm_train(t[0], t[1], t[2], 1e-5)?.0));
        let (want, got) = (run(&cpu, DType::F64)?, run(&gpu, DType::F32)?);
        report(&format!("batch norm (training) {shape:?}"), &["y", "dx", "dweight", "dbias"], &want, &got, worst.of("channel-affine"))?;
    }
    // The convolutions: on the GPU the im2col/col2im kernels around cuBLAS, on the CPU in f64 the
    // crate's own im2col path. The networks' kernel sizes, strides and paddings, maps down to 4x4.
    for (b, c_in, c_out, hw, k, stride, padding) in [
        (4, 64, 64, (32, 32), 3, 1, 1),
        (3, 128, 256, (16, 16), 3, 2, 1),
        (2, 3, 64, (37, 35), 7, 2, 3),
        (5, 96, 48, (8, 8), 1, 1, 0),
        (2, 64, 128, (15, 15), 1, 2, 0),
        (3, 32, 32, (4, 4), 3, 1, 1),
        (2, 16, 8, (9, 9), 3, 1, 0),
    ] {
        let (h, w) = hw;
        let (oh, ow) = ((h + 2 * padding - k) / stride + 1, (w + 2 * padding - k) / stride + 1);
        let x = Tensor::randn(0f64, 1.0, (b, c_in, h, w), &cpu)?;
        let kernel = Tensor::randn(0f64, 1.0 / ((c_in * k * k) as f64).sqrt(), (c_out, c_in, k, k), &cpu)?;
        let weight = Tensor::randn(0f64, 1.0, (b, c_out, oh, ow), &cpu)?;
        let run = |dev: &Device, dtype: DType| with_grads(&[&x, &kernel], &weight, dev, dtype, |t| Ok(conv2d_trainable(t[0], t[1], stride, padding)?));
        let (want, got) = (run(&cpu, DType::F64)?, run(&gpu, DType::F32)?);
        let what = format!("conv {b}x{c_in}x{h}x{w} -> {c_out} kernel {k} stride {stride} padding {padding}");
        report(&what, &["y", "dx", "dkernel"], &want, &got, worst.of("conv"))?;
    }
    // The softmax: on the CPU in f64 composed candle ops, on the GPU candle-nn's kernel forward.
    for shape in [[8usize, 256, 256], [6, 64, 37], [3, 5, 1000]] {
        let x = (Tensor::randn(0f64, 1.0, shape.as_slice(), &cpu)? * 8.0)?;
        let weight = Tensor::randn(0f64, 1.0, shape.as_slice(), &cpu)?;
        let run = |dev: &Device, dtype: DType| with_grads(&[&x], &weight, dev, dtype, |t| Ok(softmax_last_dim(t[0])?));
        let (want, got) = (run(&cpu, DType::F64)?, run(&gpu, DType::F32)?);
        report(&format!("softmax {shape:?}"), &["y", "dx"], &want, &got, worst.of("softmax"))?;
    }
    // The optimizer updates: one kernel each against candle ops on the same GPU, three AdamW steps.
    let shape = (129, 65);
    let on_gpu = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&gpu)?) };
    let (mut p, mut m, mut v) = (on_gpu(Tensor::randn(0f64, 1.0, shape, &cpu)?)?, Tensor::zeros(shape, DType::F32, &gpu)?, Tensor::zeros(shape, DType::F32, &gpu)?);
    let (mut p_ref, mut m_ref, mut v_ref) = (p.clone(), m.clone(), v.clone());
    for step in 1..=3 {
        let g = on_gpu((Tensor::randn(0f64, 1.0, shape, &cpu)? * 10f64.powi(step as i32 - 3))?)?;
        let settings = AdamW { lr: 2e-4, weight_decay: 0.05, beta1: 0.9, beta2: 0.999, eps: 1e-8, step };
        (p, m, v) = settings.update(&p, &g, &m, &v)?;
        (p_ref, m_ref, v_ref) = settings.composed(&p_ref, &g, &m_ref, &v_ref)?;
        let want = [p_ref.clone(), m_ref.clone(), v_ref.clone()];
        report(&format!("adamw step {step}"), &["p", "exp_avg", "exp_avg_sq"], &want, &[p.clone(), m.clone(), v.clone()], worst.of("optimizer"))?;
    }
    let ema = on_gpu(Tensor::randn(0f64, 1.0, shape, &cpu)?)?;
    report("ema", &["ema"], &[ema_composed(&ema, &p, 0.9995)?], &[ema_update(&ema, &p, 0.9995)?], worst.of("optimizer"))?;
    let mut failed = Vec::new();
    for (kind, err) in &worst.0 {
        let pass = *err < 1e-4;
        println!("{kind}: worst {err:.2e} {}", if pass { "PASS" } else { "FAIL" });
        if !pass {
            failed.push(format!("no-{kind}"));
        }
    }
    if !failed.is_empty() {
        println!("BIGROC_CUDA_KERNELS={}", failed.join(","));
        bail!("FAIL: a CUDA kernel differs from candle ops by more than 1e-4 (relative)")
    }
    println!("PASS");
    Ok(())
}
