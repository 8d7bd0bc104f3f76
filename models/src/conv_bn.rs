//! A frozen network's convolution, batch norm, optional residual and ReLU as one op:
//! `relu?(conv2d(x, weight) * scale + shift + residual?)`, differentiable with respect to `x` and the
//! residual (the weights are constants: PGD and guidance differentiate with respect to the image).
//!
//! Every ResNet block in inference mode is a chain of these (`scale`/`shift` are batch norm's running
//! statistics folded per channel, as PyTorch's CPU kernel evaluates it). Done as separate candle ops,
//! the batch norm, the residual sum and the ReLU each read and write every activation in the forward
//! and again in the backward (with temporaries for the ReLU mask), and the convolution's output is
//! copied once more into the graph; on CPU that was as much time as the convolutions' gemms.
//!
//! On CPU in f32/f64 the forward runs inside the op, one sample at a time (whole samples per thread,
//! see [`crate::parallel`]): im2col and a gemm written straight into the output (or, for 3x3
//! stride-1 layers in f32, the kernels of [`crate::conv3x3`]), then scale, shift, residual and ReLU
//! applied while the sample is in cache. The backward likewise: `g * [y > 0] * scale`, `W^T` times it, col2im (and `g * [y > 0]` for
//! the residual). The ReLU passes the gradient where its
//! output is positive, as PyTorch's does (candle's own ReLU also passes it at exactly zero). Other
//! devices and dtypes run the convolution as candle's and the rest as
//! [`channel_affine`](crate::channel_affine::channel_affine).

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use crate::channel_affine::channel_affine;
use crate::conv::{conv2d_const_weight, uses_im2col, Geometry};
use crate::conv3x3::Conv3x3;
use crate::vector::CpuFloat;
use crate::matmul::{gemm_threads, matmul, Operand, Write};
use crate::ops::{contiguous_slice, with_cpu_slice};
use crate::parallel::{self, split_by_sample};

/// `relu?(conv2d(x, weight) * scale + shift + residual?)` with `scale`, `shift` per output channel
/// (`[c_out]`), `residual` of the output's shape, and `weight` `[c_out, c_in, kh, kw]` used as a
/// constant (no bias, groups 1, dilation 1, the same `stride` and zero `padding` on both axes).
/// Gradients reach `x` and `residual`; `weight`, `scale` and `shift` are constants.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_bn_eval(
    x: &Tensor,
    weight: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let geometry = Geometry::of_forward(x, weight, stride, padding)?;
    for (name, t) in [("scale", scale), ("shift", shift)] {
        if t.dims() != [geometry.c_out] {
            bail!(
                "conv2d_bn_eval: {name} has shape {:?}, expected [{}]",
                t.dims(),
                geometry.c_out
            )
        }
    }
    if !uses_im2col(x) {
        return composed(x, weight, scale, shift, residual, relu, stride, padding);
    }
    let op = ConvBnEval {
        geometry,
        weight: weight.detach().contiguous()?,
        affine: Some((scale.detach(), shift.detach())),
        relu,
    };
    let x = x.contiguous()?;
    match residual {
        None => x.apply_op1(op),
        Some(r) => {
            let out_shape = (
                geometry.b,
                geometry.c_out,
                geometry.rows.out,
                geometry.cols.out,
            );
            if r.dims() != [out_shape.0, out_shape.1, out_shape.2, out_shape.3] {
                bail!(
                    "conv2d_bn_eval: residual has shape {:?}, expected {out_shape:?}",
                    r.dims()
                )
            }
            x.apply_op2(&r.contiguous()?, op)
        }
    }
}

/// The convolution, then its epilogue as [`channel_affine`] (one kernel each way on CUDA in f32,
/// candle ops in half precision): autograd gives the backward.
#[allow(clippy::too_many_arguments)]
fn composed(
    x: &Tensor,
    weight: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let y = conv2d_const_weight(x, weight, stride, padding)?;
    channel_affine(&y, Some(&scale.detach()), &shift.detach(), residual, relu)
}

/// The op [`conv2d_bn_eval`] puts in the graph on CPU: input `x` (and the residual as a second
/// argument when there is one).
struct ConvBnEval {
    geometry: Geometry,
    weight: Tensor,
    /// `None` for a plain convolution (no epilogue at all).
    affine: Option<(Tensor, Tensor)>,
    relu: bool,
}

