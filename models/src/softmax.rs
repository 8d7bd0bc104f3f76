//! Softmax over the last dimension as one CPU op, with its backward.
//!
//! Attention at 16x16 in the CIFAR-10 ADM weighs all 256 positions against each other per sample
//! and head (4 heads): a 16 MB tensor for a batch of 16. From candle ops (max, subtract, exp, sum,
//! divide) that is five passes over it, each allocating, and `exp` a libm call per element; here
//! each row is read once from memory and its passes (max, exp, sum, scale) run while it sits in L1,
//! with the polynomial [`exp_f32`].

use std::mem::MaybeUninit;

use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use crate::ops::{cpu_f32, PrecomputedOutput};
use crate::parallel::for_each_chunk;
use crate::vector::{exp_f32, lane_sum, lane_sum_zip, with_avx2, LANES};

/// `softmax(x)` over the last dimension, computed in f32 and returned in `x`'s dtype (the
/// reference's `softmax(w.float()).type(w.dtype)`). CPU f32 runs the fused op; CUDA f32 candle-nn's
/// fused forward kernel (which has no backward of its own) with [`with_softmax_grad`]'s backward;
/// elsewhere candle ops.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let rows_ok = x.rank() > 0 && x.dim(D::Minus1)? > 0;
    if x.device().is_cpu() && x.dtype() == DType::F32 && rows_ok {
        x.contiguous()?.apply_op1(Softmax)
    } else if x.device().is_cuda() && x.dtype() == DType::F32 && rows_ok && crate::own_cuda_kernel("softmax") {
        with_softmax_grad(x, candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?)
    } else {
        composed(x)
    }
}

/// `y = softmax(x)` (computed elsewhere, contiguous) put into `x`'s graph with the softmax's input
/// gradient `y * (g - sum(g * y))` from candle ops: four passes backward where the autograd of
/// [`composed`] takes about ten. On CUDA this follows candle-nn's forward kernel.
fn with_softmax_grad(x: &Tensor, y: Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(SoftmaxFromOutput { output: PrecomputedOutput::new(y) })
}

/// The same from candle ops; autograd gives the backward. The max shift is detached: it is a
/// constant for the softmax, so leaving it out of the graph only drops a zero gradient term.
fn composed(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let num = x.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)?.to_dtype(dtype)
}

struct Softmax;

/// `y = e^(x - max x) / sum e^(x - max x)` for one row.
fn softmax_row(y: &mut [MaybeUninit<f32>], x: &[f32]) {
    with_avx2!(softmax_row_avx2, (y: &mut [MaybeUninit<f32>], x: &[f32]), {
        let mut max = [f32::NEG_INFINITY; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (m, &v) in max.iter_mut().zip(chunk) {
                *m = if v > *m { v } else { *m };
            }
        }
        let max = chunks.remainder().iter().chain(&max).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        // Separate passes over the row (it stays in L1): each is a loop LLVM vectorizes whole.
        for (y, &x) in y.iter_mut().zip(x) {
            *y = MaybeUninit::new(exp_f32(x - max));
        }
        // SAFETY: every element was just written (`y` and `x` have the row's length).
        let y = unsafe { &mut *(y as *mut [MaybeUninit<f32>] as *mut [f32]) };
        let total = lane_sum(y, |v| v);
        let inv = 1.0 / total;
        y.iter_mut().for_each(|y| *y *= inv);
    })
}

/// `dx = y * (g - sum(g * y))` for one row.
fn softmax_grad_row(dx: &mut [MaybeUninit<f32>], y: &[f32], g: &[f32]) {
    with_avx2!(softmax_grad_row_avx2, (dx: &mut [MaybeUninit<f32>], y: &[f32], g: &[f32]), {
        let dot = lane_sum_zip(y, g, |y, g| y * g);
        for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
            *dx = MaybeUninit::new(y * (g - dot));
        }
    })
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "bigroc-softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(x, l, "softmax", "the input")?;
        let len = l.dims().last().copied().unwrap_or(1);
        let mut y: Vec<f32> = Vec::with_capacity(x.len());
        for_each_chunk(&mut y.spare_capacity_mut()[..x.len()], len, || (), |_, row, y| {
            softmax_row(y, &x[row * len..][..len])
        });
        // SAFETY: every row was written in full.
        unsafe { y.set_len(x.len()) };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// The op [`with_softmax_grad`] puts in the graph: its forward hands over the output computed
