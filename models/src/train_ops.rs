//! CPU kernels of the training-mode forward that sit between convolutions: batch norm with the
//! batch's statistics, and ReLU (after adding a residual block's shortcut).
//!
//! From candle ops, training-mode batch norm is about seven passes over the activation forward and
//! as many backward, and candle's ReLU backward builds a zero tensor, a comparison, a cast and a
//! product; each graph node also costs candle's backprop a zero-filled gradient buffer and an
//! addition. Here batch norm is one node (statistics, then one pass writing the output; backward two
//! per-channel sums, then one pass writing the input gradient) and add + ReLU another (backward:
//! one masking pass, shared by the two inputs). Statistics and sums are accumulated in f64. CPU,
//! f32/f64; the callers use candle ops elsewhere.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::ops::contiguous_slice;
use crate::parallel::{for_each_chunk, for_each_chunk_init};
use crate::vector::CpuFloat;

/// Shape of an `[n, c, h, w]` activation as batch norm sees it.
#[derive(Clone, Copy)]
struct Planes {
    n: usize,
    c: usize,
    /// `h * w`.
    plane: usize,
}

impl Planes {
    fn of(layout: &Layout) -> Result<Self> {
        let (n, c, h, w) = layout.shape().dims4()?;
        Ok(Self { n, c, plane: h * w })
    }

    /// `sum over (sample, position) of f(x, other)` for channel `c` in f64, with `other` an array of
    /// the same shape (or `x` again): two sums in one pass, `f` giving both terms.
    fn channel_sums<T: CpuFloat>(&self, c: usize, x: &[T], other: &[T], f: impl Fn(f64, f64) -> [f64; 2]) -> [f64; 2] {
        let mut lanes = [[0f64; 2]; 4];
        for s in 0..self.n {
            let at = (s * self.c + c) * self.plane;
            let (x, o) = (&x[at..][..self.plane], &other[at..][..self.plane]);
            for (i, (&x, &o)) in x.iter().zip(o).enumerate() {
                let [a, b] = f(x.to_f64(), o.to_f64());
                lanes[i % 4][0] += a;
                lanes[i % 4][1] += b;
            }
        }
        lanes.iter().fold([0.0, 0.0], |[a, b], [x, y]| [a + x, b + y])
    }
}

/// Batch statistics: `[2, c]`, the per-channel mean and biased variance of `x` (`[n, c, h, w]`).
pub(crate) fn channel_mean_var(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&MeanVar)
}

struct MeanVar;

impl MeanVar {
    fn run<T: CpuFloat>(x: &[T], p: Planes) -> Vec<T> {
        let count = (p.n * p.plane) as f64;
        let mut means = vec![0f64; p.c];
        for_each_chunk_init(&mut means, 1, || (), |_, c, mean| mean[0] = p.channel_sums(c, x, x, |v, _| [v, 0.0])[0] / count);
        let mut vars = vec![0f64; p.c];
        for_each_chunk_init(&mut vars, 1, || (), |_, c, var| {
            let mean = means[c];
            var[0] = p.channel_sums(c, x, x, |v, _| [(v - mean) * (v - mean), 0.0])[0] / count
        });
        means.iter().chain(&vars).map(|&v| T::from_f64(v)).collect()
    }
}