impl ConvBnEval {
    /// im2col, gemm and the epilogue one sample at a time: the sample's windows (at most a few MB)
    /// stay in cache between the gather and the gemm, and its output between the gemm and the
    /// epilogue (Winograd on 4x4 maps takes a few samples per call, see [`samples_per_call`]).
    /// Whole samples go to the threads when there are enough of them (see [`crate::parallel`]); a
    /// smaller batch runs its samples in turn with gemm's own threads.
    fn forward<T: CpuFloat>(&self, x: &[T], residual: Option<&[T]>) -> Result<Vec<T>> {
        let g = self.geometry;
        let (scale, shift) = match &self.affine {
            Some((scale, shift)) => (Some(scale.to_vec1::<T>()?), Some(shift.to_vec1::<T>()?)),
            None => (None, None),
        };
        with_cpu_slice(&self.weight, "conv2d_bn_eval", "weight", |weight: &[T]| {
            let conv3x3 = Conv3x3::plan(&g, weight);
            let sample = SampleForward {
                g,
                weight,
                conv3x3: conv3x3.as_ref(),
                scale: scale.as_deref(),
                shift: shift.as_deref(),
                relu: self.relu,
            };
            let (sample_in, sample_out) = (g.c_in * g.rows.n * g.cols.n, g.c_out * g.rows.out * g.cols.out);
            let group = samples_per_call(conv3x3.as_ref(), &g);
            // The samples `s ..` that the output chunk `y` holds.
            let x = |s: usize, y: &[MaybeUninit<T>]| &x[s * sample_in..][..y.len() / sample_out * sample_in];
            let residual = |s: usize, y: &[MaybeUninit<T>]| residual.map(|r| &r[s * sample_out..][..y.len()]);
            let mut out: Vec<T> = Vec::with_capacity(g.b * sample_out);
            let dst = &mut out.spare_capacity_mut()[..g.b * sample_out];
            if split_by_sample(g.b) {
                parallel::for_each_chunk(dst, group * sample_out, || sample.scratch(), |scratch, i, y| {
                    sample.run(x(i * group, y), residual(i * group, y), y, scratch, gemm::Parallelism::None)
                });
            } else {
                let mut scratch = sample.scratch();
                for (i, y) in dst.chunks_mut(group * sample_out).enumerate() {
                    sample.run(x(i * group, y), residual(i * group, y), y, &mut scratch, gemm_threads());
                }
            }
            // SAFETY: `run` wrote every element of every sample's output.
            unsafe { out.set_len(g.b * sample_out) };
            out
        })
    }

    fn output_shape(&self) -> Shape {
        let g = self.geometry;
        Shape::from((g.b, g.c_out, g.rows.out, g.cols.out))
    }

    /// The input's gradient and, with a residual, the residual's (`g * [y > 0]`).
    fn backward(
        &self,
        y: &Tensor,
        grad: &Tensor,
        has_residual: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // With a residual its gradient is the masked gradient, which the convolution's path reuses.
        let (grad, relu) = if has_residual && self.relu {
            (grad.apply_op2_no_bwd(y, &ReluMask)?, false)
        } else {
            (grad, self.relu)
        };
        let op = ConvBnEvalInputGrad {
            geometry: self.geometry,
            weight: self.weight.clone(),
            scale: self.affine.as_ref().map(|(scale, _)| scale.clone()),
            relu,
        };
        // The output is only read to mask by the ReLU.
        let grad_x = if relu { grad.apply_op2_no_bwd(y, &op)? } else { grad.apply_op1_no_bwd(&op)? };
        Ok((grad_x, has_residual.then_some(grad)))
    }
}

/// One sample of [`ConvBnEval`]'s forward: the constants, borrowed for the op's duration.
struct SampleForward<'a, T> {
    g: Geometry,
    weight: &'a [T],
    /// The prepared kernel when this layer is a 3x3 convolution done without im2col (see
    /// [`crate::conv3x3`]).
    conv3x3: Option<&'a Conv3x3>,
    scale: Option<&'a [T]>,
    shift: Option<&'a [T]>,
    relu: bool,
}