/// before, its backward is composed.
struct SoftmaxFromOutput {
    output: PrecomputedOutput,
}

impl CustomOp1 for SoftmaxFromOutput {
    fn name(&self) -> &'static str {
        "bigroc-softmax-from-output"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output.take_cpu(self.name())
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.output.take_cuda(self.name())
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * grad.broadcast_sub(&dot)?)?))
    }
}

/// The input gradient of [`Softmax`], from its output and the output's gradient.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "bigroc-softmax-grad"
    }

    fn cpu_fwd(&self, y: &CpuStorage, l: &Layout, g: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        if l.dims() != gl.dims() {
            bail!("softmax: output {:?} and gradient {:?} differ in shape", l.dims(), gl.dims())
        }
        let (y, g) = (cpu_f32(y, l, "softmax", "the output")?, cpu_f32(g, gl, "softmax", "the gradient")?);
        let len = l.dims().last().copied().unwrap_or(1);
        let mut dx: Vec<f32> = Vec::with_capacity(y.len());
        for_each_chunk(&mut dx.spare_capacity_mut()[..y.len()], len, || (), |_, row, dx| {
            softmax_grad_row(dx, &y[row * len..][..len], &g[row * len..][..len])
        });
        // SAFETY: every row was written in full (its `y` and `g` rows have its length).
        unsafe { dx.set_len(y.len()) };
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic values in [-scale, scale).
    fn spread(shape: (usize, usize, usize), seed: usize, scale: f32) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n).map(|i| ((i * 7919 + seed) % 101) as f32 / 50.5 * scale - scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// Output and input gradient against the composed ops computed in f64, on rows with a large
    /// spread (the max shift matters), given transposed (non-contiguous): rows of 5 (tail only), 37
    /// (lanes and a tail) and 64 (lanes only). f32 rounding: about 1e-7 of the output (at most 1)
    /// and of the output gradient `g` (the input gradient is `y * (g - sum g y)`).
    #[test]
    fn fused_matches_composed_ops_in_f64() -> Result<()> {
        for (rows, len) in [(37, 5), (5, 37), (6, 64)] {
            let x = Var::from_tensor(&spread((3, len, rows), 13, 20.0)?)?;
            let g = spread((3, rows, len), 29, 3.0)?;
            let y = softmax_last_dim(&x.as_tensor().transpose(1, 2)?)?;
            let dx = (&y * &g)?.sum_all()?.backward()?.get(x.as_tensor()).expect("input gradient").clone();

            let x64 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F64)?)?;
            let input64 = x64.as_tensor().transpose(1, 2)?;
            let num = input64.broadcast_sub(&input64.max_keepdim(D::Minus1)?.detach())?.exp()?;
            let y64 = num.broadcast_div(&num.sum_keepdim(D::Minus1)?)?;
            let grads = (&y64 * g.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
            let dx64 = grads.get(x64.as_tensor()).expect("input gradient");

            for (name, a, b, scale) in [("output", &y, &y64, 1.0), ("gradient", &dx, dx64, 3.0)] {
                let err = (a.to_dtype(DType::F64)? - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err <= 1e-6 * scale, "rows of {len}, {name}: max error {err}");
            }
            // The CUDA path's arithmetic on the CPU: candle-nn's forward, the composed backward.
            let xt = x.as_tensor().transpose(1, 2)?;
            let y_nn = with_softmax_grad(&xt, candle_nn::ops::softmax_last_dim(&xt.contiguous()?)?)?;
            let dx_nn = (&y_nn * &g)?.sum_all()?.backward()?.get(x.as_tensor()).expect("input gradient").clone();
            for (name, a, b, scale) in [("candle-nn output", &y_nn, &y64, 1.0), ("composed gradient", &dx_nn, dx64, 3.0)] {
                let err = (a.to_dtype(DType::F64)? - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err <= 1e-6 * scale, "rows of {len}, {name}: max error {err}");
            }
            let sums = y.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "rows of {len} sum to {sums:?}");
        }
        Ok(())
    }
}
