//! Group normalization with a per-sample, per-channel affine and an optional SiLU as one op, for
//! frozen networks: `silu?(normalize(x) * scale[n, c] + shift[n, c])`, differentiable with respect to
//! `x` only (classifier guidance, attacks on a frozen classifier). On CUDA in f32 the op is two
//! kernels (`group_norm_cuda.rs`) and differentiable with respect to `scale` and `shift` too.
//!
//! ADM normalizes before nearly every convolution (`GroupNorm32`, then SiLU; in a ResBlock with
//! scale-shift norm also `* (1 + s) + t` from the timestep embedding, which folds into the affine).
//! From candle ops that is about ten passes over the activation forward and more backward; here it
//! is two forward (statistics, then output) and three backward. Statistics are accumulated in f64 and
//! the variance is the mean squared deviation (PyTorch's `group_norm`, biased).

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

use crate::ops::contiguous_slice;
use crate::parallel::{for_each_chunk, for_each_chunk_init};
use crate::vector::{lane_sum, silu_f32, with_avx2};

/// `silu?((x - mean_g) / sqrt(var_g + eps) * scale + shift)` for `x` of shape `[n, c, ...]`, statistics
/// per sample and group of `c / groups` channels (over those channels and every position), `scale`
/// and `shift` of shape `[n, c]` (constants). CPU f32/f64 runs one fused op; elsewhere the same
/// arithmetic from candle ops.
pub fn group_norm_affine(
    x: &Tensor,
    groups: usize,
    eps: f64,
    scale: &Tensor,
    shift: &Tensor,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || dims[1] % groups != 0 {
        bail!("group_norm_affine: input {dims:?} cannot be split into {groups} channel groups")
    }
    let (n, c) = (dims[0], dims[1]);
    for (name, t) in [("scale", scale), ("shift", shift)] {
        if t.dims() != [n, c] {
            bail!("group_norm_affine: {name} has shape {:?}, expected [{n}, {c}]", t.dims())
        }
    }
    #[cfg(feature = "cuda")]
    if trains_through_fused(x.device(), x.dtype()) {
        return crate::group_norm_cuda::group_norm_affine_cuda(x, groups, eps, scale, shift, silu);
    }
    let fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    if !fused {
        return group_norm_affine_composed(x, groups, eps, &scale.detach(), &shift.detach(), silu);
    }
    x.contiguous()?.apply_op1(GroupNormAffine {
        groups,
        eps,
        scale: scale.detach().to_dtype(x.dtype())?,
        shift: shift.detach().to_dtype(x.dtype())?,
        silu,
    })
}

/// Whether [`group_norm_affine`] on a tensor of this device and dtype is also differentiable with
/// respect to `scale` and `shift` (f32 on CUDA: the kernels of `group_norm_cuda.rs`); elsewhere
/// only the composed ops are, and training uses those.
pub fn trains_through_fused(device: &candle_core::Device, dtype: DType) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && dtype == DType::F32 && crate::own_cuda_kernel("group-norm")
}

/// The same arithmetic from candle ops, differentiable with respect to every operand (autograd
/// gives the backward): [`group_norm_affine`]'s fallback where no fused op runs (with constant
/// `scale` and `shift` there), and the reference the fused ops are checked against.
pub fn group_norm_affine_composed(x: &Tensor, groups: usize, eps: f64, scale: &Tensor, shift: &Tensor, silu: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let xg = x.reshape((n, groups, ()))?;
    let mean = xg.mean_keepdim(2)?;
    let centered = xg.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(2)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims.as_slice())?;
    let mut affine = vec![1usize; dims.len()];
    affine[0] = n;
    affine[1] = c;
    let y = normed
        .broadcast_mul(&scale.reshape(affine.as_slice())?)?
        .broadcast_add(&shift.reshape(affine.as_slice())?)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

struct GroupNormAffine {
    groups: usize,
    eps: f64,
    scale: Tensor,
    shift: Tensor,
    silu: bool,
}

/// f32 and f64: the forward's per-element work in the type's own precision (f32 vectorized, with
/// AVX2 where the CPU has it), the statistics in f64.
trait Float: WithDType + std::ops::Mul<Output = Self> + std::ops::Add<Output = Self> {
    /// `out = silu?(x * a + b)`.
    fn affine(out: &mut [MaybeUninit<Self>], x: &[Self], a: Self, b: Self, silu: bool);