impl<T: CpuFloat> SampleForward<'_, T> {
    /// One thread's scratch: the window buffer of one sample (empty for a pointwise convolution or
    /// a 3x3 one done without im2col).
    fn scratch(&self) -> Vec<T> {
        let g = self.g;
        if g.is_pointwise() || self.conv3x3.is_some() {
            Vec::new()
        } else {
            vec![T::zero(); g.taps() * g.rows.out * g.cols.out]
        }
    }

    /// `y = relu?(W x * scale + shift + residual?)` for the samples in `x` (several only with a
    /// planned 3x3 kernel, see [`samples_per_call`]); writes all of `y`.
    fn run(
        &self,
        x: &[T],
        residual: Option<&[T]>,
        y: &mut [MaybeUninit<T>],
        windows: &mut [T],
        threads: gemm::Parallelism,
    ) {
        let g = self.g;
        let positions = g.rows.out * g.cols.out;
        if let Some(conv) = self.conv3x3 {
            conv.run(x, y, (g.c_in, g.c_out, g.rows.n, g.cols.n), threads);
        } else {
            assert_eq!(y.len(), g.c_out * positions, "conv2d_bn_eval: im2col takes one sample per call");
            let windows: &[T] = if g.is_pointwise() {
                x
            } else {
                g.gather_sample(windows, x);
                windows
            };
            // SAFETY: `y` holds `c_out x positions` entries, all of which gemm writes (without reading).
            unsafe {
            matmul(
                y.as_mut_ptr() as *mut T,
                Write::Overwrite,
                self.weight,
                Operand::RowMajor,
                windows,
                Operand::RowMajor,
                (g.c_out, g.taps(), positions),
                threads,
            )
            };
        }
        // SAFETY: initialized just above.
        let y = unsafe { &mut *(y as *mut [MaybeUninit<T>] as *mut [T]) };
        if self.scale.is_none() && residual.is_none() && !self.relu {
            return;
        }
        // Planes of channel `i % c_out`, sample after sample.
        for (i, plane) in y.chunks_mut(positions).enumerate() {
            let c = i % g.c_out;
            let (a, b) = match (self.scale, self.shift) {
                (Some(scale), Some(shift)) => (scale[c], shift[c]),
                _ => (T::one(), T::zero()),
            };
            match residual {
                Some(r) => {
                    let r = &r[i * positions..(i + 1) * positions];
                    for (v, &r) in plane.iter_mut().zip(r) {
                        *v = *v * a + b + r;
                    }
                }
                None => plane.iter_mut().for_each(|v| *v = *v * a + b),
            }
            if self.relu {
                plane.iter_mut().for_each(|v| *v = v.relu());
            }
        }
    }
}

/// How many samples each call of a forward or input-gradient convolution of geometry `g` takes:
/// several for Winograd on 4x4 maps ([`Conv3x3::group`]), else one.
fn samples_per_call(conv3x3: Option<&Conv3x3>, g: &Geometry) -> usize {
    conv3x3.map_or(1, |conv| conv.group(g))
}

/// The input gradient of `conv2d(x, weight)` for an `x` of `geometry`'s shape given the output's
/// gradient `grad`, one sample at a time (see [`ConvBnEvalInputGrad`] for how). CPU, f32/f64.
pub(crate) fn conv2d_input_grad_per_sample(grad: &Tensor, weight: &Tensor, geometry: Geometry) -> Result<Tensor> {
    let grad = grad.contiguous()?;
    let op = ConvBnEvalInputGrad { geometry, weight: weight.detach().contiguous()?, scale: None, relu: false };
    grad.apply_op1_no_bwd(&op)
}

