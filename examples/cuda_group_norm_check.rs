//! Checks the CUDA group norm kernels (forward and the three gradients) against the same arithmetic
//! from candle ops in f64 on the CPU. Needs a GPU and `--features cuda`:
//! `cargo run --release --features cuda --example cuda_group_norm_check`.

use anyhow::Result;
use bigroc_models::group_norm::{group_norm_affine, group_norm_affine_composed};
use candle_core::{DType, Device, Tensor, Var};

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(diff / b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30))
}

fn main() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let mut worst: f64 = 0.0;
    for (shape, groups) in [(vec![4, 64, 32, 32], 32), (vec![3, 128, 8, 8], 32), (vec![5, 96, 7, 5], 8), (vec![2, 2048], 32)] {
        for silu in [false, true] {
            let (n, c) = (shape[0], shape[1]);
            let x = Tensor::randn(0.5f64, 3.0, shape.as_slice(), &Device::Cpu)?;
            let scale = Tensor::randn(1f64, 0.5, (n, c), &Device::Cpu)?;
            let shift = Tensor::randn(0f64, 0.5, (n, c), &Device::Cpu)?;
            let weight = Tensor::randn(0f64, 1.0, shape.as_slice(), &Device::Cpu)?;
            let run = |dev: &Device, dtype: DType, fused: bool| -> Result<Vec<Tensor>> {
                let vars: Vec<Var> = [&x, &scale, &shift].iter().map(|t| Var::from_tensor(&t.to_device(dev)?.to_dtype(dtype)?)).collect::<candle_core::Result<_>>()?;
                let y = if fused {
                    group_norm_affine(vars[0].as_tensor(), groups, 1e-5, vars[1].as_tensor(), vars[2].as_tensor(), silu)?
                } else {
                    group_norm_affine_composed(vars[0].as_tensor(), groups, 1e-5, vars[1].as_tensor(), vars[2].as_tensor(), silu)?
                };
                let loss = (&y * weight.to_device(dev)?.to_dtype(dtype)?)?.sum_all()?;
                let grads = loss.backward()?;
                let mut out = vec![y];
                for v in &vars {
                    out.push(grads.get(v.as_tensor()).expect("every input has a gradient").clone());
                }
                Ok(out)
            };
            let want = run(&Device::Cpu, DType::F64, false)?;
            let got = run(&gpu, DType::F32, true)?;
            let errs: Vec<f64> = want.iter().zip(&got).map(|(w, g)| rel_err(g, w)).collect::<Result<_>>()?;
            println!("{shape:?} groups {groups} silu {silu}: rel err y {:.2e} dx {:.2e} dscale {:.2e} dshift {:.2e}", errs[0], errs[1], errs[2], errs[3]);
            worst = errs.iter().fold(worst, |m, &e| m.max(e));
        }
    }
    println!("worst {worst:.2e} ({})", if worst < 1e-4 { "PASS" } else { "FAIL" });
    Ok(())
}
