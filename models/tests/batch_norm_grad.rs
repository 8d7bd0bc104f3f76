//! `ops::batch_norm_train` (training-mode batch norm with a closed-form backward) against the same
//! formula built from candle ops (whose autograd is independent of the closed form) and against
//! central finite differences. The match with PyTorch itself is in `resnet_train_parity`.
//!
//! Errors are max-abs relative: max|ours - reference| / max|reference|.

use bigroc_models::ops::batch_norm_train;
use candle_core::{DType, Device, Result, Tensor, Var};

fn rel_err(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    assert_eq!(ours.dims(), reference.dims(), "shape mismatch");
    let (ours, reference) = (ours.to_dtype(DType::F64)?, reference.to_dtype(DType::F64)?);
    let diff = (ours - &reference)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = reference.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(diff / scale.max(1e-30))
}

/// Deterministic pseudo-random values in about [-1, 1] (candle cannot seed its CPU generator).
fn values(seed: f64, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| ((i as f64 + seed) * 12.9898).sin() * 43758.5453 % 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over (N, H, W) from plain candle ops.
fn reference_bn(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(1)?;
    let mean = x.mean_keepdim((0, 2, 3))?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
    centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)
}

/// Gradients of `sum(f(x, w, b) * g)` with respect to x, w, b.
fn grads(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    g: &Tensor,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<(Tensor, [Tensor; 3])> {
    let vars = [x, w, b].map(|t| Var::from_tensor(t).unwrap());
    let y = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )?;
    let all = (&y * g)?.sum_all()?.backward()?;
    let get = |v: &Var| {
        all.get(v.as_tensor())
            .expect("gradient reaches every operand")
            .clone()
    };
    Ok((y, [get(&vars[0]), get(&vars[1]), get(&vars[2])]))
}

#[test]
fn matches_candle_ops_and_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        for &(n, c, h, w) in &[(3, 4, 5, 7), (2, 3, 2, 1), (1, 2, 4, 4)] {
            // An offset and per-channel scales, so mean and variance matter.
            let x = ((values(1.0, &[n, c, h, w], dtype)? * 2.0)? + 0.5)?;
            let wt = (values(2.0, &[c], dtype)?.abs()? + 0.5)?;
            let b = (values(3.0, &[c], dtype)? * 0.3)?;
            let g = values(4.0, &[n, c, h, w], dtype)?;
            let (y, ours) = grads(&x, &wt, &b, &g, |x, w, b| {
                Ok(batch_norm_train(x, w, b, 1e-5)?.0)
            })?;
            let (y_ref, theirs) = grads(&x, &wt, &b, &g, |x, w, b| reference_bn(x, w, b, 1e-5))?;
            let mut worst = rel_err(&y, &y_ref)?;
            for (o, t) in ours.iter().zip(&theirs) {
                worst = worst.max(rel_err(o, t)?);
            }
            println!("{dtype:?} {n}x{c}x{h}x{w}: output and gradients vs candle ops {worst:.2e}");
            assert!(worst <= tol, "{dtype:?} {n}x{c}x{h}x{w}: {worst:.3e}");

            let (_, mean, var) = batch_norm_train(&x, &wt, &b, 1e-5)?;
            let mean_ref = x.mean_keepdim((0, 2, 3))?.flatten_all()?;
            let var_ref = x
                .broadcast_sub(&x.mean_keepdim((0, 2, 3))?)?
                .sqr()?
                .mean_keepdim((0, 2, 3))?
                .flatten_all()?;
            assert!(rel_err(&mean, &mean_ref)? <= tol && rel_err(&var, &var_ref)? <= tol);
            assert!(
                !mean.track_op() && !var.track_op(),
                "batch statistics must be detached"
            );

            // Central differences of sum(y * g) for a few entries of each operand.
            if dtype == DType::F64 {
                let loss = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<f64> {
                    (batch_norm_train(x, w, b, 1e-5)?.0 * &g)?
                        .sum_all()?
                        .to_scalar::<f64>()
                };
                let operands = [&x, &wt, &b];
                for (which, grad) in ours.iter().enumerate() {
                    let flat = operands[which].flatten_all()?.to_vec1::<f64>()?;
                    let grad_flat = grad.flatten_all()?.to_vec1::<f64>()?;
                    let scale = grad.abs()?.max_all()?.to_scalar::<f64>()?;
                    let mut err = 0f64;
                    for idx in (0..flat.len()).step_by((flat.len() / 7).max(1)) {
                        let at = |delta: f64| -> Result<f64> {
                            let mut v = flat.clone();
                            v[idx] += delta;
                            let t = Tensor::from_vec(v, operands[which].dims(), &dev)?;
                            let mut args = operands.map(|t| t.clone());
                            args[which] = t;
                            loss(&args[0], &args[1], &args[2])
                        };
                        let fd = (at(1e-6)? - at(-1e-6)?) / 2e-6;
                        err = err.max((fd - grad_flat[idx]).abs() / scale);
                    }
                    assert!(
                        err <= 1e-6,
                        "operand {which}: error vs finite differences {err:.3e}"
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn gradients_only_for_tracked_operands() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 3, 4, 4), &dev)?;
    let w = Tensor::ones(3, DType::F32, &dev)?;
    let b = Tensor::zeros(3, DType::F32, &dev)?;
    let (y, _, _) = batch_norm_train(&x, &w, &b, 1e-5)?;
    assert!(!y.track_op(), "untracked operands gave a tracked output");
    let wv = Var::from_tensor(&w)?;
    let (y2, _, _) = batch_norm_train(&x, wv.as_tensor(), &b, 1e-5)?;
    assert_eq!(rel_err(&y2, &y)?, 0.0);
    let all = y2.sqr()?.sum_all()?.backward()?;
    assert!(all.get(wv.as_tensor()).is_some() && all.get(&x).is_none() && all.get(&b).is_none());
    Ok(())
}

#[test]
fn bad_inputs_give_clear_errors() -> Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::ones(3, DType::F32, &dev)?;
    let one_value = Tensor::zeros((1, 3, 1, 1), DType::F32, &dev)?;
    let err = batch_norm_train(&one_value, &w, &w, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than one value per channel"), "{err}");
    let x = Tensor::zeros((2, 4, 3, 3), DType::F32, &dev)?;
    let err = batch_norm_train(&x, &w, &w, 1e-5).unwrap_err().to_string();
    assert!(err.contains("must have shape [4]"), "{err}");
    Ok(())
}