/// `conv2d(x, weight)` for `x` of `geometry`'s shape, one sample at a time (im2col, then gemm straight
/// into the output). No backward: the callers' ops provide it. CPU, f32/f64.
pub(crate) fn conv2d_per_sample(x: &Tensor, weight: &Tensor, geometry: Geometry) -> Result<Tensor> {
    let op = ConvBnEval { geometry, weight: weight.detach().contiguous()?, affine: None, relu: false };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// The input gradient of [`ConvBnEval`] given the output's gradient `g` and the output `y`: the
/// convolution's adjoint applied to `g * [y > 0] * scale` (without the mask when `relu` is false),
/// one sample at a time. For stride 1 the adjoint is itself a convolution of the scaled gradient
/// (flipped, channel-swapped kernel): the direct 3x3 kernel where it applies, else a gather and a
/// gemm. Otherwise `W^T` times the scaled gradient gives each output position's window
/// contributions (written straight into the input gradient for a pointwise convolution), which
/// col2im adds into the input positions.
struct ConvBnEvalInputGrad {
    geometry: Geometry,
    weight: Tensor,
    /// `None`: a plain convolution's adjoint (unit scale).
    scale: Option<Tensor>,
    relu: bool,
}

impl ConvBnEvalInputGrad {
    fn run<T: CpuFloat>(&self, grad: &[T], y: &[T]) -> Result<Vec<T>> {
        let g = self.geometry;
        let positions = g.rows.out * g.cols.out;
        let (sample_in, sample_out) = (g.c_in * g.rows.n * g.cols.n, g.c_out * positions);
        let scale = match &self.scale {
            Some(scale) => scale.to_vec1::<T>()?,
            None => vec![T::one(); g.c_out],
        };
        let adjoint = if g.is_pointwise() { None } else { g.stride_one_adjoint() };
        with_cpu_slice(&self.weight, "conv2d_bn_eval", "weight", |weight: &[T]| {
            let adjoint_weight = adjoint.map(|_| g.adjoint_kernel(weight));
            let adjoint = adjoint.zip(adjoint_weight.as_deref());
            let conv3x3 = adjoint.and_then(|(a, w)| Conv3x3::plan(&a, w));
            let group = adjoint.map_or(1, |(a, _)| samples_per_call(conv3x3.as_ref(), &a));
            let sample = SampleInputGrad {
                g,
                weight,
                adjoint,
                conv3x3: conv3x3.as_ref(),
                scale: &scale,
                relu: self.relu,
            };
            let scratch = || {
                let windows = match adjoint {
                    _ if conv3x3.is_some() => Vec::new(),
                    Some((a, _)) => vec![T::zero(); a.taps() * a.rows.out * a.cols.out],
                    None if g.is_pointwise() => Vec::new(),
                    None => vec![T::zero(); g.taps() * positions],
                };
                (vec![T::zero(); group * sample_out], windows)
            };
            // The samples `s ..` that the input-gradient chunk `out` holds.
            let samples = |s: usize, out: &[T]| s * sample_out..(s + out.len() / sample_in) * sample_out;
            let y = |s: usize, out: &[T]| if self.relu { &y[samples(s, out)] } else { &[][..] };
            let grad = |s: usize, out: &[T]| &grad[samples(s, out)];
            let mut out = vec![T::zero(); g.b * sample_in];
            if split_by_sample(g.b) {
                parallel::for_each_chunk_init(&mut out, group * sample_in, scratch, |scratch, i, out| {
                    sample.run(grad(i * group, out), y(i * group, out), out, scratch, gemm::Parallelism::None)
                });
            } else {
                let mut scratch = scratch();
                for (i, out) in out.chunks_mut(group * sample_in).enumerate() {
                    sample.run(grad(i * group, out), y(i * group, out), out, &mut scratch, gemm_threads());
                }
            }
            out
        })
    }
}

/// One sample of [`ConvBnEvalInputGrad`]: the constants, borrowed for the op's duration.
struct SampleInputGrad<'a, T> {
    g: Geometry,
    weight: &'a [T],
    /// For a stride-1 convolution, the adjoint as a forward convolution of the output gradient and
    /// its kernel (see [`Geometry::stride_one_adjoint`]): a gather instead of col2im's scatter-add of
    /// a 9x larger buffer.
    adjoint: Option<(Geometry, &'a [T])>,
    /// The adjoint's prepared kernel when it is a 3x3 convolution done without im2col (see
    /// [`crate::conv3x3`]).
    conv3x3: Option<&'a Conv3x3>,
    scale: &'a [T],
    relu: bool,
}

impl<T: CpuFloat> SampleInputGrad<'_, T> {
    /// Adds the samples' input gradient into `out` (zeros on entry) given their output gradient
    /// `grad` and output `y` (empty without the ReLU); several samples only with a planned 3x3
    /// kernel (see [`samples_per_call`]). `scaled` (`[samples, c_out, positions]`) and `windows`
    /// (`[taps, positions]`, the adjoint's windows with one, empty for a pointwise convolution) are
    /// scratch.
    fn run(
        &self,
        grad: &[T],
        y: &[T],
        out: &mut [T],
        (scaled, windows): &mut (Vec<T>, Vec<T>),
        threads: gemm::Parallelism,
    ) {
        let g = self.g;
        let positions = g.rows.out * g.cols.out;
        let scaled = &mut scaled[..grad.len()];
        // Planes of channel `i % c_out`, sample after sample.
        for (i, dst) in scaled.chunks_mut(positions).enumerate() {
            let (a, grad) = (self.scale[i % g.c_out], &grad[i * positions..][..positions]);
            if self.relu {
                let y = &y[i * positions..][..positions];
                for ((d, &g), &y) in dst.iter_mut().zip(grad).zip(y) {
                    *d = if y > T::zero() { g * a } else { T::zero() };
                }
            } else {
                for (d, &g) in dst.iter_mut().zip(grad) {
                    *d = g * a;
                }
            }
        }
        if let Some(conv) = self.conv3x3 {
            // SAFETY: `MaybeUninit<T>` has `T`'s layout; `run` overwrites every entry.
            let out = unsafe { &mut *(out as *mut [T] as *mut [MaybeUninit<T>]) };
            conv.run(scaled, out, (g.c_out, g.c_in, g.rows.n, g.cols.n), threads);
            return;
        }
        assert_eq!(grad.len(), g.c_out * positions, "conv2d_bn_eval: the input gradient's gemm takes one sample per call");
        if let Some((adjoint, kernel)) = self.adjoint {
            adjoint.gather_sample(windows, scaled);
            let shape = (g.c_in, adjoint.taps(), g.rows.n * g.cols.n);
            // SAFETY: `out` holds `c_in x h x w` entries, the adjoint's kernel is `[c_in, c_out * kh *
            // kw]` and its windows `[c_out * kh * kw, h * w]`.
            unsafe {
                matmul(out.as_mut_ptr(), Write::Overwrite, kernel, Operand::RowMajor, windows, Operand::RowMajor, shape, threads)
            };
            return;
        }
        let shape = (g.taps(), g.c_out, positions);
        // SAFETY: the destination holds `taps x positions` entries (the input plane itself when the
        // convolution is pointwise); the weight is `[c_out, taps]`, read transposed.
        unsafe {
            if g.is_pointwise() {
                matmul(out.as_mut_ptr(), Write::Overwrite, self.weight, Operand::Transposed, scaled, Operand::RowMajor, shape, threads);
            } else {
                matmul(windows.as_mut_ptr(), Write::Overwrite, self.weight, Operand::Transposed, scaled, Operand::RowMajor, shape, threads);
            }
        }
        if !g.is_pointwise() {
            g.scatter_add_sample(out, windows);
        }
    }
}