    /// Mean and variance (the mean squared deviation) of `x`, in f64.
    fn mean_var(x: &[Self]) -> (f64, f64) {
        let count = x.len().max(1) as f64;
        let mean = lane_sum(x, |v| v.to_f64()) / count;
        (mean, lane_sum(x, |v| (v.to_f64() - mean).powi(2)) / count)
    }
}

impl Float for f32 {
    fn affine(out: &mut [MaybeUninit<f32>], x: &[f32], a: f32, b: f32, silu: bool) {
        if silu {
            with_avx2!(affine_silu_avx2, (out: &mut [MaybeUninit<f32>], x: &[f32], a: f32, b: f32), {
                out.iter_mut().zip(x).for_each(|(o, &v)| *o = MaybeUninit::new(silu_f32(v * a + b)))
            })
        } else {
            out.iter_mut().zip(x).for_each(|(o, &v)| *o = MaybeUninit::new(v * a + b))
        }
    }

    fn mean_var(x: &[f32]) -> (f64, f64) {
        with_avx2!(mean_var_avx2, (x: &[f32]) -> (f64, f64), {
            let count = x.len().max(1) as f64;
            let mean = lane_sum(x, |v| v as f64) / count;
            (mean, lane_sum(x, |v| (v as f64 - mean).powi(2)) / count)
        })
    }
}
impl Float for f64 {
    fn affine(out: &mut [MaybeUninit<f64>], x: &[f64], a: f64, b: f64, silu: bool) {
        for (o, &v) in out.iter_mut().zip(x) {
            let y = v * a + b;
            *o = MaybeUninit::new(if silu { y / (1.0 + (-y).exp()) } else { y });
        }
    }
}

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

impl GroupNormAffine {
    /// Mean and `1 / sqrt(var + eps)` of one group's entries.
    fn stats<T: Float>(&self, x: &[T]) -> (f64, f64) {
        let (mean, var) = T::mean_var(x);
        (mean, 1.0 / (var + self.eps).sqrt())
    }

    /// Entries per channel plane and per (sample, group) of an input with `dims`, and the affine's
    /// per-(sample, channel) scale and shift.
    fn layout<T: Float>(&self, dims: &[usize]) -> Result<(usize, usize, Vec<T>, Vec<T>)> {
        let plane = dims[2..].iter().product::<usize>();
        let per_group = dims[1] / self.groups * plane;
        let scale = self.scale.flatten_all()?.to_vec1::<T>()?;
        let shift = self.shift.flatten_all()?.to_vec1::<T>()?;
        Ok((plane, per_group, scale, shift))
    }

    /// One (sample, group) per task: its statistics, then `silu?(x * a + b)` per channel plane with
    /// the normalization and the affine folded into `a`, `b`.
    fn forward<T: Float>(&self, x: &[T], dims: &[usize]) -> Result<Vec<T>> {
        let (plane, per_group, scale, shift) = self.layout::<T>(dims)?;
        let channels = dims[1] / self.groups;
        let mut out: Vec<T> = Vec::with_capacity(x.len());
        for_each_chunk(&mut out.spare_capacity_mut()[..x.len()], per_group, || (), |_, ng, out| {
            let x = &x[ng * per_group..][..per_group];
            let (mean, rstd) = self.stats(x);
            let first_channel = ng * channels; // sample * c + channel
            for (i, (out, x)) in out.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
                let nc = first_channel + i;
                let s = scale[nc].to_f64();
                let (a, b) = (T::from_f64(s * rstd), T::from_f64(shift[nc].to_f64() - mean * rstd * s));
                T::affine(out, x, a, b, self.silu);
            }
        });
        // SAFETY: every group's chunk was written in full, plane by plane.
        unsafe { out.set_len(x.len()) };
        Ok(out)
    }

    /// `dx = rstd * (d - mean(d) - xhat * mean(d * xhat))` per group, with `d = dpre * scale` and
    /// `dpre` the gradient at the affine's output (through the SiLU's derivative when there is one).
    fn backward<T: Float>(&self, x: &[T], grad: &[T], dims: &[usize]) -> Result<Vec<T>> {
        let (plane, per_group, scale, shift) = self.layout::<T>(dims)?;
        let channels = dims[1] / self.groups;
        let mut out = vec![T::zero(); x.len()];
        for_each_chunk_init(&mut out, per_group, || (), |_, ng, out| {
            let (x, grad) = (&x[ng * per_group..][..per_group], &grad[ng * per_group..][..per_group]);
            let (mean, rstd) = self.stats(x);
            let first_channel = ng * channels;
            // d (the gradient at the normalized value) into `out`, and its two group means.
            let (mut sum_d, mut sum_d_xhat) = (0.0, 0.0);
            for (i, ((out, x), grad)) in out.chunks_mut(plane).zip(x.chunks(plane)).zip(grad.chunks(plane)).enumerate() {
                let nc = first_channel + i;
                let (s, t) = (scale[nc].to_f64(), shift[nc].to_f64());
                for ((o, &v), &g) in out.iter_mut().zip(x).zip(grad) {
                    let xhat = (v.to_f64() - mean) * rstd;
                    let mut dpre = g.to_f64();
                    if self.silu {
                        let sig = sigmoid(xhat * s + t);
                        let pre = xhat * s + t;
                        dpre *= sig * (1.0 + pre * (1.0 - sig));
                    }
                    let d = dpre * s;
                    sum_d += d;
                    sum_d_xhat += d * xhat;
                    *o = T::from_f64(d);
                }
            }
            let count = x.len().max(1) as f64;
            let (mean_d, mean_d_xhat) = (sum_d / count, sum_d_xhat / count);
            for (o, &v) in out.iter_mut().zip(x) {
                let xhat = (v.to_f64() - mean) * rstd;
                *o = T::from_f64(rstd * (o.to_f64() - mean_d - xhat * mean_d_xhat));
            }
        });
        Ok(out)
    }
}