impl CustomOp1 for MeanVar {
    fn name(&self) -> &'static str {
        "batch-norm-statistics"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = Planes::of(l)?;
        let out = match x {
            CpuStorage::F32(v) => CpuStorage::F32(MeanVar::run(contiguous_slice(v, l, self.name(), "input")?, p)),
            CpuStorage::F64(v) => CpuStorage::F64(MeanVar::run(contiguous_slice(v, l, self.name(), "input")?, p)),
            other => bail!("batch norm: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((2, p.c))))
    }
}

/// `(x - mean) * inv_std * weight + bias` per channel, differentiable with respect to `x`, `weight`
/// and `bias`, for the batch's own `mean` and `inv_std` (`[c]` each, f64).
pub(crate) fn normalize(x: &Tensor, weight: &Tensor, bias: &Tensor, mean: Vec<f64>, inv_std: Vec<f64>) -> Result<Tensor> {
    x.contiguous()?.apply_op3(weight, bias, Normalize { mean, inv_std })
}

struct Normalize {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
}

impl Normalize {
    fn forward<T: CpuFloat>(&self, x: &[T], weight: &[T], bias: &[T], p: Planes) -> Vec<T> {
        // y = x * a + b per channel.
        let (a, b): (Vec<T>, Vec<T>) = (0..p.c)
            .map(|c| {
                let a = self.inv_std[c] * weight[c].to_f64();
                (T::from_f64(a), T::from_f64(bias[c].to_f64() - self.mean[c] * a))
            })
            .unzip();
        let sample = p.c * p.plane;
        let mut out: Vec<T> = Vec::with_capacity(x.len());
        for_each_chunk(&mut out.spare_capacity_mut()[..x.len()], sample, || (), |_, s, y| {
            let x = &x[s * sample..][..sample];
            for (c, (y, x)) in y.chunks_mut(p.plane).zip(x.chunks(p.plane)).enumerate() {
                let (a, b) = (a[c], b[c]);
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = MaybeUninit::new(x * a + b);
                }
            }
        });
        // SAFETY: every sample's chunk was written in full.
        unsafe { out.set_len(x.len()) };
        out
    }
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = Planes::of(lx)?;
        let out = match (x, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.forward(contiguous_slice(x, lx, self.name(), "input")?, contiguous_slice(w, lw, self.name(), "weight")?, contiguous_slice(b, lb, self.name(), "bias")?, p))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.forward(contiguous_slice(x, lx, self.name(), "input")?, contiguous_slice(w, lw, self.name(), "weight")?, contiguous_slice(b, lb, self.name(), "bias")?, p))
            }
            _ => bail!("batch norm: input, weight and bias must all be f32 or all f64"),
        };
        Ok((out, lx.shape().clone()))
    }

    /// `d bias = sum g`, `d weight = sum g * x_hat`, `d x = a * (g - d bias / m - x_hat * d weight / m)`
    /// with `a = weight * inv_std` and `m = n * h * w`.
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = weight.dim(0)?;
        let numel = x.elem_count();
        let packed = x.detach().apply_op2_no_bwd(
            &grad.contiguous()?,
            &NormalizeBackward { mean: self.mean.clone(), inv_std: self.inv_std.clone(), weight: weight.to_dtype(candle_core::DType::F64)?.to_vec1()? },
        )?;
        let grad_x = packed.narrow(0, 0, numel)?.reshape(x.dims())?;
        let grad_weight = packed.narrow(0, numel, c)?;
        let grad_bias = packed.narrow(0, numel + c, c)?;
        // Gradients only for the operands that track them (a frozen weight gets none).
        let tracked = |t: Tensor, operand: &Tensor| operand.track_op().then_some(t);
        Ok((tracked(grad_x, x), tracked(grad_weight, weight), tracked(grad_bias, bias)))
    }
}

/// [`Normalize`]'s backward given its input and the output's gradient: `[d x (flattened), d weight,
/// d bias]` in one vector.
struct NormalizeBackward {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    weight: Vec<f64>,
}

impl NormalizeBackward {
    fn run<T: CpuFloat>(&self, x: &[T], g: &[T], p: Planes) -> Vec<T> {
        let numel = x.len();
        let m = (p.n * p.plane) as f64;
        let mut out = vec![T::zero(); numel + 2 * p.c];
        let (dx, sums) = out.split_at_mut(numel);
        let (dweight, dbias) = sums.split_at_mut(p.c);
        // Per channel, in one pass: sum g (d bias) and sum g * x_hat (d weight).
        let mut sums = vec![0f64; 2 * p.c];
        for_each_chunk_init(&mut sums, 2, || (), |_, c, pair| {
            let (mean, inv_std) = (self.mean[c], self.inv_std[c]);
            pair.copy_from_slice(&p.channel_sums(c, x, g, |x, g| [g, g * (x - mean) * inv_std]));
        });
        for (c, pair) in sums.chunks(2).enumerate() {
            dbias[c] = T::from_f64(pair[0]);
            dweight[c] = T::from_f64(pair[1]);
        }
        // d x = g * a + (x - mean) * slope + shift, per channel.
        let coefficients: Vec<(T, T, T, T)> = (0..p.c)
            .map(|c| {
                let (mean, inv_std) = (self.mean[c], self.inv_std[c]);
                let a = self.weight[c] * inv_std;
                let slope = -a * inv_std * dweight[c].to_f64() / m;
                let shift = -a * dbias[c].to_f64() / m;
                (T::from_f64(a), T::from_f64(mean), T::from_f64(slope), T::from_f64(shift))
            })
            .collect();
        let sample = p.c * p.plane;
        for_each_chunk_init(dx, sample, || (), |_, s, dx| {
            let (x, g) = (&x[s * sample..][..sample], &g[s * sample..][..sample]);
            for (c, ((dx, x), g)) in dx.chunks_mut(p.plane).zip(x.chunks(p.plane)).zip(g.chunks(p.plane)).enumerate() {
                let (a, mean, slope, shift) = coefficients[c];
                for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    *d = g * a + (x - mean) * slope + shift;
                }
            }
        });
        out
    }
}

impl CustomOp2 for NormalizeBackward {
    fn name(&self) -> &'static str {
        "batch-norm-train-backward"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, g: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = Planes::of(lx)?;
        if lx.dims() != lg.dims() {
            bail!("batch norm backward: input {:?} and gradient {:?} differ in shape", lx.dims(), lg.dims())
        }
        let out = match (x, g) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(self.run(contiguous_slice(x, lx, self.name(), "input")?, contiguous_slice(g, lg, self.name(), "gradient")?, p)),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(self.run(contiguous_slice(x, lx, self.name(), "input")?, contiguous_slice(g, lg, self.name(), "gradient")?, p)),
            _ => bail!("batch norm backward: input and gradient must both be f32 or f64"),
        };
        Ok((out, Shape::from(lx.shape().elem_count() + 2 * p.c)))
    }
}