impl ConvBnEvalInputGrad {
    fn output_shape(&self) -> Shape {
        let g = self.geometry;
        Shape::from((g.b, g.c_in, g.rows.n, g.cols.n))
    }
}

/// Without the ReLU: the output's gradient alone.
impl CustomOp1 for ConvBnEvalInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-input-grad"
    }

    fn cpu_fwd(&self, g: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.relu {
            bail!("conv2d_bn_eval: the ReLU's input gradient needs the output")
        }
        let out = match g {
            CpuStorage::F32(g) => CpuStorage::F32(self.run(contiguous(g, lg, "gradient")?, &[])?),
            CpuStorage::F64(g) => CpuStorage::F64(self.run(contiguous(g, lg, "gradient")?, &[])?),
            other => bail!("conv2d_bn_eval: unsupported gradient dtype {:?}", other.dtype()),
        };
        Ok((out, self.output_shape()))
    }
}

/// With the ReLU: the output's gradient and the output (to mask by).
impl CustomOp2 for ConvBnEvalInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-bn-eval-input-grad"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (g, y) {
            (CpuStorage::F32(g), CpuStorage::F32(y)) => CpuStorage::F32(
                self.run(contiguous(g, lg, "gradient")?, contiguous(y, ly, "output")?)?,
            ),
            (CpuStorage::F64(g), CpuStorage::F64(y)) => CpuStorage::F64(
                self.run(contiguous(g, lg, "gradient")?, contiguous(y, ly, "output")?)?,
            ),
            _ => bail!(
                "conv2d_bn_eval: unsupported gradient dtypes {:?}, {:?}",
                g.dtype(),
                y.dtype()
            ),
        };
        Ok((out, self.output_shape()))
    }
}