fn contiguous<'a, T>(v: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    contiguous_slice(v, layout, "group_norm_affine", what)
}

impl CustomOp1 for GroupNormAffine {
    fn name(&self) -> &'static str {
        "group-norm-affine"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match x {
            CpuStorage::F32(v) => CpuStorage::F32(self.forward(contiguous(v, l, "the input")?, l.dims())?),
            CpuStorage::F64(v) => CpuStorage::F64(self.forward(contiguous(v, l, "the input")?, l.dims())?),
            other => bail!("group_norm_affine: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GroupNormAffineGrad { forward: self })?))
    }
}

/// The input gradient of [`GroupNormAffine`], from its input `x` and the output's gradient.
struct GroupNormAffineGrad<'a> {
    forward: &'a GroupNormAffine,
}

impl CustomOp2 for GroupNormAffineGrad<'_> {
    fn name(&self) -> &'static str {
        "group-norm-affine-grad"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout, g: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        if l.dims() != gl.dims() {
            bail!("group_norm_affine: input {:?} and gradient {:?} differ in shape", l.dims(), gl.dims())
        }
        let out = match (x, g) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(self.forward.backward(contiguous(x, l, "the input")?, contiguous(g, gl, "the gradient")?, l.dims())?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(self.forward.backward(contiguous(x, l, "the input")?, contiguous(g, gl, "the gradient")?, l.dims())?)
            }
            _ => bail!("group_norm_affine: unsupported dtypes {:?}, {:?}", x.dtype(), g.dtype()),
        };
        Ok((out, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op and candle's composed ops agree (f64) on the output and the input gradient, with
    /// and without SiLU, for image-shaped and flat inputs.
    #[test]
    fn fused_matches_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        for shape in [vec![3usize, 8, 5, 4], vec![2, 8]] {
            for silu in [false, true] {
                let x = Var::from_tensor(&Tensor::randn(1f64, 3., shape.as_slice(), &dev)?)?;
                let scale = Tensor::randn(0f64, 1., (shape[0], 8), &dev)?;
                let shift = Tensor::randn(0f64, 1., (shape[0], 8), &dev)?;
                let g = Tensor::randn(0f64, 1., shape.as_slice(), &dev)?;
                let run = |fused: bool| -> Result<(Tensor, Tensor)> {
                    let y = if fused {
                        group_norm_affine(x.as_tensor(), 4, 1e-5, &scale, &shift, silu)?
                    } else {
                        group_norm_affine_composed(x.as_tensor(), 4, 1e-5, &scale, &shift, silu)?
                    };
                    let grads = (&y * &g)?.sum_all()?.backward()?;
                    Ok((y, grads.get(x.as_tensor()).expect("input gradient").clone()))
                };
                let (a, b) = (run(true)?, run(false)?);
                for (u, v) in [(&a.0, &b.0), (&a.1, &b.1)] {
                    let err = (u - v)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    assert!(err < 1e-10, "shape {shape:?} silu {silu}: {err}");
                }
            }
        }
        Ok(())
    }
}