/// `relu(x + residual)` (or `relu(x)`), with PyTorch's ReLU gradient: the upstream gradient where the
/// output is positive, zero elsewhere; both inputs get the same masked gradient.
pub(crate) fn add_relu(x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    match residual {
        Some(r) => {
            if r.dims() != x.dims() {
                bail!("add_relu: input {:?} and residual {:?} differ in shape", x.dims(), r.dims())
            }
            x.apply_op2(&r.contiguous()?, AddRelu)
        }
        None => x.apply_op1(AddRelu),
    }
}

struct AddRelu;

/// Entries per sample (the first axis) of a tensor of `layout`'s shape, at least one.
fn sample_len(layout: &Layout) -> usize {
    let dims = layout.dims();
    (dims.iter().skip(1).product::<usize>()).max(1)
}

impl AddRelu {
    /// `relu(x + r?)` one sample (`chunk` entries) per task.
    fn run<T: CpuFloat>(x: &[T], r: Option<&[T]>, chunk: usize) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        for_each_chunk_init(&mut out, chunk, || (), |_, i, y| {
            let at = i * chunk;
            let x = &x[at..][..y.len()];
            match r {
                Some(r) => y.iter_mut().zip(x).zip(&r[at..]).for_each(|((y, &x), &r)| *y = (x + r).relu()),
                None => y.iter_mut().zip(x).for_each(|(y, &x)| *y = x.relu()),
            }
        });
        out
    }
}

impl CustomOp1 for AddRelu {
    fn name(&self) -> &'static str {
        "relu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match x {
            CpuStorage::F32(v) => CpuStorage::F32(AddRelu::run(contiguous_slice(v, l, "relu", "input")?, None, sample_len(l))),
            CpuStorage::F64(v) => CpuStorage::F64(AddRelu::run(contiguous_slice(v, l, "relu", "input")?, None, sample_len(l))),
            other => bail!("relu: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(crate::conv_bn::relu_mask(grad, y)?))
    }
}

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, r: &CpuStorage, lr: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (x, r) {
            (CpuStorage::F32(x), CpuStorage::F32(r)) => CpuStorage::F32(AddRelu::run(contiguous_slice(x, lx, "add_relu", "input")?, Some(contiguous_slice(r, lr, "add_relu", "residual")?), sample_len(lx))),
            (CpuStorage::F64(x), CpuStorage::F64(r)) => CpuStorage::F64(AddRelu::run(contiguous_slice(x, lx, "add_relu", "input")?, Some(contiguous_slice(r, lr, "add_relu", "residual")?), sample_len(lx))),
            _ => bail!("add_relu: input and residual must both be f32 or f64"),
        };
        Ok((out, lx.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _r: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let masked = crate::conv_bn::relu_mask(grad, y)?;
        Ok((Some(masked.clone()), Some(masked)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
    }

    /// Batch norm and add + ReLU against the same arithmetic from candle ops (f64): outputs and the
    /// gradients of every input.
    #[test]
    fn fused_matches_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0.5f64, 2., (3, 4, 5, 6), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f64, 0.3, 4, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 0.3, 4, &dev)?)?;
        let r = Var::from_tensor(&Tensor::randn(0f64, 1., (3, 4, 5, 6), &dev)?)?;
        let probe = Tensor::randn(0f64, 1., (3, 4, 5, 6), &dev)?;
        let eps = 1e-5;

        let stats = channel_mean_var(&x)?;
        let (mean, var) = (stats.get(0)?, stats.get(1)?);
        let inv_std: Vec<f64> = var.to_vec1::<f64>()?.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        let y = normalize(&x, &w, &b, mean.to_vec1()?, inv_std)?;
        let fused = add_relu(&y, Some(&r))?;
        let fused_plain = add_relu(&y, None)?;

        let (y_ref, m, v) = crate::ops::batch_norm_textbook(&x, &w, &b, eps)?;
        let composed = (&y_ref + r.as_tensor())?.relu()?;
        let composed_plain = y_ref.relu()?;
        assert!(max_diff(&mean, &m.flatten_all()?)? < 1e-12 && max_diff(&var, &v.flatten_all()?)? < 1e-12);
        assert!(max_diff(&fused, &composed)? < 1e-12 && max_diff(&fused_plain, &composed_plain)? < 1e-12);

        for (ours, theirs) in [(fused, composed), (fused_plain, composed_plain)] {
            let (g1, g2) = ((ours * &probe)?.sum_all()?.backward()?, (theirs * &probe)?.sum_all()?.backward()?);
            for (name, v) in [("x", x.as_tensor()), ("weight", w.as_tensor()), ("bias", b.as_tensor()), ("residual", r.as_tensor())] {
                match (g1.get(v), g2.get(v)) {
                    (Some(a), Some(b)) => assert!(max_diff(a, b)? < 1e-10, "{name}: {}", max_diff(a, b)?),
                    (None, None) => {}
                    _ => panic!("{name}: gradient on one side only"),
                }
            }
        }
        Ok(())
    }
}