fn contiguous<'a, T>(v: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    contiguous_slice(v, layout, "conv2d_bn_eval", what)
}

impl CustomOp1 for ConvBnEval {
    fn name(&self) -> &'static str {
        "conv2d-bn-eval"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match x {
            CpuStorage::F32(v) => CpuStorage::F32(self.forward(contiguous(v, l, "x")?, None)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.forward(contiguous(v, l, "x")?, None)?),
            other => bail!("conv2d_bn_eval: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, self.output_shape()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(y, grad, false)?.0))
    }
}

impl CustomOp2 for ConvBnEval {
    fn name(&self) -> &'static str {
        "conv2d-bn-eval-residual"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        r: &CpuStorage,
        lr: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (x, r) {
            (CpuStorage::F32(x), CpuStorage::F32(r)) => CpuStorage::F32(self.forward(
                contiguous(x, lx, "x")?,
                Some(contiguous(r, lr, "residual")?),
            )?),
            (CpuStorage::F64(x), CpuStorage::F64(r)) => CpuStorage::F64(self.forward(
                contiguous(x, lx, "x")?,
                Some(contiguous(r, lr, "residual")?),
            )?),
            _ => bail!(
                "conv2d_bn_eval: input and residual must both be f32 or f64, got {:?} and {:?}",
                x.dtype(),
                r.dtype()
            ),
        };
        Ok((out, self.output_shape()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _r: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_r) = self.backward(y, grad, true)?;
        Ok((Some(grad_x), grad_r))
    }
}

/// `g * [y > 0]` for a gradient `g` and an output `y` of the same shape: PyTorch's ReLU gradient.
/// CPU, f32/f64.
pub(crate) fn relu_mask(g: &Tensor, y: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2_no_bwd(&y.contiguous()?, &ReluMask)
}

/// The op of [`relu_mask`].
struct ReluMask;

impl ReluMask {
    fn run<T: CpuFloat>(g: &[T], y: &[T]) -> Vec<T> {
        g.par_iter()
            .zip(y.par_iter())
            .map(|(&g, &y)| if y > T::zero() { g } else { T::zero() })
            .collect()
    }
}

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "relu-mask"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if lg.dims() != ly.dims() {
            bail!(
                "relu-mask: gradient {:?} and output {:?} differ in shape",
                lg.dims(),
                ly.dims()
            )
        }
        let out = match (g, y) {
            (CpuStorage::F32(g), CpuStorage::F32(y)) => CpuStorage::F32(Self::run(
                contiguous(g, lg, "gradient")?,
                contiguous(y, ly, "output")?,
            )),
            (CpuStorage::F64(g), CpuStorage::F64(y)) => CpuStorage::F64(Self::run(
                contiguous(g, lg, "gradient")?,
                contiguous(y, ly, "output")?,
            )),
            _ => bail!(
                "relu-mask: unsupported dtypes {:?}, {:?}",
                g.dtype(),
                y.dtype()
            ),
        };
        Ok((out, lg.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused CPU op and the same arithmetic composed from candle ops agree (f64) on the output and
    /// on the gradients of the input and the residual, for the ResNets' convolution shapes.
    #[test]
    fn fused_matches_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (k, stride, padding) in [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (7, 2, 3)] {
            for (relu, with_residual) in [(true, false), (true, true), (false, false)] {
                let x = Var::from_tensor(&Tensor::randn(0f64, 1., (3, 4, 9, 8), &dev)?)?;
                let w = Tensor::randn(0f64, 1., (5, 4, k, k), &dev)?;
                let scale = Tensor::randn(0f64, 1., 5, &dev)?;
                let shift = Tensor::randn(0f64, 1., 5, &dev)?;
                let (oh, ow) = (
                    (9 + 2 * padding - k) / stride + 1,
                    (8 + 2 * padding - k) / stride + 1,
                );
                let r = Var::from_tensor(&Tensor::randn(0f64, 1., (3, 5, oh, ow), &dev)?)?;
                let residual = with_residual.then(|| r.as_tensor());
                let g = Tensor::randn(0f64, 1., (3, 5, oh, ow), &dev)?;
                let run = |fused: bool| -> Result<Vec<Tensor>> {
                    let args = (
                        x.as_tensor(),
                        &w,
                        &scale,
                        &shift,
                        residual,
                        relu,
                        stride,
                        padding,
                    );
                    let y = if fused {
                        conv2d_bn_eval(
                            args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7,
                        )?
                    } else {
                        composed(
                            args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7,
                        )?
                    };
                    let grads = (&y * &g)?.sum_all()?.backward()?;
                    let mut out =
                        vec![y, grads.get(x.as_tensor()).expect("input gradient").clone()];
                    if with_residual {
                        out.push(grads.get(r.as_tensor()).expect("residual gradient").clone());
                    }
                    Ok(out)
                };
                for (a, b) in run(true)?.iter().zip(run(false)?.iter()) {
                    let err = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    assert!(
                        err < 1e-12,
                        "k{k} s{stride} p{padding} relu {relu} residual {with_residual}: {err}"
                    );
                }
            }
        }
        Ok(())
    }

    /// f32 on shapes the planned 3x3 kernels take (forward and, through the adjoint, the input
    /// gradient; with the residual) against the composed ops in f64: the direct kernel (maps 8, 16
    /// and 32 wide) and Winograd on a 4x4 map, whose samples go in groups (9 samples: 5 and 4 on two
    /// threads).
    #[test]
    fn planned_3x3_shapes_match_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (b, c_in, c_out, hw) in [(2, 3, 8, 32), (2, 8, 4, 16), (2, 4, 8, 8), (9, 128, 136, 4)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, c_in, hw, hw), &dev)?)?;
            let w = (Tensor::randn(0f32, 1., (c_out, c_in, 3, 3), &dev)? / (c_in as f64).sqrt())?;
            let scale = Tensor::randn(0f32, 1., c_out, &dev)?;
            let shift = Tensor::randn(0f32, 1., c_out, &dev)?;
            let r = Var::from_tensor(&Tensor::randn(0f32, 1., (b, c_out, hw, hw), &dev)?)?;
            let g = Tensor::randn(0f32, 1., (b, c_out, hw, hw), &dev)?;
            let y = conv2d_bn_eval(x.as_tensor(), &w, &scale, &shift, Some(r.as_tensor()), true, 1, 1)?;
            let grads = (&y * &g)?.sum_all()?.backward()?;
            let (gx, gr) = (grads.get(x.as_tensor()).expect("input gradient"), grads.get(r.as_tensor()).expect("residual gradient"));
            let f64_of = |t: &Tensor| t.to_dtype(candle_core::DType::F64);
            let (x64, r64) = (Var::from_tensor(&f64_of(&x)?)?, Var::from_tensor(&f64_of(&r)?)?);
            let y64 = composed(x64.as_tensor(), &f64_of(&w)?, &f64_of(&scale)?, &f64_of(&shift)?, Some(r64.as_tensor()), true, 1, 1)?;
            let grads64 = (&y64 * f64_of(&g)?)?.sum_all()?.backward()?;
            let (gx64, gr64) = (grads64.get(x64.as_tensor()).expect("input gradient"), grads64.get(r64.as_tensor()).expect("residual gradient"));
            for (name, ours, exact) in [("output", &y, &y64), ("input gradient", gx, gx64), ("residual gradient", gr, gr64)] {
                let err = (f64_of(ours)? - exact)?.abs()?.max_all()?.to_scalar::<f64>()?;
                let size = exact.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err <= 1e-5 * size, "{b}x{c_in}->{c_out} {hw}x{hw} {name}: {err} (max {size})");
            }
        }
        Ok(())
    }

    /// Shapes that do not fit are refused with the shape at fault.
    #[test]
    fn rejects_mismatched_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 4, 4), candle_core::DType::F32, &dev)?;
        let w = Tensor::zeros((3, 2, 3, 3), candle_core::DType::F32, &dev)?;
        let ok = Tensor::zeros(3, candle_core::DType::F32, &dev)?;
        let bad = Tensor::zeros(2, candle_core::DType::F32, &dev)?;
        let err = conv2d_bn_eval(&x, &w, &bad, &ok, None, true, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("scale has shape [2]"), "{err}");
        let r = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &dev)?;
        let err = conv2d_bn_eval(&x, &w, &ok, &ok, Some(&r), true, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("residual has shape [1, 3, 2, 2]"), "{err}");
        Ok(())
    }
}
